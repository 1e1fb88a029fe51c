//! The sharded table: N owner threads, each with its `ShardState`, fed over bounded crossbeam
//! channels. Writers never touch shared state; readers send a closure that the owner runs
//! between batches (so a read sees every batch wholly applied or not at all).
//!
//! A shard thread that panics takes the process with it ([`SHARD_DIED_EXIT_CODE`]): a service
//! with one dead shard would answer 503 for its share of series for good while looking alive.
//! The request that panicked was never logged (logging follows applying), so a restart replays
//! the WAL without it and comes back whole.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select_biased, unbounded, Receiver, Sender, TrySendError};

use super::shard::{Batch, BatchResult, ShardConfig, ShardState};

/// The exit code when a shard thread dies.
pub const SHARD_DIED_EXIT_CODE: i32 = 70;

/// Upper bounds (seconds) of the apply-latency histogram.
pub const APPLY_BUCKETS: [f64; 10] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5,
];

/// Numbers a shard publishes for its own telemetry. Written by the owner thread only, read at
/// scrape time; `Relaxed` is enough because each value is independent and only informative.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub series: AtomicU64,
    pub sources: AtomicU64,
    pub queue_depth: AtomicU64,
    pub batches: AtomicU64,
    pub evicted_series: AtomicU64,
    pub evicted_sources: AtomicU64,
    pub holes_given_up: AtomicU64,
    pub apply_ns_sum: AtomicU64,
    /// Per-bucket counts of `APPLY_BUCKETS`, `+Inf` last.
    pub apply_buckets: [AtomicU64; APPLY_BUCKETS.len() + 1],
    /// Per-service use, republished after every sweep.
    pub services: std::sync::Mutex<Vec<ServiceLine>>,
}

impl ShardStats {
    /// Publishes the shard's series and source stream counts.
    fn publish_sizes(&self, state: &ShardState) {
        self.series
            .store(state.series_len() as u64, Ordering::Relaxed);
        self.sources
            .store(state.sources_len() as u64, Ordering::Relaxed);
        self.holes_given_up
            .store(state.holes_given_up(), Ordering::Relaxed);
    }
}

/// One service's numbers in one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceLine {
    pub service: Box<str>,
    pub series: u64,
    pub streams: u64,
    pub overflowed: u64,
}

type Visit = Box<dyn FnOnce(&ShardState) + Send>;

struct Handle {
    data: Sender<Batch>,
    ctl: Sender<Visit>,
    stats: Arc<ShardStats>,
    thread: Option<JoinHandle<()>>,
}

/// Expiry held back while this lives ([`Table::pause_sweeps`]).
#[must_use = "expiry runs again as soon as the guard is dropped"]
pub struct SweepsPaused(Arc<AtomicUsize>);

impl Drop for SweepsPaused {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The set of shards.
pub struct Table {
    shards: Vec<Handle>,
    /// How many pauses hold expiry back: the WAL's replay (nothing expires until the state at
    /// the crash is whole) and a checkpoint reading its shards (they agree on what expired).
    sweeps_paused: Arc<AtomicUsize>,
}

/// The shard of `n` that owns an output series.
pub fn shard_for(series: u128, n: usize) -> usize {
    let top = (series >> 96) as u64;
    ((top * n as u64) >> 32) as usize
}

/// Why a batch could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    Full,
    Closed,
}

impl Table {
    /// Starts `n` empty shard threads.
    pub fn start(cfg: ShardConfig, n: usize, queue_capacity: usize) -> std::io::Result<Self> {
        Self::start_with(
            (0..n).map(|_| ShardState::new(cfg.clone())).collect(),
            queue_capacity,
        )
    }

    /// Starts one shard thread per state (as a restore rebuilt them).
    pub fn start_with(states: Vec<ShardState>, queue_capacity: usize) -> std::io::Result<Self> {
        let mut shards = Vec::with_capacity(states.len());
        let sweeps_paused = Arc::new(AtomicUsize::new(0));
        for (i, state) in states.into_iter().enumerate() {
            let (data, data_rx) = bounded(queue_capacity);
            let (ctl, ctl_rx) = unbounded();
            let stats = Arc::new(ShardStats::default());
            stats.publish_sizes(&state);
            let st = stats.clone();
            let paused = sweeps_paused.clone();
            let thread = std::thread::Builder::new()
                .name(format!("spanagg-shard-{i}"))
                .spawn(move || {
                    let body =
                        std::panic::AssertUnwindSafe(|| run(state, data_rx, ctl_rx, st, &paused));
                    if std::panic::catch_unwind(body).is_err() {
                        tracing::error!(
                            shard = i,
                            "a shard thread panicked; exiting so the service restarts whole \
                             from its WAL instead of running without the shard"
                        );
                        std::process::exit(SHARD_DIED_EXIT_CODE);
                    }
                })?;
            shards.push(Handle {
                data,
                ctl,
                stats,
                thread: Some(thread),
            });
        }
        Ok(Self {
            shards,
            sweeps_paused,
        })
    }

    /// Holds back expiry in every shard until the guard is dropped. Pauses nest: expiry runs
    /// again only once every pause has ended.
    pub fn pause_sweeps(&self) -> SweepsPaused {
        self.sweeps_paused.fetch_add(1, Ordering::AcqRel);
        SweepsPaused(self.sweeps_paused.clone())
    }

    /// Whether a pause holds expiry back now.
    pub fn sweeps_paused(&self) -> bool {
        self.sweeps_paused.load(Ordering::Acquire) > 0
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The shard that owns an output series: a stable function of the key's top 32 bits (which
    /// the key tables keep, so a stored key can be routed again).
    pub fn shard_of(&self, series: u128) -> usize {
        shard_for(series, self.shards.len())
    }

    // The batch comes back whole so the caller can retry it without rebuilding it.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, shard: usize, batch: Batch) -> Result<(), (SendError, Batch)> {
        let Some(h) = self.shards.get(shard) else {
            return Err((SendError::Closed, batch));
        };
        match h.data.try_send(batch) {
            Ok(()) => {
                h.stats
                    .queue_depth
                    .store(h.data.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(TrySendError::Full(b)) => Err((SendError::Full, b)),
            Err(TrySendError::Disconnected(b)) => Err((SendError::Closed, b)),
        }
    }

    /// Runs `f` on every shard's state, on the shard threads, in parallel; `f` reports through
    /// whatever it captures.
    pub fn visit<F>(&self, f: F)
    where
        F: Fn(usize, &ShardState) + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        for (i, h) in self.shards.iter().enumerate() {
            let f = f.clone();
            // A closed shard cannot answer; the reader notices a missing reply.
            let _ = h.ctl.send(Box::new(move |s: &ShardState| f(i, s)));
        }
    }

    /// Runs `f` on shard `i`'s state, on its thread; nothing if there is no such shard or it
    /// has stopped.
    pub fn visit_one<F>(&self, i: usize, f: F)
    where
        F: FnOnce(&ShardState) + Send + 'static,
    {
        if let Some(h) = self.shards.get(i) {
            let _ = h.ctl.send(Box::new(f));
        }
    }

    /// Sends `value`, built on shard `i`, back to be freed there, then runs `then` there (to
    /// hand the freed pages to the OS: `crate::memory`). mimalloc keeps a page freed from
    /// another thread in its owner's heap until the owner collects, which a busy shard may not
    /// do for long (BENCHMARKS.md, "A scrape's pages go home"). If the shard has stopped,
    /// `value` is freed here.
    pub fn free_on_shard<T: Send + 'static>(
        &self,
        i: usize,
        value: T,
        then: impl FnOnce() + Send + 'static,
    ) {
        self.visit_one(i, move |_| {
            drop(value);
            then();
        });
    }

    pub fn stats(&self) -> Vec<Arc<ShardStats>> {
        self.shards.iter().map(|h| h.stats.clone()).collect()
    }

    /// Stops every shard after it has applied what is queued.
    pub fn shutdown(&mut self) {
        for h in &mut self.shards {
            let (closed_data, _) = bounded(0);
            let (closed_ctl, _) = unbounded();
            h.data = closed_data;
            h.ctl = closed_ctl;
        }
        for h in &mut self.shards {
            if let Some(t) = h.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Index bytes from which a table's growth frees enough to hand back at once (~5 MiB at a
/// million streams).
const BIG_INDEX: usize = 256 << 10;

/// Applies `batch`; whether it made an index of [`BIG_INDEX`] or more double, freeing the old
/// one whole. mimalloc keeps freed pages for its purge delay (a second); under a burst of new
/// streams both shards grow within that second, so at 5,000 pods the old indexes added ~20 MiB
/// to the peak. The caller hands them back once the batch is answered.
fn apply(state: &mut ShardState, batch: &Batch) -> (BatchResult, bool) {
    let before = state.index_bytes();
    let result = state.apply(batch);
    // Doubling adds what the old index held: a small index's growth adds too little.
    let grew = state.index_bytes().saturating_sub(before) >= BIG_INDEX;
    (result, grew)
}

fn run(
    mut state: ShardState,
    data: Receiver<Batch>,
    ctl: Receiver<Visit>,
    stats: Arc<ShardStats>,
    sweeps_paused: &AtomicUsize,
) {
    // Sweep often enough that a series outlives its TTL by at most a quarter of it.
    let sweep_every = Duration::from_secs(u64::from(state.ttl_secs()))
        .div_f64(4.0)
        .clamp(Duration::from_millis(250), Duration::from_secs(5));
    let epoch = Instant::now();
    let mut last_sweep = Instant::now();
    // Whether this thread worked (a batch, a visit) since it last handed freed pages back.
    let mut busy = false;
    loop {
        tick(&mut state, epoch);
        select_biased! {
            recv(ctl) -> msg => {
                let Ok(visit) = msg else { break };
                visit(&state);
                // A visit allocates here (a scrape's pieces, a checkpoint's part) and may free
                // here what was sent home (`free_on_shard`): pages to hand back at the
                // next idle spell, even with no ingest.
                busy = true;
                // Visits come first, but readers asking back to back must not starve ingest:
                // one waiting batch is applied after every visit.
                if let Ok(batch) = data.try_recv() {
                    // A visit (a checkpoint's part) can take seconds.
                    tick(&mut state, epoch);
                    ingest(&mut state, batch, &data, &stats);
                }
            }
            recv(data) -> msg => {
                let Ok(batch) = msg else { break };
                ingest(&mut state, batch, &data, &stats);
                busy = true;
            }
            default(Duration::from_millis(200)) => {
                // Kept for the next idle spell if the last release was too recent.
                if busy && crate::memory::release_when_idle() {
                    busy = false;
                }
            }
        }
        // A release put off after a scrape, made even if ingest never lets this shard idle.
        crate::memory::release_pending();
        if last_sweep.elapsed() >= sweep_every && sweeps_paused.load(Ordering::Acquire) == 0 {
            last_sweep = Instant::now();
            let (series, sources) = state.sweep();
            stats
                .evicted_series
                .fetch_add(series as u64, Ordering::Relaxed);
            stats
                .evicted_sources
                .fetch_add(sources as u64, Ordering::Relaxed);
            stats.publish_sizes(&state);
            let lines = state.service_lines();
            if let Ok(mut s) = stats.services.lock() {
                *s = lines;
            }
        }
    }
    // Shutdown: apply what is still queued so no acknowledged request is lost.
    while let Ok(batch) = data.try_recv() {
        let result = state.apply(&batch);
        finish(batch, result);
    }
}

/// Sets the shard's clocks: whole seconds since `epoch`, and the wall clock.
fn tick(state: &mut ShardState, epoch: Instant) {
    state.clock = epoch.elapsed().as_secs().min(u64::from(u32::MAX)) as u32;
    state.now_ns = crate::unix_ns();
}

/// Applies one batch, answers it, and publishes the shard's numbers.
fn ingest(state: &mut ShardState, batch: Batch, data: &Receiver<Batch>, stats: &ShardStats) {
    let t = Instant::now();
    let (result, grew) = apply(state, &batch);
    record_apply(stats, t.elapsed());
    finish(batch, result);
    if grew {
        crate::memory::release_freed();
    }
    stats
        .queue_depth
        .store(data.len() as u64, Ordering::Relaxed);
    stats.publish_sizes(state);
}

/// Drops the batch, then reports: whoever waits for the result finds the request's body no
/// longer held here, so it goes back to the inflate pool on the ingest thread instead of
/// being freed on this one (mimalloc keeps pages freed from another thread longer).
fn finish(mut batch: Batch, result: BatchResult) {
    let done = std::mem::replace(&mut batch.done, Box::new(|_| {}));
    drop(batch);
    done(result);
}

fn record_apply(stats: &ShardStats, d: Duration) {
    let secs = d.as_secs_f64();
    let i = APPLY_BUCKETS
        .iter()
        .position(|&b| secs <= b)
        .unwrap_or(APPLY_BUCKETS.len());
    stats.apply_buckets[i].fetch_add(1, Ordering::Relaxed);
    stats.apply_ns_sum.fetch_add(
        d.as_nanos().min(u128::from(u64::MAX)) as u64,
        Ordering::Relaxed,
    );
    stats.batches.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_index_that_grows_is_handed_back_at_once() {
        use crate::ingest::otlp::Projection;
        use crate::workload::{request, single_shard_batch, Shape};
        let shape = Shape {
            services: 1,
            routes: 200,
            bounds: 3,
            counters: true,
        };
        // The service's own default projection.
        let c = crate::config::Config::default();
        let projection = Arc::new(Projection::new(&c.by, &c.without));
        let mut state = ShardState::new(ShardConfig::default());
        state.now_ns = crate::unix_ns();
        let end = state.now_ns - 10_000_000_000;
        let mut pods = 0..;
        let mut grow_to = |state: &mut ShardState, streams: usize| {
            let mut released = 0;
            while state.sources_len() < streams {
                let pod = pods.next().unwrap_or_default();
                let req = request(&shape, pod, end - 10_000_000_000, end);
                let (_, grew) = apply(state, &single_shard_batch(req, &projection));
                released += u64::from(grew);
            }
            released
        };
        // Growing from small indexes frees too little to be worth a collection.
        assert_eq!(grow_to(&mut state, 40_000), 0);
        assert!(state.index_bytes() < 2 * BIG_INDEX);
        // Past 57,344 streams the index of 65,536 slots (~320 KiB) doubles.
        assert_eq!(grow_to(&mut state, 60_000), 1);
    }

    #[test]
    fn readers_asking_back_to_back_do_not_starve_ingest() {
        use crate::ingest::otlp::Projection;
        use crate::workload::{request, single_shard_batch, Shape};
        use std::sync::Mutex;
        let table = Table::start(ShardConfig::default(), 1, 8).expect("shards");
        let log = Arc::new(Mutex::new(String::new()));
        // The shard is held by a first visit while 20 more visits and 3 batches queue up.
        let (open, gate) = crossbeam_channel::bounded::<()>(0);
        table.visit_one(0, move |_| {
            let _ = gate.recv();
        });
        for _ in 0..20 {
            let log = log.clone();
            table.visit_one(0, move |_| {
                log.lock().map(|mut l| l.push('v')).unwrap_or(())
            });
        }
        let shape = Shape {
            services: 1,
            routes: 1,
            bounds: 3,
            counters: false,
        };
        let projection = Arc::new(Projection::new(&[], &[]));
        for pod in 0..3 {
            let mut batch = single_shard_batch(request(&shape, pod, 1, 2), &projection);
            let log = log.clone();
            batch.done = Box::new(move |_| log.lock().map(|mut l| l.push('b')).unwrap_or(()));
            assert!(table.try_send(0, batch).is_ok());
        }
        let _ = open.send(());
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.lock().map(|l| l.len()).unwrap_or(0) < 23 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let order = log.lock().map(|l| l.clone()).unwrap_or_default();
        // A batch after the held visit and after each of the next two.
        assert!(order.starts_with("bvbvb"), "{order}");
    }

    #[test]
    fn sweeps_stay_paused_until_every_pause_has_ended() {
        let table = Table::start(ShardConfig::default(), 1, 4).expect("shards");
        assert!(!table.sweeps_paused());
        // Replay and a checkpoint, say, overlapping: the first to end does not let expiry run.
        let replay = table.pause_sweeps();
        let checkpoint = table.pause_sweeps();
        drop(replay);
        assert!(table.sweeps_paused());
        drop(checkpoint);
        assert!(!table.sweeps_paused());
    }

    /// Run by `a_dead_shard_takes_the_process_down` in a child process: panics in a shard.
    #[test]
    #[ignore = "run as a child process by a_dead_shard_takes_the_process_down"]
    fn shard_panic_child() {
        let table = Table::start(ShardConfig::default(), 2, 4).expect("shards");
        table.visit(|i, _| assert!(i != 1, "shard 1 dies"));
        std::thread::sleep(Duration::from_secs(20));
    }

    #[test]
    fn a_dead_shard_takes_the_process_down() {
        let exe = std::env::current_exe().expect("test binary");
        let started = Instant::now();
        let status = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "aggregate::table::tests::shard_panic_child",
                "--nocapture",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("child runs");
        assert_eq!(status.code(), Some(SHARD_DIED_EXIT_CODE));
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "it did not wait"
        );
    }
}
