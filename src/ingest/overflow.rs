//! The second hop of points over a series budget: shards hand them back (`Redirect`), and the
//! ingest task sends them to the shard that owns their service's overflow series, then waits
//! for that too before replying. See `aggregate/budget.rs` for why the hop exists.

use std::collections::HashMap;
use std::sync::Arc;

use super::{IngestError, Ingestor};
use crate::aggregate::key::FamilyDesc;
use crate::aggregate::series::{Point, PointValue};
use crate::aggregate::shard::{
    overflow_key, Batch, BatchResult, LabelRef, Outcome, OverflowLabels, Redirect,
};

/// Points bound for one shard's overflow series.
#[derive(Default)]
struct Part {
    points: Vec<Point>,
    counts: Vec<u64>,
}

impl Ingestor {
    /// Applies redirected points to their overflow series; returns their outcomes and the
    /// first error. After one, no more parts are sent; those already sent are waited for.
    pub(super) async fn send_overflow(
        &self,
        redirects: Vec<Redirect>,
        families: &Arc<[FamilyDesc]>,
        layouts: &Arc<[Arc<[f64]>]>,
        at: Option<u64>,
    ) -> (BatchResult, Option<IngestError>) {
        let mut services: Vec<Box<str>> = Vec::new();
        let mut index: HashMap<Box<str>, u32> = HashMap::new();
        let mut parts: HashMap<usize, Part> = HashMap::new();
        let mut overflowed = 0u64;
        let mut lost = 0u32;
        for r in redirects {
            for mut p in r.points {
                let service = match p.label_ref {
                    LabelRef::Entry(i) => r.services.get(i as usize),
                    LabelRef::Otlp { .. } => None,
                };
                let (Some(service), Some(family)) = (service, families.get(p.family as usize))
                else {
                    // A shard handed back a point it did not mark: a bug, counted, not hidden.
                    tracing::error!("spanagg bug: a redirected point has no overflow service");
                    lost += 1;
                    continue;
                };
                let idx = *index.entry(service.clone()).or_insert_with(|| {
                    services.push(service.clone());
                    (services.len() - 1) as u32
                });
                p.series = overflow_key(service, family.key_seed());
                p.label_ref = LabelRef::Entry(idx);
                let part = parts.entry(self.table.shard_of(p.series)).or_default();
                if let PointValue::Histogram { counts, .. } = &mut p.value {
                    let from = part.counts.len() as u32;
                    part.counts.extend_from_slice(
                        r.counts
                            .get(counts.0 as usize..counts.1 as usize)
                            .unwrap_or(&[]),
                    );
                    *counts = (from, part.counts.len() as u32);
                }
                part.points.push(p);
                overflowed += 1;
            }
        }
        self.telemetry.overflowed(overflowed);
        let labels = Arc::new(OverflowLabels { services });
        let batches = parts.into_iter().map(|(shard, part)| {
            let batch = Batch {
                families: families.clone(),
                layouts: layouts.clone(),
                counts: part.counts,
                points: part.points,
                labels: labels.clone(),
                overflow: true,
                now_ns: at,
                done: Box::new(|_| {}),
            };
            (shard, batch)
        });
        let (results, _, failed) = self.dispatch(batches).await;
        let mut total = BatchResult::default();
        total.counts[Outcome::InternalError as usize] += lost;
        for r in &results {
            total.add(r);
        }
        (total, failed)
    }
}
