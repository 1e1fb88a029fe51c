#![no_main]

use std::sync::Once;

static HOOK: Once = Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The loader turns a panic inside the Parquet reader into "damaged file" (see
    // `checkpoint::load`); libFuzzer's hook would abort on it first. Panics anywhere else,
    // our own code included, still abort and are reported.
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let file = info.location().map_or("", |l| l.file());
            if !(file.contains("/parquet-") || file.contains("/arrow-")) {
                eprintln!("{info}");
                std::process::abort();
            }
        }))
    });
    spanagg::fuzzing::checkpoint(data);
});
