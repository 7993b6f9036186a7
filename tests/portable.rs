//! The default build must run on any x86-64 CPU with AVX2: no AMX instructions in the linked
//! llama.cpp code, whatever CPU built it. A machine without AMX still catches a regression,
//! because this reads the machine code instead of running it.

#![cfg(target_arch = "x86_64")]

use std::path::{Path, PathBuf};
use std::process::Command;

/// AMX mnemonics as objdump prints them: tile loads/stores, tile config, the dot products.
const AMX: &[&str] = &[
    "ldtilecfg",
    "sttilecfg",
    "tilerelease",
    "tileloadd",
    "tilestored",
    "tilezero",
    "tdpb",
];

fn objdump(args: &[&str], file: &Path) -> String {
    let out = Command::new("objdump")
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("objdump not runnable ({e}): run scripts/setup.sh (binutils)"));
    assert!(
        out.status.success(),
        "objdump failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn amx_lines(disassembly: &str) -> Vec<&str> {
    disassembly
        .lines()
        .filter(|l| {
            // The mnemonic is the first word of the last tab-separated field (after the
            // address, and the raw bytes when objdump shows them).
            let mnemonic = l.split('\t').nth(1).and_then(|_| l.rsplit('\t').next());
            let mnemonic = mnemonic.and_then(|i| i.split_whitespace().next());
            mnemonic.is_some_and(|m| AMX.iter().any(|a| m.starts_with(a)))
        })
        .collect()
}

/// The files holding llama.cpp's machine code: the binary itself when linked statically, plus
/// the ggml/llama shared libraries it loads when built with `dynamic-link`.
fn code_files() -> Vec<PathBuf> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_qfilters"));
    let mut files = vec![bin.clone()];
    if let Ok(out) = Command::new("ldd").arg(&bin).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(path) = line
                .split("=>")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
            {
                if path.contains("libggml") || path.contains("libllama") {
                    files.push(PathBuf::from(path));
                }
            }
        }
    }
    files
}

#[test]
fn the_detector_sees_amx_when_it_is_there() {
    // ldtilecfg (%rax); tilerelease; tileloadd (%rax,%rcx,1),%tmm0; tdpbssd %tmm1,%tmm2,%tmm0
    let bytes = [
        0xc4, 0xe2, 0x78, 0x49, 0x00, 0xc4, 0xe2, 0x78, 0x49, 0xc0, 0xc4, 0xe2, 0x7b, 0x4b, 0x04,
        0x08, 0xc4, 0xe2, 0x73, 0x5e, 0xc2,
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("amx.bin");
    std::fs::write(&file, bytes).unwrap();
    let text = objdump(&["-D", "-b", "binary", "-m", "i386:x86-64"], &file);
    assert_eq!(amx_lines(&text).len(), 4, "{text}");
}

#[test]
#[cfg_attr(
    feature = "amx",
    ignore = "built with --features amx, which asks for AMX on purpose"
)]
fn default_build_has_no_amx_and_uses_avx2() {
    let mut avx2_seen = false;
    for file in code_files() {
        let text = objdump(&["-d", "--no-show-raw-insn"], &file);
        let found = amx_lines(&text);
        assert!(
            found.is_empty(),
            "{} holds {} AMX instructions (first: {}): the default build must never use AMX",
            file.display(),
            found.len(),
            found[0].trim()
        );
        // ggml's vector kernels use 256-bit registers in the AVX2 baseline: proof that the
        // disassembly covered llama.cpp's code at all.
        avx2_seen |= text.contains("%ymm");
    }
    assert!(
        avx2_seen,
        "no AVX2 code found: did the disassembly read llama.cpp's code?"
    );
}
