//! Load that outlives a server: pods that retry every request until it is acknowledged, across
//! kills and restarts, as an OTLP exporter's retry queue does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a pod retries one request before the test fails.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// One POST; `None` when the server is not there (refused, reset, killed mid-request).
pub fn try_post(addr: SocketAddr, body: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let head = format!(
        "POST /v1/metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: \
         application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let line = String::from_utf8_lossy(&raw);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Pods sending deltas as fast as they are acknowledged, each retrying until it is, across
/// restarts (like an OTLP exporter's retry queue); `body(pod, k)` is pod `pod`'s `k`th request.
/// Returns the acknowledged request count.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        addr: Arc<Mutex<SocketAddr>>,
        pods: usize,
        body: impl Fn(usize, u64) -> Vec<u8> + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let body = Arc::new(body);
        let threads = (0..pods)
            .map(|pod| {
                let (stop, acked, addr, body) =
                    (stop.clone(), acked.clone(), addr.clone(), body.clone());
                std::thread::spawn(move || {
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let body = body(pod, k);
                        // Retried until acknowledged, even past `stop`: an unacknowledged
                        // request may or may not have been applied, and only the retry settles it.
                        // A server that never comes back fails the test rather than hanging it.
                        let give_up = Instant::now() + GIVE_UP_AFTER;
                        loop {
                            let a = *addr.lock().unwrap();
                            if try_post(a, &body) == Some(200) {
                                break;
                            }
                            assert!(
                                Instant::now() < give_up,
                                "pod {pod}: request {k} not acknowledged in {GIVE_UP_AFTER:?}"
                            );
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        acked.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                })
            })
            .collect();
        Self {
            stop,
            acked,
            threads,
        }
    }

    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.acked.load(Ordering::Relaxed)
    }
}
