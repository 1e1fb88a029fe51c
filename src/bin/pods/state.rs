//! The simulated pods' span metrics: every pod's cumulative calls counter and duration
//! histogram per route, advanced one round at a time by seeded deltas, and the exact cluster
//! totals (summed over pods per service and route) that any correct aggregator must report.
//!
//! Invariants: a round's deltas depend only on (seed, pod, route, bucket, round), so two runs
//! with one seed produce the same numbers whatever system reads them; every value is an
//! integer below 2^53, so float sums in any order are exact; `totals` is always the sum of
//! `counts`/`sums` over pods.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
use serde::Serialize;
use spanagg::workload::{bounds, request, Shape};

/// What the pods send: `pods` pods spread over `services`, `routes` routes each, a histogram
/// of `bounds + 1` buckets and a calls counter per route.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub pods: usize,
    pub services: usize,
    pub routes: usize,
    pub bounds: usize,
    pub seed: u64,
}

impl Workload {
    fn buckets(&self) -> usize {
        self.bounds + 1
    }

    /// Prometheus samples one pod exposes per scrape: per route the calls counter, every
    /// bucket, `_sum` and `_count`. The same count stands for the OTLP input's samples.
    pub fn samples_per_round(&self) -> u64 {
        (self.pods * self.routes * (self.buckets() + 3)) as u64
    }

    /// Refuses a workload whose state would not fit (one `u32` per pod, route and bucket, at
    /// most 2^31 of them: 8 GiB), and one whose totals could reach 2^53, where float sums
    /// (Prometheus's, vmagent's, the OTLP `sum` field) stop being exact.
    pub fn check(&self, rounds: u64) -> Result<(), String> {
        let cells = self
            .pods
            .checked_mul(self.routes)
            .and_then(|n| n.checked_mul(self.bounds.checked_add(4)?));
        if cells.is_none_or(|n| n > 1 << 31) {
            return Err(format!(
                "{} pods × {} routes × {} bounds is more state than this generator holds (2^31 cells)",
                self.pods, self.routes, self.bounds
            ));
        }
        let bounds = bounds(self.bounds);
        let per_round: f64 = (0..self.buckets())
            .map(|b| 3.0 * duration_ms(&bounds, b) as f64)
            .sum();
        let worst = per_round * self.pods as f64 * rounds as f64;
        if worst >= 2f64.powi(53) {
            return Err(format!(
                "{} bounds over {rounds} rounds of {} pods could sum past 2^53 ms, where sums stop being exact: use fewer bounds or rounds",
                self.bounds, self.pods
            ));
        }
        Ok(())
    }

    fn shape(&self) -> Shape {
        Shape {
            services: self.services,
            routes: self.routes,
            bounds: self.bounds,
            counters: true,
        }
    }
}

/// Spans of one round in one bucket of one pod's route: 0 to 3, from the seed.
fn delta(seed: u64, pod: usize, route: usize, bucket: usize, round: u64) -> u32 {
    let mut x = seed
        ^ (pod as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (route as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (bucket as u64).wrapping_mul(0x1656_67B1_9E37_79F9)
        ^ round.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    // splitmix64's finalizer
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((x ^ (x >> 31)) & 3) as u32
}

/// The whole-millisecond duration a span in `bucket` took: the bucket's upper bound rounded
/// up (twice the last bound for +Inf), so every `_sum` stays an integer.
fn duration_ms(bounds: &[f64], bucket: usize) -> u64 {
    let last = bounds.last().copied().unwrap_or(1.0);
    bounds.get(bucket).copied().unwrap_or(last * 2.0).ceil() as u64
}

/// Every pod's cumulative state and the cluster totals.
pub struct Pods {
    w: Workload,
    bounds: Vec<f64>,
    weights: Vec<u64>,
    round: u64,
    /// pod × route × bucket: spans so far (not cumulative over `le`).
    counts: Vec<u32>,
    /// pod × route: the sum of durations so far, in ms.
    sums: Vec<u64>,
    /// service × route × bucket and service × route: the same, summed over pods.
    total_counts: Vec<u64>,
    total_sums: Vec<u64>,
}

impl Pods {
    pub fn new(w: Workload) -> Self {
        let bounds = bounds(w.bounds);
        let weights = (0..w.buckets()).map(|b| duration_ms(&bounds, b)).collect();
        Pods {
            w,
            bounds,
            weights,
            round: 0,
            counts: vec![0; w.pods * w.routes * w.buckets()],
            sums: vec![0; w.pods * w.routes],
            total_counts: vec![0; w.services * w.routes * w.buckets()],
            total_sums: vec![0; w.services * w.routes],
        }
    }

    /// Advances every pod by one round; returns the calls all pods made in it.
    pub fn advance(&mut self) -> u64 {
        self.round += 1;
        let (w, nb) = (self.w, self.w.buckets());
        let mut calls = 0;
        for pod in 0..w.pods {
            let service = pod % w.services;
            for route in 0..w.routes {
                let (at, total_at) = (pod * w.routes + route, service * w.routes + route);
                for b in 0..nb {
                    let d = delta(w.seed, pod, route, b, self.round);
                    self.counts[at * nb + b] += d;
                    self.total_counts[total_at * nb + b] += u64::from(d);
                    let ms = u64::from(d) * self.weights[b];
                    self.sums[at] += ms;
                    self.total_sums[total_at] += ms;
                    calls += u64::from(d);
                }
            }
        }
        calls
    }

    /// Pod `pod`'s delta for the last round as a spanmetrics-connector export over
    /// `[start, end)` (Unix ns), or `None` before the first round.
    pub fn delta_request(
        &self,
        pod: usize,
        start: u64,
        end: u64,
    ) -> Option<ExportMetricsServiceRequest> {
        if self.round == 0 || pod >= self.w.pods {
            return None;
        }
        let mut req = request(&self.w.shape(), pod, start, end);
        let nb = self.w.buckets();
        let metrics = &mut req
            .resource_metrics
            .first_mut()?
            .scope_metrics
            .first_mut()?
            .metrics;
        let mut route_counts = vec![0u64; self.w.routes];
        if let Some(Data::Histogram(h)) = metrics.first_mut().and_then(|m| m.data.as_mut()) {
            for (route, p) in h.data_points.iter_mut().enumerate() {
                let d: Vec<u64> = (0..nb)
                    .map(|b| u64::from(delta(self.w.seed, pod, route, b, self.round)))
                    .collect();
                p.count = d.iter().sum();
                p.sum = Some(d.iter().zip(&self.weights).map(|(n, w)| n * w).sum::<u64>() as f64);
                p.bucket_counts = d;
                route_counts[route] = p.count;
            }
        }
        if let Some(Data::Sum(s)) = metrics.get_mut(1).and_then(|m| m.data.as_mut()) {
            for (p, n) in s.data_points.iter_mut().zip(&route_counts) {
                p.value = Some(number_data_point::Value::AsInt(*n as i64));
            }
        }
        Some(req)
    }

    /// Pod `pod`'s Prometheus text exposition (0.0.4) of its cumulative state, as an exporter
    /// in the pod would serve it; `None` for a pod that does not exist.
    pub fn exposition(&self, pod: usize) -> Option<String> {
        if pod >= self.w.pods {
            return None;
        }
        let (w, nb) = (self.w, self.w.buckets());
        let service = pod % w.services;
        let mut out = String::with_capacity(w.routes * nb * 160);
        let labels = |r: usize| {
            format!(
                "service_name=\"service-{service}\",span_kind=\"SPAN_KIND_SERVER\",span_name=\"GET /api/v1/route/{r}\",status_code=\"STATUS_CODE_UNSET\""
            )
        };
        let count = |r: usize| -> u64 {
            let at = (pod * w.routes + r) * nb;
            self.counts[at..at + nb].iter().map(|&c| u64::from(c)).sum()
        };
        out.push_str("# TYPE traces_span_metrics_calls_total counter\n");
        for r in 0..w.routes {
            let _ = writeln!(
                out,
                "traces_span_metrics_calls_total{{{}}} {}",
                labels(r),
                count(r)
            );
        }
        out.push_str("# TYPE traces_span_metrics_duration_milliseconds histogram\n");
        for r in 0..w.routes {
            let l = labels(r);
            let at = (pod * w.routes + r) * nb;
            let mut le_count = 0u64;
            for b in 0..nb {
                le_count += u64::from(self.counts[at + b]);
                let le = self
                    .bounds
                    .get(b)
                    .map_or_else(|| "+Inf".to_owned(), f64::to_string);
                let _ = writeln!(out, "traces_span_metrics_duration_milliseconds_bucket{{{l},le=\"{le}\"}} {le_count}");
            }
            let _ = writeln!(
                out,
                "traces_span_metrics_duration_milliseconds_sum{{{l}}} {}",
                self.sums[pod * w.routes + r]
            );
            let _ = writeln!(
                out,
                "traces_span_metrics_duration_milliseconds_count{{{l}}} {le_count}"
            );
        }
        Some(out)
    }

    /// The exact cluster totals now: one entry per output series a correct aggregator serves.
    pub fn expected(&self) -> Expected {
        let (w, nb) = (self.w, self.w.buckets());
        let mut series = Vec::with_capacity(w.services * w.routes * (nb + 3));
        for s in 0..w.services.min(w.pods) {
            for r in 0..w.routes {
                let at = (s * w.routes + r) * nb;
                let service = format!("service-{s}");
                let route = format!("GET /api/v1/route/{r}");
                let mut le_count = 0;
                for b in 0..nb {
                    le_count += self.total_counts[at + b];
                    let le = self.bounds.get(b).copied().unwrap_or(f64::INFINITY);
                    series.push(Series::new(
                        "bucket",
                        &service,
                        &route,
                        Some(le),
                        le_count as f64,
                    ));
                }
                series.push(Series::new(
                    "calls",
                    &service,
                    &route,
                    None,
                    le_count as f64,
                ));
                series.push(Series::new(
                    "count",
                    &service,
                    &route,
                    None,
                    le_count as f64,
                ));
                let sum = self.total_sums[s * w.routes + r] as f64;
                series.push(Series::new("sum", &service, &route, None, sum));
            }
        }
        Expected {
            round: self.round,
            series,
        }
    }
}

/// The cluster totals after `round`.
#[derive(Debug, Serialize)]
pub struct Expected {
    pub round: u64,
    pub series: Vec<Series>,
}

/// One output series: `metric` is `calls`, `bucket`, `count` or `sum`; `labels` are every
/// label a correct aggregate keeps (`le` for buckets, `+Inf` for the last).
#[derive(Debug, Serialize)]
pub struct Series {
    pub metric: &'static str,
    pub labels: BTreeMap<&'static str, String>,
    pub value: f64,
}

impl Series {
    fn new(metric: &'static str, service: &str, route: &str, le: Option<f64>, value: f64) -> Self {
        let mut labels = BTreeMap::from([
            ("service_name", service.to_owned()),
            ("span_name", route.to_owned()),
            ("span_kind", "SPAN_KIND_SERVER".to_owned()),
            ("status_code", "STATUS_CODE_UNSET".to_owned()),
        ]);
        if let Some(le) = le {
            let text = if le.is_infinite() {
                "+Inf".to_owned()
            } else {
                le.to_string()
            };
            labels.insert("le", text);
        }
        Series {
            metric,
            labels,
            value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Workload {
        Workload {
            pods: 3,
            services: 2,
            routes: 2,
            bounds: 3,
            seed: 7,
        }
    }

    #[test]
    fn totals_are_the_sum_of_what_the_pods_expose_and_send() {
        let mut pods = Pods::new(small());
        let mut sent_calls = 0i64;
        for _ in 0..3 {
            pods.advance();
            for p in 0..3 {
                let req = pods
                    .delta_request(p, 1, 2)
                    .expect("a request after a round");
                let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
                if let Some(Data::Sum(s)) = &metrics[1].data {
                    for dp in &s.data_points {
                        if let Some(number_data_point::Value::AsInt(v)) = dp.value {
                            sent_calls += v;
                        }
                    }
                }
            }
        }
        let expected = pods.expected();
        let calls: f64 = expected
            .series
            .iter()
            .filter(|s| s.metric == "calls")
            .map(|s| s.value)
            .sum();
        assert_eq!(calls, sent_calls as f64);
        // The exposition's calls counters add up to the same total.
        let exposed: f64 = (0..3)
            .filter_map(|p| pods.exposition(p))
            .flat_map(|text| {
                text.lines()
                    .filter(|l| l.starts_with("traces_span_metrics_calls_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum();
        assert_eq!(exposed, calls);
        assert!(calls > 0.0);
        // One seed, one workload.
        let mut again = Pods::new(small());
        (0..3).for_each(|_| {
            again.advance();
        });
        assert_eq!(again.exposition(1), pods.exposition(1));
        assert!(pods.exposition(3).is_none());
        assert!(small().check(1_000_000).is_ok());
        // 2^32 pods × routes: too much state, though its sums would still be exact.
        let huge = Workload {
            pods: 1 << 20,
            routes: 1 << 12,
            ..small()
        };
        assert!(
            huge.check(1).is_err(),
            "more state than the generator holds"
        );
        let past_usize = Workload {
            pods: usize::MAX / 2,
            ..small()
        };
        assert!(
            past_usize.check(0).is_err(),
            "a product past usize is refused, not wrapped"
        );
        let wide = Workload {
            bounds: 90,
            ..small()
        };
        assert!(
            wide.check(10).is_err(),
            "1.5^90 ms sums are not exact in a float"
        );
    }
}
