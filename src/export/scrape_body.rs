//! The scrape's body, in pieces (`prometheus::stitch_pieces`: each family's header, then the
//! shards' bodies for it): written one by one and freed once written, so the exposition is
//! never joined into one string. (A gzipped scrape is deflated on the shards: `gzip_parts`.)
//!
//! A shard's body goes back to that shard to be freed ([`Homed`]), and the shard hands the
//! pages to the OS once the last of its bodies is back. mimalloc keeps a page freed from
//! another thread in its owner's heap until the owner collects, so bodies freed by the I/O
//! thread stayed resident until the shard next idled: at 5,000 pods, 20 MiB after every scrape,
//! and for as long as ingest kept the shard busy (BENCHMARKS.md, "A scrape's pages go home").

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::prometheus::Piece;
use crate::aggregate::table::Table;

/// Text rendered on a shard, sent back to be freed there when dropped; `T` is a `String` in
/// the service.
pub struct Homed<T: Send + 'static> {
    text: Option<T>,
    home: Option<Home>,
}

/// Where a piece goes back to, and how many of its shard's pieces are still out. Weak: a
/// scraper that stalls must not keep the shards alive past shutdown.
struct Home {
    table: Weak<Table>,
    shard: usize,
    out: Arc<AtomicUsize>,
}

impl<T: AsRef<[u8]> + Send + 'static> AsRef<[u8]> for Homed<T> {
    fn as_ref(&self) -> &[u8] {
        self.text.as_ref().map_or(&[], |t| t.as_ref())
    }
}

impl<T: Send + 'static> Drop for Homed<T> {
    fn drop(&mut self) {
        let (Some(text), Some(home)) = (self.text.take(), self.home.take()) else {
            return;
        };
        let Some(table) = home.table.upgrade() else {
            return;
        };
        // Counted on the shard, after the drop, so the last piece's release comes after every
        // earlier piece of the scrape is freed, whichever threads dropped them.
        let out = home.out;
        // `release_soon`: at most once a second per shard, so a client scraping in a loop
        // cannot make the shards collect on every request.
        table.free_on_shard(home.shard, text, move || {
            if out.fetch_sub(1, Ordering::AcqRel) == 1 {
                crate::memory::release_soon();
            }
        });
    }
}

/// Gives each shard's pieces a way home; headers (rendered here) stay as they are.
pub fn homed<T: Send + 'static>(pieces: Vec<Piece<T>>, table: &Arc<Table>) -> Vec<Homed<T>> {
    let mut out_per_shard = vec![0usize; table.len()];
    for p in &pieces {
        if let Some(n) = p.shard.and_then(|i| out_per_shard.get_mut(i)) {
            *n += 1;
        }
    }
    let counters: Vec<Arc<AtomicUsize>> = out_per_shard
        .into_iter()
        .map(|n| Arc::new(AtomicUsize::new(n)))
        .collect();
    pieces
        .into_iter()
        .map(|p| {
            let home = p.shard.and_then(|i| {
                counters.get(i).map(|out| Home {
                    table: Arc::downgrade(table),
                    shard: i,
                    out: out.clone(),
                })
            });
            Homed {
                text: Some(p.text),
                home,
            }
        })
        .collect()
}

/// Sends the shards' pieces home at once, one visit per shard; headers are freed here.
pub fn send_home<T: Send + 'static>(pieces: Vec<Piece<T>>, table: &Table) {
    let mut per_shard: Vec<Vec<T>> = (0..table.len()).map(|_| Vec::new()).collect();
    for p in pieces {
        if let Some(v) = p.shard.and_then(|i| per_shard.get_mut(i)) {
            v.push(p.text);
        }
    }
    for (i, texts) in per_shard.into_iter().enumerate() {
        if !texts.is_empty() {
            table.free_on_shard(i, texts, crate::memory::release_soon);
        }
    }
}

/// The pieces as the chunks of a body, each sent home once written.
pub fn plain<T: AsRef<[u8]> + Send + 'static>(
    pieces: Vec<Homed<T>>,
) -> impl Iterator<Item = io::Result<Bytes>> + Send {
    pieces.into_iter().map(|p| Ok(Bytes::from_owner(p)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::aggregate::shard::ShardConfig;

    /// Text that records the thread it is freed on.
    struct Traced {
        text: String,
        freed_on: Arc<Mutex<Vec<String>>>,
    }

    impl AsRef<[u8]> for Traced {
        fn as_ref(&self) -> &[u8] {
            self.text.as_bytes()
        }
    }

    impl Drop for Traced {
        fn drop(&mut self) {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if let Ok(mut v) = self.freed_on.lock() {
                v.push(name);
            }
        }
    }

    /// 200 pieces: a header, then shard 0's body and shard 1's body, in turn.
    fn pieces(freed_on: &Arc<Mutex<Vec<String>>>) -> Vec<Piece<Traced>> {
        (0..200)
            .map(|i| Piece {
                text: Traced {
                    text: format!("line {i} {}\n", "x".repeat(i * 37)),
                    freed_on: freed_on.clone(),
                },
                shard: [None, Some(0), Some(1)][i % 3],
            })
            .collect()
    }

    fn expected() -> String {
        pieces(&Arc::default())
            .iter()
            .map(|p| p.text.text.clone())
            .collect()
    }

    /// Waits until every shard has run what was sent to it before, then counts the pieces
    /// freed on each thread.
    async fn freed(table: &Table, freed_on: &Mutex<Vec<String>>) -> BTreeMap<String, usize> {
        crate::export::gather(table, |_| ()).await.expect("shards");
        let mut by_thread = BTreeMap::new();
        for name in freed_on.lock().expect("not poisoned").iter() {
            *by_thread.entry(name.clone()).or_default() += 1;
        }
        by_thread
    }

    /// Headers are freed where the body is written (here), shards' bodies on their shards.
    fn homes() -> BTreeMap<String, usize> {
        let here = std::thread::current().name().unwrap_or("").to_owned();
        BTreeMap::from([
            (here, 67),
            ("spanagg-shard-0".to_owned(), 67),
            ("spanagg-shard-1".to_owned(), 66),
        ])
    }

    /// Fresh shards, whose threads have not released yet (a release is at most once a second).
    fn table() -> Arc<Table> {
        Arc::new(Table::start(ShardConfig::default(), 2, 4).expect("shards"))
    }

    /// Releases each shard has made (read on the shard, after what was sent to it before).
    async fn released(table: &Table) -> Vec<u64> {
        crate::export::gather(table, |_| crate::memory::releases_here())
            .await
            .expect("shards")
    }

    #[tokio::test]
    async fn the_body_is_the_pieces_in_order_and_each_is_freed_on_its_shard() {
        let table = table();
        let freed_on = Arc::default();
        assert_eq!(released(&table).await, [0, 0]);
        let body: Vec<u8> = plain(homed(pieces(&freed_on), &table))
            .flat_map(|b| b.expect("a chunk").to_vec())
            .collect();
        assert!(body == expected().as_bytes(), "the plain body differs");
        assert_eq!(freed(&table, &freed_on).await, homes());
        // Each shard handed its pages back once its last piece was home.
        assert_eq!(released(&table).await, [1, 1], "one release per shard");
    }

    #[tokio::test]
    async fn pieces_sent_home_at_once_are_freed_on_their_shards() {
        let table = table();
        let freed_on = Arc::default();
        send_home(pieces(&freed_on), &table);
        assert_eq!(freed(&table, &freed_on).await, homes());
        assert_eq!(released(&table).await, [1, 1], "one release per shard");
        // Another scrape within the second: its release waits for the second to end (unless
        // the machine is slow enough that it has), and comes then though the shards never idle.
        let freed_on = Arc::default();
        send_home(pieces(&freed_on), &table);
        assert_eq!(freed(&table, &freed_on).await, homes());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while released(&table).await != [2, 2] {
            assert!(
                std::time::Instant::now() < deadline,
                "the put-off release never came"
            );
            // Keeps the shards busy: a visit every 50 ms, never 200 ms idle.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_piece_outliving_its_shards_is_freed_where_it_is_dropped() {
        let table = table();
        let freed_on = Arc::default();
        let pieces = homed(pieces(&freed_on), &table);
        // The table goes, as at shutdown, while a stalled scrape still holds its body.
        drop(table);
        drop(pieces);
        let here = std::thread::current().name().unwrap_or("").to_owned();
        let threads: Vec<String> = freed_on.lock().expect("not poisoned").clone();
        assert_eq!(threads.len(), 200);
        assert!(threads.iter().all(|t| *t == here), "freed on {threads:?}");
    }
}
