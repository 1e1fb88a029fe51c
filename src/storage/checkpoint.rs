//! Checkpoint files: the whole state in one Parquet file, written so a crash at any moment leaves
//! either the old file set or the new one (temp name, fsync, rename, fsync the directory), and
//! read back into shards. The footer's key-value metadata says what the file is: format version,
//! schema hash, creation time, the WAL position replay starts from, and whether a clean shutdown
//! wrote it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use xxhash_rust::xxh3::xxh3_64;

use super::columns::checkpoint_schema;
use super::rows::{restore_pod_row, restore_series_row, restore_stream_row, Columns, Value};
use super::wal::Position;
use super::{numbered_files, sync_dir};
use crate::aggregate::shard::ShardState;
use crate::aggregate::table::shard_for;
use crate::columnar::schema_text;

/// Bumped when the meaning of the file changes; a reader refuses versions it does not know.
/// 2: output keys hash the labels a scrape shows (sanitised names, empty values dropped,
/// reserved names exported); a version-1 file keys series differently and is not restored.
pub const FORMAT_VERSION: u32 = 2;

/// Hash of the documented schema: a file written under another schema is refused, not misread.
pub fn schema_hash() -> String {
    format!(
        "{:016x}",
        xxh3_64(schema_text(&checkpoint_schema()).as_bytes())
    )
}

/// What a checkpoint's footer says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub format_version: u32,
    pub schema_hash: String,
    pub created_ns: u64,
    /// Where WAL replay starts; `None` when no WAL was kept.
    pub wal_position: Option<Position>,
    /// When the state began (cumulative streams that started before it are only baselined).
    pub state_start_ns: u64,
    /// Written by a clean shutdown: nothing was accepted after it.
    pub clean_shutdown: bool,
    pub shards: u32,
    pub series: u64,
    pub streams: u64,
    /// `limits.max_series_per_service` as the shards enforced it (the sum of their shares);
    /// 0 if unknown.
    pub series_budget: u64,
}

const PREFIX: &str = "spanagg.";

/// Unix nanoseconds as an RFC 3339 time with milliseconds.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
        .to_string()
}

impl Meta {
    /// The footer of a checkpoint of `shards` shards holding `series` series and `streams`
    /// streams, of this format, written at `created_ns`, after a state that began at 0, with no
    /// WAL and not at a clean shutdown; the fields say otherwise where they differ.
    pub fn new(shards: u32, series: u64, streams: u64, created_ns: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            schema_hash: schema_hash(),
            created_ns,
            wal_position: None,
            state_start_ns: 0,
            clean_shutdown: false,
            shards,
            series,
            streams,
            series_budget: 0,
        }
    }

    fn to_kv(&self) -> Vec<KeyValue> {
        let kv = |k: &str, v: String| KeyValue::new(format!("{PREFIX}{k}"), v);
        vec![
            kv("format_version", self.format_version.to_string()),
            kv("schema_hash", self.schema_hash.clone()),
            kv("created_unix_ns", self.created_ns.to_string()),
            kv("created", rfc3339(self.created_ns)),
            kv(
                "wal_position",
                self.wal_position.map_or("none".into(), |p| p.to_string()),
            ),
            kv("state_start_unix_ns", self.state_start_ns.to_string()),
            kv("clean_shutdown", self.clean_shutdown.to_string()),
            kv("shards", self.shards.to_string()),
            kv("series", self.series.to_string()),
            kv("streams", self.streams.to_string()),
            kv("series_budget", self.series_budget.to_string()),
        ]
    }

    fn from_kv(kv: &[KeyValue]) -> Result<Self, CheckpointError> {
        let get = |k: &str| -> Result<&str, CheckpointError> {
            kv.iter()
                .find(|e| e.key.strip_prefix(PREFIX) == Some(k))
                .and_then(|e| e.value.as_deref())
                .ok_or_else(|| CheckpointError::Format(format!("footer lacks {PREFIX}{k}")))
        };
        let num = |k: &str| -> Result<u64, CheckpointError> {
            get(k)?
                .parse()
                .map_err(|_| CheckpointError::Format(format!("{PREFIX}{k} is not a number")))
        };
        let format_version = u32::try_from(num("format_version")?).unwrap_or(u32::MAX);
        if format_version != FORMAT_VERSION {
            return Err(CheckpointError::Format(format!(
                "format version {format_version}, this spanagg reads {FORMAT_VERSION}"
            )));
        }
        let wal_position = match get("wal_position")? {
            "none" => None,
            p => Some(p.parse().map_err(|e: String| {
                CheckpointError::Format(format!("{PREFIX}wal_position: {e}"))
            })?),
        };
        Ok(Self {
            format_version,
            schema_hash: get("schema_hash")?.to_owned(),
            created_ns: num("created_unix_ns")?,
            wal_position,
            state_start_ns: num("state_start_unix_ns")?,
            clean_shutdown: get("clean_shutdown")? == "true",
            shards: u32::try_from(num("shards")?).unwrap_or(0),
            series: num("series")?,
            streams: num("streams")?,
            series_budget: num("series_budget").unwrap_or(0),
        })
    }

    /// The footer as (key, value) pairs, for `spanagg inspect`.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.to_kv()
            .into_iter()
            .map(|e| (e.key, e.value.unwrap_or_default()))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    // Transparent: the I/O error's own text, once (not again as its source).
    #[error(transparent)]
    Io(#[from] io::Error),
    // Its text in the message and no source, so logs (`%e`) and chains (`{e:#}`) both show it
    // once.
    #[error("{0}")]
    Parquet(parquet::errors::ParquetError),
    #[error("not a checkpoint this spanagg can read: {0}")]
    Format(String),
    /// A stream moved to another series' key while its shard was read in parts, so it may have
    /// been read twice or not at all; the checkpoint is taken again with shards read whole.
    #[error("a stream moved to another series while its shard was read in parts; taken again with shards read whole")]
    Moved,
}

impl From<parquet::errors::ParquetError> for CheckpointError {
    fn from(e: parquet::errors::ParquetError) -> Self {
        Self::Parquet(e)
    }
}

impl CheckpointError {
    /// A short reason for the failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io(e) if is_disk_full(e) => "disk_full",
            Self::Io(_) => "io",
            // The Parquet writer wraps the file's I/O errors: look through to them.
            Self::Parquet(e) => match io_cause(e) {
                Some(io) if is_disk_full(io) => "disk_full",
                Some(_) => "io",
                None => "encode",
            },
            Self::Format(_) => "format",
            Self::Moved => "moved",
        }
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(28) || e.kind() == io::ErrorKind::StorageFull
}

/// The I/O error somewhere in `e`'s chain of causes, if there is one.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

pub fn file_name(seq: u64) -> String {
    format!("checkpoint-{seq:010}.parquet")
}

/// Checkpoint files in `dir`, oldest first, by sequence number.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    numbered_files(dir, "checkpoint-", ".parquet")
}

/// Removes temp files a crash left behind.
pub fn remove_temps(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(&path)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Renames a checkpoint that must not be read again (`suffix`: `.corrupt`, `.stale`), keeping it
/// for a post-mortem; it no longer lists as a checkpoint.
pub fn set_aside(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let mut to = path.as_os_str().to_owned();
    to.push(suffix);
    let to = PathBuf::from(to);
    std::fs::rename(path, &to)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(to)
}

/// Marks a checkpoint as restored, so that it is never restored again: renamed `*.restored`,
/// and every older checkpoint renamed `*.stale`. Without a WAL, once a restored state has
/// served anything, only the next clean stop's checkpoint is the truth: restoring this one (or
/// an older one) after a crash would serve counters below what was scraped since. The previous
/// `*.restored` file goes (a failure to remove it is only logged).
pub fn mark_restored(path: &Path) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    for entry in std::fs::read_dir(dir)? {
        let old = entry?.path();
        if old
            .to_str()
            .is_some_and(|p| p.ends_with(".parquet.restored"))
        {
            if let Err(e) = std::fs::remove_file(&old) {
                tracing::warn!(path = %old.display(), error = %e, "could not remove an old restored checkpoint");
            }
        }
    }
    // The older ones first: cut short half way, this one is still the newest (and, as nothing
    // was served yet, restorable); never an older one.
    for (_, older) in list(dir)? {
        if older != path {
            set_aside(&older, ".stale")?;
        }
    }
    set_aside(path, ".restored")
}

/// Writes checkpoint `seq` into `dir` from `batches` in one go: [`FileWriter`] for callers
/// that hold the whole state at once (tests, benches).
pub fn write(
    dir: &Path,
    seq: u64,
    meta: &Meta,
    batches: &[RecordBatch],
) -> Result<(PathBuf, u64), CheckpointError> {
    let mut w = FileWriter::create(dir, seq)?;
    batches.iter().try_for_each(|b| w.write(b))?;
    w.finish(meta)
}

/// Rows per Parquet row group: ~1 MiB held by the encoder (a footer entry per group, ~60 for a
/// million streams, is the cost of going smaller).
const ROW_GROUP_ROWS: usize = 16 * 1024;

/// A checkpoint file being written: batches one after another (so a caller can free each part
/// once it is written), then the footer with [`Meta`], which is known only after the last part.
/// Until [`finish`](Self::finish) the file has a temporary name; a writer dropped unfinished
/// (an error, a stopped shard) removes it, so the previous checkpoints stay the newest.
pub struct FileWriter {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    // `None` once finished.
    writer: Option<ArrowWriter<File>>,
}

impl FileWriter {
    pub fn create(dir: &Path, seq: u64) -> Result<Self, CheckpointError> {
        let path = dir.join(file_name(seq));
        let tmp = dir.join(format!("{}.tmp", file_name(seq)));
        let file = File::create(&tmp)?;
        // Row groups bound what the encoder holds whatever the state's size: the encoded rows
        // wait in memory until their group is written, on top of the part being encoded.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_column_dictionary_enabled("key_lo".into(), false)
            .set_column_dictionary_enabled("key_hi".into(), false)
            .set_created_by(format!("spanagg {}", env!("CARGO_PKG_VERSION")))
            .build();
        match ArrowWriter::try_new(file, checkpoint_schema(), Some(props)) {
            Ok(w) => Ok(Self {
                dir: dir.to_owned(),
                path,
                tmp,
                writer: Some(w),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e.into())
            }
        }
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), CheckpointError> {
        match &mut self.writer {
            Some(w) if batch.num_rows() > 0 => Ok(w.write(batch)?),
            _ => Ok(()),
        }
    }

    /// Writes the footer, syncs, and gives the file its final name; returns it with its size.
    pub fn finish(mut self, meta: &Meta) -> Result<(PathBuf, u64), CheckpointError> {
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| CheckpointError::Io(io::Error::other("checkpoint already written")))?;
        for kv in meta.to_kv() {
            w.append_key_value_metadata(kv);
        }
        let written = w
            .into_inner()
            .map_err(CheckpointError::from)
            .and_then(|file| {
                file.sync_all()?;
                let size = file.metadata()?.len();
                drop(file);
                std::fs::rename(&self.tmp, &self.path)?;
                // Failing here leaves a whole, synced file that may not survive a power loss:
                // reported as failed, but kept (with `durability: none` a clean shutdown's
                // checkpoint is the only state there is).
                sync_dir(&self.dir)?;
                Ok(size)
            });
        match written {
            Ok(size) => Ok((self.path.clone(), size)),
            Err(e) => {
                let _ = std::fs::remove_file(&self.tmp);
                Err(e)
            }
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads only the footer.
pub fn read_meta(path: &Path) -> Result<Meta, CheckpointError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    meta_of(&builder)
}

fn meta_of(b: &ParquetRecordBatchReaderBuilder<File>) -> Result<Meta, CheckpointError> {
    let kv = b
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .ok_or_else(|| CheckpointError::Format("no spanagg footer metadata".into()))?;
    let meta = Meta::from_kv(kv)?;
    if meta.schema_hash != schema_hash() {
        return Err(CheckpointError::Format(format!(
            "schema hash {} differs from this spanagg's {}",
            meta.schema_hash,
            schema_hash()
        )));
    }
    Ok(meta)
}

/// Loads a checkpoint into `states` (fresh shards). Rows go back to the shard that wrote them
/// when the shard count is unchanged, else to the shard their series routes to. On an error
/// `states` hold part of the file: the caller starts again from fresh ones.
pub fn load(path: &Path, states: &mut [ShardState]) -> Result<Meta, CheckpointError> {
    // The Parquet reader can panic on damaged pages that pass their checks (an out-of-bounds
    // slice in level decoding): a damaged file is an error to set aside, never a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load_inner(path, states)))
        .unwrap_or_else(|_| {
            Err(CheckpointError::Format(
                "the Parquet reader failed on damaged data".into(),
            ))
        })
}

fn load_inner(path: &Path, states: &mut [ShardState]) -> Result<Meta, CheckpointError> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path)?)?;
    let meta = meta_of(&builder)?;
    let n = states.len();
    let same_layout = meta.shards as usize == n;
    let bad = |e: super::rows::ReadError| CheckpointError::Format(e.to_string());
    let (mut series, mut streams) = (0u64, 0u64);
    // What each series shows a scrape: two rows showing the same would serve it twice.
    let mut shown = std::collections::HashSet::new();
    for batch in builder.with_batch_size(16 * 1024).build()? {
        let batch = batch.map_err(|e| CheckpointError::Format(e.to_string()))?;
        let c = Columns::new(&batch);
        for i in 0..c.rows() {
            let record = c.record(i).map_err(bad)?;
            let route_key = match record {
                "stream" | "overflowed" => c.series_key(i).map_err(bad)?,
                _ => None,
            };
            let shard = if same_layout {
                c.shard(i).map_err(bad)? as usize
            } else {
                shard_for(route_key.map_or_else(|| c.row_key(i), Ok).map_err(bad)?, n)
            };
            let state = states
                .get_mut(shard)
                .ok_or_else(|| CheckpointError::Format(format!("row {i}: shard {shard}")))?;
            match record {
                "series" => {
                    if !shown.insert(restore_series_row(state, &c, i).map_err(bad)?) {
                        return Err(CheckpointError::Format(format!("row {i}: a series twice")));
                    }
                    series += 1;
                }
                "stream" => {
                    restore_stream_row(state, &c, i).map_err(bad)?;
                    streams += 1;
                }
                "pod" => restore_pod_row(state, &c, i).map_err(bad)?,
                "overflowed" => {
                    let global = matches!(c.value(i).map_err(bad)?, Value::Counter(Some(1), _));
                    let series = route_key.unwrap_or(0);
                    state.restore_sticky(c.row_key(i).map_err(bad)?, series, global)
                }
                other => return Err(CheckpointError::Format(format!("record kind `{other}`"))),
            }
        }
    }
    if series != meta.series || streams != meta.streams {
        return Err(CheckpointError::Format(format!(
            "footer promises {} series and {} streams, file holds {series} and {streams}",
            meta.series, meta.streams
        )));
    }
    Ok(meta)
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
