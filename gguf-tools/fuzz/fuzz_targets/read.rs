#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Any outcome but a panic, abort or runaway allocation is fine.
    if let Ok(file) = gguf_tools::gguf::read_from(data, data.len() as u64) {
        // Re-encoding a parsed header must not panic either.
        let _ = file.write_header(&mut std::io::sink());
        let _ = gguf_tools::filters::QFilters::from_metadata(&file.metadata);
        let _ = gguf_tools::inspect::report("fuzz", &file);
    }
});
