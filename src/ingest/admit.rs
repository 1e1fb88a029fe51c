//! The decode budget: how much memory the requests being decoded and applied may hold at once.
//!
//! Before a request is decoded its cost is priced (`wire::cost` for protobuf; a fixed multiple
//! of the body for JSON, whose worst case is about that) and taken from one budget shared by
//! every transport; it goes back when the reply is sent. A request that could never fit, or
//! holds more data points than `limits.max_points_per_request`, is refused for good (413 /
//! RESOURCE_EXHAUSTED); one that must wait longer than [`WAIT`] for room gets a retryable 503 /
//! UNAVAILABLE. So a few hostile requests cost at most the budget, not the machine.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::IngestError;

/// How long a request waits for room in the budget before a retryable refusal.
pub const WAIT: Duration = Duration::from_secs(1);

/// What one OTLP/JSON body byte is charged: a `serde_json` value tree (an object with one field
/// allocates a ~630-byte B-tree leaf for an 8-byte `{"a":0},`) and the structs built from it
/// stay below this many bytes per body byte.
pub const JSON_FACTOR: u64 = 128;

/// The budget, in KiB units (a semaphore counts in `u32`).
pub struct DecodeBudget {
    sem: Arc<Semaphore>,
    kib: u32,
    max_points: u64,
    in_use: Gauge,
}

/// A share of the budget, returned when dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    in_use: Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_use.dec_by(self.bytes);
    }
}

impl DecodeBudget {
    pub fn new(bytes: u64, max_points: u64, in_use: Gauge) -> Self {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        Self {
            sem: Arc::new(Semaphore::new(kib as usize)),
            kib,
            max_points,
            in_use,
        }
    }

    /// Refuses a request of more than `limits.max_points_per_request` data points.
    pub fn check_points(&self, points: u64) -> Result<(), IngestError> {
        if points > self.max_points {
            return Err(IngestError::TooCostly(format!(
                "{points} data points in one request, more than limits.max_points_per_request \
                 ({}): send smaller batches",
                self.max_points
            )));
        }
        Ok(())
    }

    /// Takes `bytes` of the budget for a request of `points` data points.
    pub async fn admit(&self, bytes: u64, points: u64) -> Result<Admission, IngestError> {
        let kib = self.kib_for(bytes, points)?;
        let permit = tokio::time::timeout(WAIT, self.sem.clone().acquire_many_owned(kib))
            .await
            .map_err(|_| {
                IngestError::Limit("decode memory budget is in use (limits.max_decode_memory)")
            })?
            .map_err(|_| IngestError::ShuttingDown)?;
        Ok(self.admission(permit, kib))
    }

    /// [`admit`](Self::admit) if the room is there now; `None` if it would have to wait.
    pub fn try_admit(&self, bytes: u64, points: u64) -> Result<Option<Admission>, IngestError> {
        let kib = self.kib_for(bytes, points)?;
        match self.sem.clone().try_acquire_many_owned(kib) {
            Ok(permit) => Ok(Some(self.admission(permit, kib))),
            Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
            Err(tokio::sync::TryAcquireError::Closed) => Err(IngestError::ShuttingDown),
        }
    }

    /// The request's price in KiB, or why it can never be admitted.
    fn kib_for(&self, bytes: u64, points: u64) -> Result<u32, IngestError> {
        self.check_points(points)?;
        let kib = bytes.div_ceil(1024).max(1);
        if kib > u64::from(self.kib) {
            return Err(IngestError::TooCostly(format!(
                "decoding this request would take about {bytes} bytes, more than \
                 limits.max_decode_memory: send smaller batches"
            )));
        }
        Ok(kib as u32)
    }

    fn admission(&self, permit: OwnedSemaphorePermit, kib: u32) -> Admission {
        let bytes = i64::try_from(u64::from(kib) * 1024).unwrap_or(i64::MAX);
        self.in_use.inc_by(bytes);
        Admission {
            _permit: permit,
            bytes,
            in_use: self.in_use.clone(),
        }
    }

    /// Bytes of the budget free now.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_admits_up_to_its_size_then_refuses_retryably() {
        let b = DecodeBudget::new(10 << 10, 100, Gauge::default());
        let a = b.admit(6 << 10, 1).await.unwrap();
        assert_eq!(b.available(), 4 << 10);
        let err = b.admit(6 << 10, 1).await.err().unwrap();
        assert!(matches!(err, IngestError::Limit(_)), "{err}");
        drop(a);
        assert_eq!(b.available(), 10 << 10, "returned on drop");
        let _ok = b.admit(6 << 10, 1).await.unwrap();
    }

    #[tokio::test]
    async fn requests_that_never_fit_are_refused_for_good() {
        let b = DecodeBudget::new(10 << 10, 100, Gauge::default());
        assert!(matches!(
            b.admit(11 << 10, 1).await,
            Err(IngestError::TooCostly(_))
        ));
        assert!(matches!(
            b.admit(1, 101).await,
            Err(IngestError::TooCostly(_))
        ));
    }
}
