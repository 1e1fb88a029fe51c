//! The OTLP edge: both transports hand a decoded request to [`Ingestor::export`], which validates
//! it, splits it by shard, waits until every shard has applied its part, and says what to reply.
//! One error classification here is mapped once per transport (`grpc.rs`, `http.rs`).

pub mod admit;
pub mod body;
mod durable;
pub mod grpc;
mod grpc_compression;
pub mod http;
pub mod json;
mod labels;
pub mod otlp;
mod overflow;
mod reason;
pub mod view;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::aggregate::shard::{Batch, BatchResult, Outcome};
use crate::aggregate::table::{SendError, Table};
use crate::storage::wal::Wal;
use crate::telemetry::{LimitKind, Protocol, RequestOutcome, Telemetry};
use otlp::{prepare, InputLimits, Projection, RequestLabels};
use view::OtlpBody;

/// How long an export waits for room in a full shard queue before refusing with a retryable
/// error. Short: the client's retry with backoff is the real queue.
const QUEUE_WAIT: Duration = Duration::from_millis(250);

/// Errors that refuse a whole request.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// Refused for good: it would cost more than a limit allows however long it waited.
    #[error("request too costly: {0}")]
    TooCostly(String),
    #[error("spanagg is overloaded: shard queues are full, retry later")]
    Unavailable,
    #[error("spanagg is shutting down")]
    ShuttingDown,
    #[error("applied but not durable, retry: {0}")]
    NotDurable(String),
    #[error("{0}: retry later")]
    Limit(&'static str),
}

/// A request's bytes as the WAL keeps them, when the transport has them.
#[derive(Debug, Clone)]
pub enum Logged {
    /// Protobuf, uncompressed: compressed with Snappy before logging.
    Protobuf(Bytes),
    /// Protobuf as the client gzip-compressed it: logged as it came.
    Gzip(Bytes),
    /// Protobuf as the client zstd-compressed it: logged as it came.
    Zstd(Bytes),
    /// A Snappy block as the client sent it: the WAL's own compressed form, logged as it came.
    SnappyBlock(Bytes),
}

impl Logged {
    /// What to log for a protobuf request that came as `raw` in `encoding` and inflated to
    /// `inflated` (`repaired`: the body re-encoded after invalid UTF-8 was replaced): a body
    /// the WAL can keep as it came is kept so, anything else as protobuf. The inflated body
    /// comes back when the log does not keep it (for the inflate pool).
    pub fn of(
        raw: Bytes,
        inflated: Bytes,
        encoding: body::Encoding,
        repaired: Option<Bytes>,
    ) -> (Self, Option<Bytes>) {
        use body::Encoding;
        match (repaired, encoding) {
            (Some(fixed), _) => (Self::Protobuf(fixed), Some(inflated)),
            (None, Encoding::Gzip) => (Self::Gzip(raw), Some(inflated)),
            (None, Encoding::Zstd) => (Self::Zstd(raw), Some(inflated)),
            (None, Encoding::Snappy) if body::snappy_block(&raw) => {
                (Self::SnappyBlock(raw), Some(inflated))
            }
            (None, Encoding::Snappy | Encoding::Deflate | Encoding::Identity) => {
                (Self::Protobuf(inflated), None)
            }
        }
    }
}

/// What to tell the client about an accepted request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReply {
    pub rejected: u64,
    pub message: String,
}

/// Shared by both transports.
pub struct Ingestor {
    table: Arc<Table>,
    projection: Arc<Projection>,
    telemetry: Arc<Telemetry>,
    /// With `durability: wal`: where accepted requests are logged before the reply.
    wal: Option<durable::Durable>,
    /// Set while resident memory is over `limits.max_memory` (by `watch_memory`).
    pub over_memory: Arc<std::sync::atomic::AtomicBool>,
    pub max_request_bytes: usize,
    limits: InputLimits,
    budget: admit::DecodeBudget,
    /// Inflate buffers kept between requests.
    pool: body::BufPool,
}

impl Ingestor {
    pub fn new(
        table: Arc<Table>,
        projection: Projection,
        telemetry: Arc<Telemetry>,
        max_request_bytes: usize,
    ) -> Self {
        Self {
            table,
            projection: Arc::new(projection),
            wal: None,
            over_memory: Default::default(),
            max_request_bytes,
            limits: InputLimits::default(),
            budget: Self::budget_for(&InputLimits::default(), &telemetry),
            pool: body::BufPool::default(),
            telemetry,
        }
    }

    fn budget_for(limits: &InputLimits, telemetry: &Telemetry) -> admit::DecodeBudget {
        admit::DecodeBudget::new(
            limits.max_decode_memory,
            limits.max_points_per_request,
            telemetry.decode_memory(),
        )
    }

    /// Checks points against `limits` instead of the built-in ones.
    pub fn with_limits(mut self, limits: InputLimits) -> Self {
        self.budget = Self::budget_for(&limits, &self.telemetry);
        self.limits = limits;
        self
    }

    /// Inflates `raw` (capped at `max_request_bytes`) and takes what decoding it will cost,
    /// priced by `price`; the price comes back with the body. A compressed body is not held while waiting for
    /// room: a few KiB of zstd can inflate to `max_request_bytes`, and requests queued for the
    /// budget would each hold that much unpriced. So if the room is not there at once, the
    /// inflated body is dropped while waiting and inflated again (the same bytes, the same
    /// result) once admitted: CPU spent twice only when the service is already saturated.
    pub async fn inflate_and_admit(
        &self,
        raw: Bytes,
        encoding: body::Encoding,
        price: impl Fn(&[u8]) -> Result<wire::Cost, IngestError>,
    ) -> Result<(Bytes, admit::Admission, wire::Cost), IngestError> {
        let limit = self.max_request_bytes;
        if encoding == body::Encoding::Identity {
            let body = body::decode(raw, encoding, limit)?;
            let cost = price(&body)?;
            let admission = self.admit(cost.bytes, cost.points).await?;
            return Ok((body, admission, cost));
        }
        let inflated = body::decode_into(raw.clone(), encoding, limit, self.pool.take())?;
        let cost = price(&inflated)?;
        if let Some(admission) = self.budget.try_admit(cost.bytes, cost.points)? {
            return Ok((inflated, admission, cost));
        }
        self.pool.give(inflated);
        let admission = self.admit(cost.bytes, cost.points).await?;
        let inflated = body::decode_into(raw, encoding, limit, self.pool.take())?;
        Ok((inflated, admission, cost))
    }

    /// A protobuf request as either transport has it (`raw`, in `encoding`): inflated,
    /// admitted, in regular form, and what the WAL is to keep of it. The inflated body goes
    /// back to the pool once the request is applied, unless the log keeps it.
    pub async fn prepare_protobuf(
        &self,
        raw: Bytes,
        encoding: body::Encoding,
    ) -> Result<(OtlpBody, Logged, admit::Admission), IngestError> {
        let (inflated, admission, cost) = self
            .inflate_and_admit(raw.clone(), encoding, Self::price_protobuf)
            .await?;
        if cost.regular {
            let (logged, _) = Logged::of(raw, inflated.clone(), encoding, None);
            return Ok((OtlpBody::regular(inflated), logged, admission));
        }
        let fixed = self.regularize(&inflated, &cost)?;
        let (logged, unused) = Logged::of(raw, inflated, encoding, Some(fixed.clone()));
        if let Some(b) = unused {
            self.pool.give(b);
        }
        Ok((OtlpBody::regular(fixed), logged, admission))
    }

    /// A JSON request: inflated, admitted (at [`admit::JSON_FACTOR`] times its size) and
    /// decoded; its points are checked once they are counted.
    pub async fn prepare_json(
        &self,
        raw: Bytes,
        encoding: body::Encoding,
    ) -> Result<(OtlpBody, admit::Admission), IngestError> {
        let (inflated, admission, _) = self
            .inflate_and_admit(raw, encoding, Self::price_json)
            .await?;
        let req = json::decode(&inflated)
            .map_err(|e| IngestError::InvalidArgument(format!("undecodable OTLP/JSON: {e}")))?;
        self.pool.give(inflated);
        let body = OtlpBody::encode(&req);
        // JSON may nest deeper than the walk allows: refused now, not skipped on WAL replay.
        let cost = Self::price_protobuf(body.bytes())?;
        self.budget.check_points(cost.points)?;
        Ok((body, admission))
    }

    /// What a protobuf body will cost to decode, and whether it is regular.
    pub fn price_protobuf(body: &[u8]) -> Result<wire::Cost, IngestError> {
        wire::cost(body)
            .map_err(|e| IngestError::InvalidArgument(format!("undecodable protobuf: {e}")))
    }

    /// What a JSON body may cost to decode; its points are counted after decoding.
    pub fn price_json(body: &[u8]) -> Result<wire::Cost, IngestError> {
        Ok(wire::Cost::of_bytes(
            (body.len() as u64).saturating_mul(admit::JSON_FACTOR),
        ))
    }

    /// An irregular protobuf body in regular form, invalid UTF-8 in its strings replaced
    /// (counted).
    fn regularize(&self, body: &[u8], cost: &wire::Cost) -> Result<Bytes, IngestError> {
        let (fixed, n) = wire::regularize(body, cost)
            .map_err(|e| IngestError::InvalidArgument(format!("undecodable protobuf: {e}")))?;
        if n > 0 {
            self.telemetry.invalid_utf8(n);
        }
        Ok(fixed)
    }

    async fn admit(&self, bytes: u64, points: u64) -> Result<admit::Admission, IngestError> {
        self.budget
            .admit(bytes, points)
            .await
            .map_err(|e| self.limit_counted(e))
    }

    fn limit_counted(&self, e: IngestError) -> IngestError {
        if let IngestError::Limit(_) = &e {
            self.telemetry.limit_refusal(LimitKind::DecodeMemory);
        }
        e
    }

    /// Logs every accepted request to `wal` before replying.
    pub fn with_wal(mut self, wal: Arc<Wal>) -> Self {
        self.wal = Some(durable::Durable::new(wal));
        self
    }

    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Records a request refused before it was decoded.
    pub fn refused(&self, protocol: Protocol, err: &IngestError) {
        self.telemetry.request(protocol, outcome_of(err));
    }

    /// Applies a decoded request; returns once every accepted point is applied (and, with a
    /// WAL, logged). `raw` is the request's encoding if the transport has it.
    pub async fn export(
        &self,
        protocol: Protocol,
        req: OtlpBody,
        raw: Option<Logged>,
    ) -> Result<ExportReply, IngestError> {
        self.export_at(protocol, req, raw, None).await
    }

    /// `export`, judging the request by time `at` (when it was first accepted) instead of now:
    /// what WAL replay does, so a restart long after a crash rebuilds the state at the crash.
    /// The body goes back to the inflate pool once nothing else holds it.
    pub async fn export_at(
        &self,
        protocol: Protocol,
        req: OtlpBody,
        raw: Option<Logged>,
        at: Option<u64>,
    ) -> Result<ExportReply, IngestError> {
        let result = self.export_inner(protocol, &req, raw, at).await;
        self.pool.give(req.into_bytes());
        let outcome = match &result {
            Ok(r) if r.rejected == 0 => RequestOutcome::Success,
            Ok(_) => RequestOutcome::PartialSuccess,
            Err(e) => outcome_of(e),
        };
        self.telemetry.request(protocol, outcome);
        result
    }

    /// `export` on a task of its own, so a client that hangs up cannot cancel it between
    /// applying and logging. `hold` (the request's decode admission) lives until it is done.
    pub async fn export_detached<H: Send + 'static>(
        self: &Arc<Self>,
        protocol: Protocol,
        req: OtlpBody,
        raw: Option<Logged>,
        hold: H,
    ) -> Result<ExportReply, IngestError> {
        let me = self.clone();
        tokio::spawn(async move {
            let r = me.export(protocol, req, raw).await;
            drop(hold);
            r
        })
        .await
        .unwrap_or(Err(IngestError::ShuttingDown))
    }

    async fn export_inner(
        &self,
        protocol: Protocol,
        req: &OtlpBody,
        raw: Option<Logged>,
        at: Option<u64>,
    ) -> Result<ExportReply, IngestError> {
        if self.over_memory.load(std::sync::atomic::Ordering::Relaxed) {
            self.telemetry.limit_refusal(LimitKind::Memory);
            return Err(IngestError::Limit(
                "memory limit reached (limits.max_memory)",
            ));
        }
        // Nothing new is applied while the log cannot take it.
        if let Some(d) = &self.wal {
            d.ready().await?;
        }
        let table = &self.table;
        let now = at.unwrap_or_else(crate::unix_ns);
        let mut prepared = prepare(req, &self.projection, &self.limits, now, table.len(), |k| {
            table.shard_of(k)
        });
        self.telemetry.received(protocol, prepared.received);
        self.telemetry
            .rejections(&prepared.rejections, prepared.no_value);
        self.telemetry.relabeled(&prepared.relabeled);
        let parts = std::mem::take(&mut prepared.per_shard);
        // The shards judge the points by the same time the WAL records, live and on replay.
        let (total, sent, failed) = self.apply(&prepared, parts, req, Some(now)).await;
        self.telemetry.outcomes(&total);
        // Logged after the shards applied it, so a checkpoint taken after a record's position
        // holds it (see `storage::wal`). Whatever was applied is logged, whatever the reply:
        // a request refused half way (a full queue, a failed overflow hop) is logged too, and
        // so are duplicates (the first try may have been applied and then failed to log).
        if let (Some(d), true) = (&self.wal, sent) {
            d.log(req, raw, now).await?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut message = prepared.rejections.message();
        let mut rejected = prepared.rejections.total();
        for o in Outcome::ALL {
            let n = u64::from(total.get(o));
            let Some(why) = o.explain().filter(|_| n > 0) else {
                continue;
            };
            if !message.is_empty() {
                message.push_str("; ");
            }
            message.push_str(&format!("{n} point(s) rejected: {why} ({})", o.as_str()));
            rejected += n;
        }
        // Everything else is applied (and logged); the client retries the whole request and the
        // applied part comes back as duplicates.
        if total.get(Outcome::StreamLimit) > 0 {
            self.telemetry.limit_refusal(LimitKind::SourceStreams);
            return Err(IngestError::Limit(
                "source stream limit reached (limits.max_source_streams)",
            ));
        }
        Ok(ExportReply { rejected, message })
    }

    /// Sends every shard its part and waits for all that were sent. Returns the outcomes,
    /// whether any part was sent (and so may be applied), and the first error: after one, no
    /// more parts are sent, but those already sent are always waited for.
    async fn apply(
        &self,
        prepared: &otlp::Prepared,
        parts: Vec<otlp::ShardPoints>,
        req: &OtlpBody,
        at: Option<u64>,
    ) -> (BatchResult, bool, Option<IngestError>) {
        let resolver = Arc::new(RequestLabels {
            body: req.clone(),
            resources: prepared.resources.clone(),
            projection: self.projection.clone(),
        });
        let batches = parts
            .into_iter()
            .enumerate()
            .filter(|(_, part)| !part.points.is_empty())
            .map(|(shard, part)| {
                let batch = Batch {
                    families: prepared.families.clone(),
                    layouts: prepared.layouts.clone(),
                    counts: part.counts,
                    points: part.points,
                    labels: resolver.clone(),
                    overflow: false,
                    now_ns: at,
                    done: Box::new(|_| {}),
                };
                (shard, batch)
            });
        let (results, sent, mut failed) = self.dispatch(batches).await;
        let mut total = BatchResult::default();
        let mut redirects = Vec::new();
        for mut r in results {
            total.add(&r);
            redirects.extend(r.redirect.take().map(|b| *b));
        }
        if !redirects.is_empty() {
            let (r, err) = self
                .send_overflow(redirects, &prepared.families, &prepared.layouts, at)
                .await;
            total.add(&r);
            if let Some(e) = err {
                failed.get_or_insert(e);
            }
        }
        (total, sent, failed)
    }

    /// Sends each batch to its shard and waits for every one that was sent. Returns their
    /// results, whether any was sent (and so may be applied), and the first error: after one,
    /// no more are sent, but those already sent are always waited for.
    async fn dispatch(
        &self,
        batches: impl Iterator<Item = (usize, Batch)>,
    ) -> (Vec<BatchResult>, bool, Option<IngestError>) {
        let mut failed = None;
        let mut waits = Vec::new();
        for (shard, mut batch) in batches {
            let (tx, rx) = tokio::sync::oneshot::channel();
            batch.done = Box::new(move |r: BatchResult| {
                let _ = tx.send(r);
            });
            if let Err(e) = self.send(shard, batch).await {
                failed = Some(e);
                break;
            }
            waits.push(rx);
        }
        let sent = !waits.is_empty();
        let mut results = Vec::with_capacity(waits.len());
        for rx in waits {
            match rx.await {
                Ok(r) => results.push(r),
                Err(_) => {
                    failed.get_or_insert(IngestError::ShuttingDown);
                }
            }
        }
        (results, sent, failed)
    }

    async fn send(&self, shard: usize, mut batch: Batch) -> Result<(), IngestError> {
        let deadline = tokio::time::Instant::now() + QUEUE_WAIT;
        loop {
            match self.table.try_send(shard, batch) {
                Ok(()) => return Ok(()),
                Err((SendError::Closed, _)) => return Err(IngestError::ShuttingDown),
                Err((SendError::Full, b)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(IngestError::Unavailable);
                    }
                    batch = b;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

fn outcome_of(e: &IngestError) -> RequestOutcome {
    match e {
        IngestError::InvalidArgument(_) => RequestOutcome::InvalidArgument,
        IngestError::TooLarge { .. } | IngestError::TooCostly(_) => RequestOutcome::TooLarge,
        IngestError::Unavailable
        | IngestError::ShuttingDown
        | IngestError::NotDurable(_)
        | IngestError::Limit(_) => RequestOutcome::Unavailable,
    }
}
