use super::format::RECORD_HEADER;
use super::*;
use crate::storage::ScratchDir;

fn dir() -> ScratchDir {
    ScratchDir::new("wal")
}

fn read_all(dir: &Path, from: Position) -> (Vec<Vec<u8>>, ReplayStats) {
    let mut out = Vec::new();
    let stats = replay(dir, from, |_, p| out.push(p.to_vec())).expect("replay");
    (out, stats)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

#[test]
fn appended_records_replay_in_order_across_segments() {
    let d = dir();
    let rt = runtime();
    let wal = Wal::start(&d.0, 1, 42, 4096, StorageMetrics::default()).expect("start");
    let records: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 300]).collect();
    rt.block_on(async {
        for r in &records {
            wal.append(KIND_METRICS, Bytes::from(r.clone()))
                .await
                .expect("append");
        }
    });
    drop(wal);
    assert!(
        segments(&d.0).unwrap().len() > 1,
        "4 KiB segments must roll"
    );
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got, records);
    assert_eq!(stats.truncated, 0);
    assert_eq!(
        segment_state_start(&segments(&d.0).unwrap()[0].1).unwrap(),
        42
    );
}

#[test]
fn a_rotation_position_skips_everything_before_it() {
    let d = dir();
    let rt = runtime();
    let wal = Wal::start(&d.0, 1, 0, 1 << 20, StorageMetrics::default()).expect("start");
    let pos = rt.block_on(async {
        wal.append(KIND_METRICS, Bytes::from_static(b"before"))
            .await
            .unwrap();
        let pos = wal.rotate().await.unwrap();
        wal.append(KIND_METRICS, Bytes::from_static(b"after"))
            .await
            .unwrap();
        pos
    });
    drop(wal);
    let (got, _) = read_all(&d.0, pos);
    assert_eq!(got, vec![b"after".to_vec()]);
    assert_eq!(remove_before(&d.0, pos.segment).unwrap(), 1);
    let (got, _) = read_all(&d.0, Position::default());
    assert_eq!(got, vec![b"after".to_vec()]);
}

/// Logs three 100-byte records (all 0s, 1s, 2s) into one segment; returns its path.
fn three_records(dir: &Path) -> PathBuf {
    let rt = runtime();
    let wal = Wal::start(dir, 1, 0, 1 << 20, StorageMetrics::default()).expect("start");
    rt.block_on(async {
        for i in 0..3u8 {
            wal.append(KIND_METRICS, Bytes::from(vec![i; 100]))
                .await
                .unwrap();
        }
    });
    drop(wal);
    segments(dir).unwrap().pop().unwrap().1
}

#[test]
fn a_torn_tail_is_truncated_and_counted_and_earlier_records_survive() {
    let d = dir();
    let path = three_records(&d.0);
    let full = std::fs::metadata(&path).unwrap().len();
    // Cut the last record in half, as a crash mid-write would.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 50).unwrap();
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got, vec![vec![0u8; 100], vec![1u8; 100]]);
    assert_eq!(stats.truncated, 1);
    let record = (RECORD_HEADER + 100) as u64;
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        HEADER_LEN + 2 * record,
        "the torn tail is cut off"
    );
    // A second replay finds a clean log.
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got.len(), 2);
    assert_eq!(stats.truncated, 0);
}

#[test]
fn a_flipped_bit_mid_segment_skips_that_record_only_and_keeps_a_copy() {
    let d = dir();
    let path = three_records(&d.0);
    let mut bytes = std::fs::read(&path).unwrap();
    let second_payload = HEADER_LEN as usize + RECORD_HEADER + 100 + RECORD_HEADER + 7;
    bytes[second_payload] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got.len(), 2, "the first and the third survive");
    assert_eq!(got[0], vec![0u8; 100]);
    assert_eq!((stats.truncated, stats.corrupt), (0, 1));
    assert!(
        path.with_extension("wal.corrupt").exists(),
        "a copy is kept aside"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the segment is not cut"
    );
}

#[test]
fn a_damaged_length_is_a_torn_tail_and_records_inside_payloads_are_never_replayed() {
    let d = dir();
    let rt = runtime();
    let wal = Wal::start(&d.0, 1, 0, 1 << 20, StorageMetrics::default()).expect("start");
    // The second record's payload holds a complete, valid record: what a client could send.
    let mut forged = Vec::new();
    encode_record(&mut forged, KIND_METRICS, b"forged").unwrap();
    rt.block_on(async {
        for p in [
            vec![0u8; 100],
            [vec![7u8; 10], forged.clone()].concat(),
            vec![2u8; 100],
        ] {
            wal.append(KIND_METRICS, Bytes::from(p)).await.unwrap();
        }
    });
    drop(wal);
    let path = segments(&d.0).unwrap().pop().unwrap().1;
    let mut bytes = std::fs::read(&path).unwrap();
    // The second record's length field: its end cannot be trusted any more.
    let second = HEADER_LEN as usize + RECORD_HEADER + 100;
    bytes[second + 2] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got, vec![vec![0u8; 100]], "{stats:?}");
    assert!(got.iter().all(|p| p != b"forged"));
    assert_eq!((stats.truncated, stats.corrupt), (1, 0));
}

#[test]
fn damage_in_the_last_record_is_a_torn_tail() {
    let d = dir();
    let path = three_records(&d.0);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (got, stats) = read_all(&d.0, Position::default());
    assert_eq!(got.len(), 2);
    assert_eq!((stats.truncated, stats.corrupt), (1, 0));
    assert!(
        std::fs::read(&path).unwrap().len() < bytes.len(),
        "truncated"
    );
}

#[test]
fn a_segment_without_a_header_is_set_aside() {
    let d = dir();
    std::fs::write(d.0.join(format!("{:020}.wal", 3)), b"SPAN").unwrap();
    let (got, stats) = read_all(&d.0, Position::default());
    assert!(got.is_empty());
    assert_eq!(stats.truncated, 1);
    assert!(segments(&d.0).unwrap().is_empty());
}

#[test]
fn a_write_error_is_reported_and_the_next_append_uses_a_new_segment() {
    let d = dir();
    let rt = runtime();
    // Segment 1 is /dev/full: every write to it fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", d.0.join(format!("{:020}.wal", 1))).unwrap();
    let metrics = StorageMetrics::default();
    let wal = Wal::start(&d.0, 1, 0, 1 << 20, metrics.clone()).expect("start");
    rt.block_on(async {
        let err = wal
            .append(KIND_METRICS, Bytes::from_static(b"lost"))
            .await
            .unwrap_err();
        assert!(matches!(err, WalError::Io(_)), "{err}");
        wal.append(KIND_METRICS, Bytes::from_static(b"kept"))
            .await
            .expect("second try");
    });
    drop(wal);
    assert_eq!(metrics.wal_errors.get(), 1);
    std::fs::remove_file(d.0.join(format!("{:020}.wal", 1))).unwrap();
    let (got, _) = read_all(&d.0, Position::default());
    assert_eq!(got, vec![b"kept".to_vec()]);
}

#[test]
fn positions_print_and_parse() {
    let p = Position {
        segment: 7,
        offset: 20,
    };
    assert_eq!(p.to_string().parse::<Position>(), Ok(p));
    assert!("7".parse::<Position>().is_err());
}
