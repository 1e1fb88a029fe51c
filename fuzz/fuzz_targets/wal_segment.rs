#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    spanagg::fuzzing::wal_segment(data);
});
