#![no_main]

//! The safetensors filters loader on arbitrary bytes, through its real entry point
//! (`QFilters::load` on a file, and on the folder that holds it, with or without a
//! config.json beside it). Any outcome but a panic, abort or runaway allocation is fine; a
//! file that loads must be self-consistent.

use std::path::PathBuf;
use std::sync::OnceLock;

use gguf_tools::filters::QFilters;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // Memory-backed when the machine has /dev/shm: a file per iteration stays cheap.
        let root = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = root.join(format!("qfilters-fuzz-filters-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch folder");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // The low byte picks where the safetensors bytes end and config.json begins.
    let cut = if rest.is_empty() {
        0
    } else {
        usize::from(flags >> 1) * rest.len() / 127
    }
    .min(rest.len());
    let (tensors, config) = rest.split_at(cut);
    let d = dir();
    let file = d.join("model.safetensors");
    let config_path = d.join("config.json");
    std::fs::write(&file, tensors).expect("write");
    if flags & 1 == 1 {
        std::fs::write(&config_path, config).expect("write");
    } else {
        let _ = std::fs::remove_file(&config_path);
    }
    for path in [file.as_path(), d.as_path()] {
        if let Ok(f) = QFilters::load(path) {
            let [layers, heads, dim] = f.shape();
            assert!(layers > 0 && heads > 0 && dim > 0);
            for l in 0..layers {
                for h in 0..heads {
                    let v = f.filter(l, h);
                    assert_eq!(v.len(), dim);
                    assert!(v.iter().all(|x| x.is_finite()));
                }
            }
        }
    }
});
