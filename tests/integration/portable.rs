//! The default build must run on any x86-64 CPU: no AMX instructions in the linked llama.cpp
//! code nor in any CPU variant ggml may load, whatever CPU built it. A machine without AMX
//! still catches a regression, because this reads the machine code instead of running it.
//! With runtime dispatch (the default on x86-64 Linux), the variant ggml loads must be the
//! best one for this CPU.

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

/// The CPU variants build.rs builds for dispatch (vendor/patches/cpu-variants.patch).
const VARIANTS: &[&str] = &["x64", "haswell", "skylakex", "icelake", "zen4", "alderlake"];

/// The `libggml-cpu-<tag>.so` modules of this build, by tag.
fn variant_files() -> Vec<(String, PathBuf)> {
    let dir = Path::new(env!("QFILTERS_BUILD_BACKEND_DIR"));
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let tag = name.strip_prefix("libggml-cpu-")?.strip_suffix(".so")?;
                    Some((tag.to_string(), e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The files holding llama.cpp's machine code: the binary itself when linked statically, the
/// ggml/llama shared libraries it loads when built with `dynamic-link` or dispatch, and every
/// CPU variant ggml may load.
fn code_files() -> Vec<PathBuf> {
    let bin = PathBuf::from(crate::common::bin());
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
    files.extend(variant_files().into_iter().map(|(_, path)| path));
    files
}

/// The variant ggml's score picks on a CPU with these /proc/cpuinfo flags: the one using the
/// most features the CPU has (ggml-cpu/arch/x86/cpu-feats.cpp weighs AVX-512 above AVX-VNNI).
fn best_variant(flags: &[&str]) -> &'static str {
    let has = |all: &[&str]| all.iter().all(|f| flags.contains(f));
    let haswell = has(&["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"]);
    let avx512 = haswell && has(&["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"]);
    let icelake = avx512 && has(&["avx512vbmi", "avx512_vnni"]);
    if icelake && has(&["avx512_bf16"]) {
        "zen4"
    } else if icelake {
        "icelake"
    } else if avx512 {
        "skylakex"
    } else if haswell && has(&["avx_vnni"]) {
        "alderlake"
    } else if haswell {
        "haswell"
    } else {
        "x64"
    }
}

fn cpu_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
    let line = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .expect("a flags line in /proc/cpuinfo");
    line.split(':')
        .nth(1)
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
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
        // ggml's vector kernels use 256-bit registers from the AVX2 baseline up: proof that
        // the disassembly covered llama.cpp's code at all.
        avx2_seen |= text.contains("%ymm");
    }
    assert!(
        avx2_seen,
        "no AVX2 code found: did the disassembly read llama.cpp's code?"
    );
}

#[test]
#[cfg_attr(
    not(qf_dispatch_build),
    ignore = "only a dispatch build (the default) has per-CPU variants"
)]
fn dispatch_builds_each_variant_for_its_own_cpu() {
    let files = variant_files();
    let tags: Vec<&str> = files.iter().map(|(t, _)| t.as_str()).collect();
    let mut want = VARIANTS.to_vec();
    want.sort();
    assert_eq!(
        tags,
        want,
        "the CPU variants in {}",
        env!("QFILTERS_BUILD_BACKEND_DIR")
    );
    for (tag, file) in &files {
        let text = objdump(&["-d", "--no-show-raw-insn"], file);
        // AVX-512 variants must hold 512-bit code, the others none: a variant built with the
        // wrong flags would either lose the speed dispatch is for or fault on older CPUs.
        let wants_avx512 = matches!(tag.as_str(), "skylakex" | "icelake" | "zen4");
        assert_eq!(
            text.contains("%zmm"),
            wants_avx512,
            "{}: 512-bit registers {}expected",
            file.display(),
            if wants_avx512 { "" } else { "not " }
        );
        if tag != "x64" {
            assert!(text.contains("%ymm"), "{}: no 256-bit code", file.display());
        }
    }
}

#[test]
#[cfg_attr(
    not(qf_dispatch_build),
    ignore = "only a dispatch build (the default) has per-CPU variants"
)]
fn dispatch_loads_the_best_variant_for_this_cpu() {
    let flags = cpu_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let want = best_variant(&flags);
    let out = Command::new(crate::common::bin())
        .arg("--version")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("cpu: dispatch, variant {want};")),
        "expected variant {want} for this CPU: {text}"
    );
}

#[test]
fn the_variant_table_follows_ggml_scores() {
    let haswell = ["sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"];
    let avx512 = ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        haswell.iter().chain(extra).copied().collect()
    };
    assert_eq!(best_variant(&["sse2"]), "x64");
    assert_eq!(best_variant(&with(&[])), "haswell");
    assert_eq!(best_variant(&with(&["avx_vnni"])), "alderlake");
    assert_eq!(best_variant(&with(&avx512)), "skylakex");
    let mut ice = with(&avx512);
    ice.extend(["avx512vbmi", "avx512_vnni", "avx_vnni"]);
    assert_eq!(best_variant(&ice), "icelake");
    ice.push("avx512_bf16");
    assert_eq!(best_variant(&ice), "zen4");
}

#[test]
#[cfg_attr(
    not(qf_dispatch_build),
    ignore = "only a dispatch build (the default) has per-CPU variants"
)]
fn a_missing_cpu_backend_fails_with_one_clear_line() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(crate::common::bin())
        .args(["run", "-m", crate::common::MODEL, "-p", "hi", "-n", "1"])
        .env("QFILTERS_BACKEND_DIR", empty.path())
        .env("QFILTERS_THREADS", "1")
        .current_dir(crate::common::root())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("qfilters: no CPU backend: no libggml-cpu-*.so usable on this CPU in "),
        "{err}"
    );
}
