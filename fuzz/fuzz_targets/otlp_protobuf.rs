#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    spanagg::fuzzing::otlp_protobuf(data);
});
