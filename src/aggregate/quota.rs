//! The series budgets every shard draws from: output series per service
//! (`limits.max_series_per_service`) and in all (`limits.max_series`).
//!
//! One count for all shards, so a service overflows at its configured number however its series
//! hash, not at its share of one shard. Shards touch it only for a point whose series does not
//! exist and to count or drop a series, never per point of an existing series, so one mutex is
//! enough. A series is counted once it exists and given back when it expires; a service with no
//! series left is forgotten, so services that went away cost nothing. Overflow series are not counted: there is at most
//! one per service at its limit and family, and one per family past the global limit.

use std::collections::HashMap;
use std::sync::Mutex;

use ahash::RandomState;

/// Why a new series does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its service has `max_series_per_service` series: it goes to the service's overflow series.
    Service,
    /// All services together have `max_series`: it goes to the one global overflow series.
    Global,
}

#[derive(Debug, Default)]
struct Counts {
    total: u64,
    services: HashMap<Box<str>, u64, RandomState>,
}

/// The shared series budgets.
#[derive(Debug)]
pub struct SeriesQuota {
    per_service: u64,
    total: u64,
    counts: Mutex<Counts>,
}

impl Default for SeriesQuota {
    /// No limits.
    fn default() -> Self {
        Self::new(u64::MAX, u64::MAX)
    }
}

impl SeriesQuota {
    pub fn new(per_service: u64, total: u64) -> Self {
        Self {
            per_service,
            total,
            counts: Mutex::new(Counts::default()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A shard that panicked while holding it takes the process down (see `table.rs`); the
        // counts are still whole, as each update is one step.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether one more series of `service` fits now, without taking it: shards ask before a
    /// point may create a series and count it (`force`) only once it did, so a point that
    /// turns out a duplicate never holds a place another shard needed. Two shards racing for
    /// the last place may both pass: a budget is exceeded by at most the shard count, and
    /// only then.
    pub fn fits(&self, service: &str) -> Result<(), Full> {
        let c = self.counts();
        if c.total >= self.total {
            return Err(Full::Global);
        }
        if c.services.get(service).copied().unwrap_or(0) >= self.per_service {
            return Err(Full::Service);
        }
        Ok(())
    }

    /// Counts a series that exists whatever the limits say (created after `fits`, or restored
    /// from a checkpoint).
    pub fn force(&self, service: &str) {
        let mut c = self.counts();
        c.total += 1;
        *c.services.entry(service.into()).or_default() += 1;
    }

    /// Gives back a series of `service`.
    pub fn give_back(&self, service: &str) {
        let mut c = self.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.services.get_mut(service) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.services.remove(service);
            }
        }
    }

    /// (series in all, services with series).
    pub fn usage(&self) -> (u64, usize) {
        let c = self.counts();
        (c.total, c.services.len())
    }

    pub fn per_service(&self) -> u64 {
        self.per_service
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(q: &SeriesQuota, service: &str) -> Result<(), Full> {
        q.fits(service)?;
        q.force(service);
        Ok(())
    }

    #[test]
    fn a_service_fills_its_budget_exactly_then_the_global_one_stops_everyone() {
        let q = SeriesQuota::new(3, 5);
        for _ in 0..3 {
            take(&q, "a").unwrap();
        }
        assert_eq!(q.fits("a"), Err(Full::Service));
        take(&q, "b").unwrap();
        take(&q, "b").unwrap();
        assert_eq!(q.fits("c"), Err(Full::Global));
        assert_eq!(
            q.fits("a"),
            Err(Full::Global),
            "global first: one overflow series"
        );
        q.give_back("b");
        take(&q, "c").unwrap();
        assert_eq!(q.usage(), (5, 3));
    }

    #[test]
    fn services_with_no_series_are_forgotten() {
        let q = SeriesQuota::new(10, 10);
        take(&q, "gone").unwrap();
        q.force("restored");
        q.give_back("gone");
        q.give_back("restored");
        assert_eq!(q.usage(), (0, 0));
        q.give_back("never-taken");
        assert_eq!(q.usage(), (0, 0), "never below zero");
    }
}
