//! Builds the pinned llama.cpp with its own CMake and generates Rust bindings for it.
//!
//! Source: the `llama.cpp/` folder of the crates.io package `llama-cpp-sys-2` (pinned by
//! version and sha256 below), fetched with cargo itself and unpacked under `vendor/`.
//! `LLAMA_CPP_DIR` points the build at a user's own checkout instead.

use std::env;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SOURCE_PACKAGE: &str = "llama-cpp-sys-2";
const SOURCE_VERSION: &str = "0.1.161";
const SOURCE_SHA256: &str = "e9bea77fde41bbc15a278891cd5edd2ba07c5260d162614b41080ba1f100b39b";

/// Stops the build with one sentence that says what to do; cargo shows it as an error.
fn fail(message: &str) -> ! {
    println!("cargo::error={message}");
    std::process::exit(1);
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=LLAMA_CPP_DIR");
    println!("cargo::rerun-if-env-changed=CMAKE_CUDA_ARCHITECTURES");
    println!("cargo::rerun-if-env-changed=QFILTERS_LLAMA_LIB_DIR");
    println!("cargo::rerun-if-env-changed=DOCS_RS");
    // Set when llama.cpp's CPU code is built as per-CPU variants: the tests that inspect those
    // variants are ignored (with this reason shown) on other builds.
    println!("cargo::rustc-check-cfg=cfg(qf_dispatch_build)");

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    let dynamic = env::var_os("CARGO_FEATURE_DYNAMIC_LINK").is_some();
    let rpc = env::var_os("CARGO_FEATURE_RPC").is_some();

    let (source, patches) = match env::var_os("LLAMA_CPP_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if !dir.join("include/llama.h").is_file() {
                fail(&format!(
                    "LLAMA_CPP_DIR={} has no include/llama.h: point it at a llama.cpp checkout, or unset it to use the pinned source",
                    dir.display()
                ));
            }
            // A user's checkout is theirs: never patched. Say what that costs.
            println!(
                "cargo::warning=LLAMA_CPP_DIR is used as is, without qfilters' patches (vendor/patches): with a GPU, the graph hook will be slower, because llama.cpp then computes every graph split as a view (uid 0: no CUDA graph reuse) and synchronises after each one; and on x86-64 Linux the CPU backend is the static AVX2 baseline, not runtime dispatch (ggml's own variant list has an AMX variant); and --rpc-timeout has no effect (ggml-rpc's sockets have no timeout: a host that vanishes is waited for until TCP gives up)"
            );
            (dir, PatchSet::none())
        }
        None => patched_pinned_source(&manifest_dir.join("vendor")),
    };
    // Which patches the linked llama.cpp carries: `qfilters --version` reports it.
    println!("cargo::rustc-env=QFILTERS_LLAMA_PATCHES={}", patches.id);
    // Set when ggml-rpc's sockets honour GGML_RPC_TIMEOUT (vendor/patches): without the patch
    // (LLAMA_CPP_DIR), `--rpc-timeout` has no effect, the CLI says so, and its test is ignored.
    println!("cargo::rustc-check-cfg=cfg(qf_rpc_timeout)");
    if patches.id.contains("rpc-socket-timeout@") {
        println!("cargo::rustc-cfg=qf_rpc_timeout");
    }
    let origin = if env::var_os("LLAMA_CPP_DIR").is_some() {
        "LLAMA_CPP_DIR"
    } else {
        "pinned"
    };
    println!("cargo::rustc-env=QFILTERS_LLAMA_SOURCE={origin}");

    if env::var_os("DOCS_RS").is_some() {
        // Documentation only (docs.rs sets DOCS_RS; `DOCS_RS=1 cargo doc` does the same
        // here): the bindings are generated from the headers alone, llama.cpp is neither
        // compiled nor linked, and cmake and a C++ compiler are not needed. The headers are
        // those chosen above: LLAMA_CPP_DIR, else the pinned package with its patches,
        // unpacked under vendor/ from cargo's registry cache. Without network (docs.rs), that
        // package must already be in the registry cache; when it is not, the build stops with
        // the message of `locate_or_fetch_crate`. bindgen still needs libclang. The values
        // the code reads with `env!` name the build it describes: none here.
        println!("cargo::rustc-env=QFILTERS_CPU_BUILD=docs");
        println!("cargo::rustc-env=QFILTERS_BUILD_BACKEND_DIR=");
        generate_bindings(&source);
        return;
    }

    check_tool(
        "cmake",
        &["--version"],
        "cmake is missing: install it (Debian/Ubuntu: `apt-get install -y cmake`)",
    );
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    check_tool(
        &cxx,
        &["--version"],
        "no C++ compiler found: install one (Debian/Ubuntu: `apt-get install -y g++`) or set CXX",
    );
    if cuda {
        check_tool(
            "nvcc",
            &["--version"],
            "feature `cuda` needs the CUDA toolkit: nvcc is not on PATH (install the CUDA toolkit, or build without `--features cuda`)",
        );
    }

    let (lib_dir, cpu_build) = match env::var_os("QFILTERS_LLAMA_LIB_DIR") {
        // Prebuilt libraries (e.g. built on a GPU machine from the same source): only link.
        Some(dir) => (PathBuf::from(dir), "prebuilt"),
        None => build_llama(&source, &patches, &manifest_dir, cuda, dynamic, rpc),
    };
    let dispatch = is_dispatch_build(&lib_dir);
    // What `qfilters --version` reports, and where the binary looks for CPU variants when
    // none sits beside it (src/ffi/cpu_backend.rs).
    println!("cargo::rustc-env=QFILTERS_CPU_BUILD={cpu_build}");
    if cpu_build == "dispatch" {
        println!("cargo::rustc-cfg=qf_dispatch_build");
    }
    println!(
        "cargo::rustc-env=QFILTERS_BUILD_BACKEND_DIR={}",
        lib_dir.display()
    );
    build_exception_shim(&source);
    link(&lib_dir, cuda, dynamic || dispatch, dispatch, rpc);
    generate_bindings(&source);
}

/// Compiles src/ffi/shim.cpp, the try/catch barrier around every llama.cpp call that can
/// throw. Before `link`, so the linker sees the shim ahead of the libllama it calls.
fn build_exception_shim(source: &Path) {
    println!("cargo::rerun-if-changed=src/ffi/shim.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/ffi/shim.cpp")
        .include(source.join("include"))
        .include(source.join("ggml/include"))
        .warnings(true)
        .compile("qfilters_ffi_shim");
}

fn check_tool(program: &str, args: &[&str], message: &str) {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        fail(message);
    }
}

/// Returns `vendor/llama.cpp-<version>`, fetching and unpacking it first when absent.
fn fetch_pinned_source(vendor: &Path) -> PathBuf {
    let dest = vendor.join(format!("llama.cpp-{SOURCE_VERSION}"));
    let stamp = dest.join(".qfilters-sha256");
    if fs::read_to_string(&stamp)
        .map(|s| s.trim() == SOURCE_SHA256)
        .unwrap_or(false)
    {
        return dest;
    }
    let archive = locate_or_fetch_crate();
    let mut bytes = Vec::new();
    if let Err(e) = fs::File::open(&archive).and_then(|mut f| f.read_to_end(&mut bytes)) {
        fail(&format!("cannot read {}: {e}", archive.display()));
    }
    let digest = sha256_hex(&bytes);
    if digest != SOURCE_SHA256 {
        fail(&format!(
            "{} has sha256 {digest}, expected {SOURCE_SHA256}: delete it and build again",
            archive.display()
        ));
    }
    let _ = fs::remove_dir_all(&dest);
    let prefix = format!("{SOURCE_PACKAGE}-{SOURCE_VERSION}/llama.cpp/");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let entries = match tar.entries() {
        Ok(e) => e,
        Err(e) => fail(&format!("cannot read {}: {e}", archive.display())),
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => fail(&format!("corrupt archive {}: {e}", archive.display())),
        };
        let path = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let Some(relative) = path.strip_prefix(&prefix) else {
            continue;
        };
        if relative.is_empty() || relative.split('/').any(|part| part == "..") {
            continue;
        }
        let target = dest.join(relative);
        if let Some(parent) = target.parent() {
            let _ = fs::create_dir_all(parent);
        }
        if let Err(e) = entry.unpack(&target) {
            fail(&format!("cannot unpack {}: {e}", target.display()));
        }
    }
    if let Err(e) = fs::write(&stamp, SOURCE_SHA256) {
        fail(&format!("cannot write {}: {e}", stamp.display()));
    }
    dest
}

/// The patches applied to the llama.cpp source, as recorded in the binary.
struct PatchSet {
    /// `name@sha8+name@sha8…`, or `none`.
    id: String,
    /// A short digest of `id` for the build folder's name.
    short: String,
}

impl PatchSet {
    fn none() -> PatchSet {
        PatchSet {
            id: "none".into(),
            short: "unpatched".into(),
        }
    }
}

/// One exact-match replacement: `find` must occur exactly once in `file`.
struct Hunk {
    file: String,
    find: String,
    replace: String,
}

/// Reads `vendor/patches/*.patch` (sorted by name). Format: a `file: PATH` line, then hunks
/// `<<<<<<< find` / text / `=======` / text / `>>>>>>> replace`, each line kept verbatim.
fn read_patches(dir: &Path) -> (PatchSet, Vec<(String, Vec<Hunk>)>) {
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut names: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "patch"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut ids = Vec::new();
    let mut all = Vec::new();
    for path in names {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => fail(&format!("cannot read {}: {e}", path.display())),
        };
        let hunks = parse_patch(&text)
            .unwrap_or_else(|why| fail(&format!("{} is malformed: {why}", path.display())));
        ids.push(format!("{name}@{}", &sha256_hex(text.as_bytes())[..8]));
        all.push((name, hunks));
    }
    if ids.is_empty() {
        return (PatchSet::none(), all);
    }
    let id = ids.join("+");
    let short = format!("p{}", &sha256_hex(id.as_bytes())[..8]);
    (PatchSet { id, short }, all)
}

fn parse_patch(text: &str) -> Result<Vec<Hunk>, String> {
    let mut hunks = Vec::new();
    let mut file: Option<String> = None;
    let mut lines = text.split_inclusive('\n');
    while let Some(line) = lines.next() {
        let bare = line.trim_end_matches(['\n', '\r']);
        if let Some(f) = bare.strip_prefix("file: ") {
            file = Some(f.trim().to_string());
        } else if bare == "<<<<<<< find" {
            let file = file.clone().ok_or("a hunk before any `file:` line")?;
            let (mut find, mut replace) = (String::new(), String::new());
            let mut in_find = true;
            loop {
                let line = lines.next().ok_or("a hunk without `>>>>>>> replace`")?;
                let bare = line.trim_end_matches(['\n', '\r']);
                if bare == "=======" && in_find {
                    in_find = false;
                } else if bare == ">>>>>>> replace" && !in_find {
                    break;
                } else if in_find {
                    find.push_str(line);
                } else {
                    replace.push_str(line);
                }
            }
            if find.is_empty() {
                return Err("an empty `find` text".into());
            }
            hunks.push(Hunk {
                file,
                find,
                replace,
            });
        }
    }
    if hunks.is_empty() {
        return Err("no hunks".into());
    }
    Ok(hunks)
}

/// The pinned source with `vendor/patches` applied. A stamp file records the applied set, so
/// a second build is a no-op; a tree carrying another set is unpacked afresh first.
fn patched_pinned_source(vendor: &Path) -> (PathBuf, PatchSet) {
    let (set, patches) = read_patches(&vendor.join("patches"));
    let dest = fetch_pinned_source(vendor);
    let stamp = dest.join(".qfilters-patches");
    match fs::read_to_string(&stamp) {
        Ok(applied) if applied.trim() == set.id => return (dest, set),
        // Another set (or a half-applied one) is in the tree: start from the archive again.
        Ok(_) => {
            let _ = fs::remove_file(dest.join(".qfilters-sha256"));
            fetch_pinned_source(vendor);
        }
        Err(_) => {}
    }
    if let Err(why) = apply_patches(&dest, &patches) {
        // A build stopped half-way may have left part of the set applied: one fresh try.
        let _ = fs::remove_file(dest.join(".qfilters-sha256"));
        fetch_pinned_source(vendor);
        if apply_patches(&dest, &patches).is_err() {
            fail(&why);
        }
    }
    if let Err(e) = fs::write(&stamp, &set.id) {
        fail(&format!("cannot write {}: {e}", stamp.display()));
    }
    (dest, set)
}

/// Applies every hunk in memory first, then writes the changed files.
fn apply_patches(dest: &Path, patches: &[(String, Vec<Hunk>)]) -> Result<(), String> {
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for (name, hunks) in patches {
        for hunk in hunks {
            let path = dest.join(&hunk.file);
            let i = match files.iter().position(|(p, _)| *p == path) {
                Some(i) => i,
                None => {
                    let text = fs::read_to_string(&path).map_err(|e| {
                        format!("patch {name}: cannot read {}: {e}", path.display())
                    })?;
                    files.push((path.clone(), text));
                    files.len() - 1
                }
            };
            let count = files[i].1.matches(hunk.find.as_str()).count();
            if count != 1 {
                return Err(format!(
                    "patch vendor/patches/{name}.patch: its anchor text occurs {count} times in {} (expected exactly once): the llama.cpp source is not the pinned one, or the patch needs updating",
                    hunk.file
                ));
            }
            files[i].1 = files[i].1.replacen(hunk.find.as_str(), &hunk.replace, 1);
        }
    }
    for (path, text) in files {
        fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Finds the pinned `.crate` in cargo's download cache, asking cargo to download it if needed.
fn locate_or_fetch_crate() -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"));
    let file_name = format!("{SOURCE_PACKAGE}-{SOURCE_VERSION}.crate");
    let find = || -> Option<PathBuf> {
        let cache = cargo_home.join("registry/cache");
        fs::read_dir(cache)
            .ok()?
            .flatten()
            .map(|d| d.path().join(&file_name))
            .find(|p| p.is_file())
    };
    if let Some(found) = find() {
        return found;
    }
    // A scratch manifest whose only dependency is the source package: `cargo fetch` downloads
    // and checksums it like any dependency, through the user's own registry configuration.
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    let scratch = out_dir.join("llama-source-fetch");
    let _ = fs::create_dir_all(scratch.join("src"));
    let manifest = format!(
        "[package]\nname = \"qfilters-llama-source\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n[dependencies]\n{SOURCE_PACKAGE} = \"={SOURCE_VERSION}\"\n\n[workspace]\n"
    );
    let _ = fs::write(scratch.join("Cargo.toml"), manifest);
    let _ = fs::write(scratch.join("src/lib.rs"), "");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("fetch")
        .arg("--manifest-path")
        .arg(scratch.join("Cargo.toml"))
        .env_remove("CARGO_TARGET_DIR")
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        fail(&format!(
            "could not download the llama.cpp source ({SOURCE_PACKAGE} {SOURCE_VERSION}) with cargo: check the network, or set LLAMA_CPP_DIR to a llama.cpp checkout"
        ));
    }
    match find() {
        Some(found) => found,
        None => fail(&format!(
            "cargo fetched {SOURCE_PACKAGE} {SOURCE_VERSION} but {file_name} is not in {}",
            cargo_home.join("registry/cache").display()
        )),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Builds libllama and ggml; returns the folder holding the libraries.
///
/// The build folder lives beside cargo's profiles so that `cargo build` and `cargo test`
/// (different profiles) share one llama.cpp build instead of compiling it twice.
fn build_llama(
    source: &Path,
    patches: &PatchSet,
    manifest_dir: &Path,
    cuda: bool,
    dynamic: bool,
    rpc: bool,
) -> (PathBuf, &'static str) {
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| {
            if d.is_absolute() {
                d
            } else {
                manifest_dir.join(d)
            }
        })
        .unwrap_or_else(|| manifest_dir.join("target"));
    // The variant list without AMX is a patch, which a user's own checkout does not get: such
    // a build keeps the static baseline.
    let variants_patched = patches
        .id
        .split('+')
        .any(|p| p.starts_with("cpu-variants@"));
    let cpu = CpuTarget::from_env(cuda, dynamic, variants_patched);
    // ggml loads its CPU variants with dlopen, which needs shared libraries.
    let shared = dynamic || cpu.dispatch;
    // The patch set is part of the name so patched and unpatched objects never mix.
    let flavour = format!(
        "{}{}-{}-{}-{}-{}",
        if cuda { "cuda" } else { "cpu" },
        if rpc { "-rpc" } else { "" },
        if shared { "shared" } else { "static" },
        cpu.name(),
        patches.short,
        &sha256_hex(source.to_string_lossy().as_bytes())[..8]
    );
    let out = target_dir.join("llama-cpp").join(flavour);
    let mut cfg = cmake::Config::new(source);
    cfg.out_dir(&out)
        .profile("Release")
        .define("BUILD_SHARED_LIBS", if shared { "ON" } else { "OFF" })
        .define("LLAMA_BUILD_TOOLS", "OFF")
        .define("LLAMA_BUILD_APP", "OFF")
        .define("LLAMA_BUILD_TESTS", "OFF")
        .define("LLAMA_BUILD_EXAMPLES", "OFF")
        .define("LLAMA_BUILD_SERVER", "OFF")
        .define("LLAMA_BUILD_COMMON", "OFF")
        .define("LLAMA_CURL", "OFF")
        .define("LLAMA_OPENSSL", "OFF")
        // Our own threads drive llama.cpp; OpenMP would add a runtime to link statically.
        .define("GGML_OPENMP", "OFF")
        .define("GGML_CUDA", if cuda { "ON" } else { "OFF" })
        // ggml's RPC backend (client and server), for a model split across hosts.
        .define("GGML_RPC", if rpc { "ON" } else { "OFF" })
        .define("CMAKE_INSTALL_LIBDIR", "lib")
        // ggml installs backend modules (the CPU variants) as "runtime" files: keep them
        // beside the libraries, so one folder holds everything the binary loads.
        .define("CMAKE_INSTALL_BINDIR", "lib");
    cpu.configure(&mut cfg);
    if shared {
        // Shared libraries find each other in their own folder.
        cfg.define("CMAKE_INSTALL_RPATH", "$ORIGIN");
    }
    if cuda {
        let arch = env::var("CMAKE_CUDA_ARCHITECTURES").unwrap_or_else(|_| "native".into());
        cfg.define("CMAKE_CUDA_ARCHITECTURES", arch);
    }
    if Command::new("ninja")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok()
    {
        cfg.generator("Ninja");
    }
    // cmake-rs builds the `install` target, which gathers the libraries in <out>/lib.
    let dst = cfg.build();
    (dst.join("lib"), cpu.name())
}

/// Whether `lib_dir` holds ggml's CPU backend as loadable variants (`libggml-cpu-<tag>.so`)
/// instead of one library to link. Read from the files, so that prebuilt libraries
/// (`QFILTERS_LLAMA_LIB_DIR`) of either kind link the right way.
fn is_dispatch_build(lib_dir: &Path) -> bool {
    let names: Vec<String> = fs::read_dir(lib_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let linked = names
        .iter()
        .any(|n| ["libggml-cpu.a", "libggml-cpu.so", "libggml-cpu.dylib"].contains(&n.as_str()));
    let variant = names
        .iter()
        .any(|n| n.starts_with("libggml-cpu-") && n.ends_with(".so"));
    variant && !linked
}

/// Which CPU instructions the ggml CPU backend may use.
///
/// The default is never the build machine's own CPU: a binary built on a Xeon that advertises
/// AMX inside a VM that faults on it died with SIGILL in ggml's AMX kernels (`tileloadd`), and
/// a `-march=native` binary copied to an older machine dies the same way.
///
/// On x86-64 Linux the default is runtime dispatch: ggml's CPU backend built once per variant
/// in `vendor/patches/cpu-variants.patch` (x64, haswell, skylakex, icelake, zen4, alderlake;
/// no AMX variant), each a module that ggml scores against the running CPU and loads the best
/// of at start-up. A static AVX2 baseline cost 31% decode against `native` on AVX-512
/// (docs/BENCHMARKS.md), more than the 10% the portable build may cost.
///
/// The static baseline (x86-64-v3 minus AVX-512: SSE4.2, AVX, AVX2, BMI2, FMA, F16C, every
/// x86-64 CPU since Haswell / Zen 1) stays for `cuda` and `dynamic-link` builds, whose
/// libraries scripts/device-bench.sh rebuilds on the GPU machine without dispatch, and for
/// x86 targets other than Linux, and for a user's own `LLAMA_CPP_DIR` (unpatched: ggml's own
/// variant list has an AMX one). Other architectures get ggml's own defaults, which already
/// target the architecture's baseline when `GGML_NATIVE` is off.
struct CpuTarget {
    /// `--features native`: `-march=native`, for a binary that only runs where it was built.
    native: bool,
    /// `--features amx`: allow AMX with `native` (off otherwise, even on CPUs that advertise it).
    amx: bool,
    /// Runtime dispatch between CPU variants (`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`).
    dispatch: bool,
    x86: bool,
}

impl CpuTarget {
    fn from_env(cuda: bool, dynamic: bool, variants_patched: bool) -> CpuTarget {
        let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
        let native = env::var_os("CARGO_FEATURE_NATIVE").is_some();
        let x86 = arch == "x86_64" || arch == "x86";
        CpuTarget {
            native,
            amx: env::var_os("CARGO_FEATURE_AMX").is_some(),
            dispatch: arch == "x86_64"
                && os == "linux"
                && !native
                && !cuda
                && !dynamic
                && variants_patched,
            x86,
        }
    }

    /// Part of the build folder's name, so switching features never reuses objects built for
    /// another instruction set. Also compiled into the binary (`qfilters --version`).
    fn name(&self) -> &'static str {
        match (self.native, self.amx, self.dispatch) {
            (false, _, true) => "dispatch",
            (false, _, false) => "baseline",
            (true, false, _) => "native-noamx",
            (true, true, _) => "native-amx",
        }
    }

    fn configure(&self, cfg: &mut cmake::Config) {
        cfg.define("GGML_NATIVE", if self.native { "ON" } else { "OFF" });
        if self.dispatch {
            // Each variant sets its own GGML_<feature> flags (ggml/src/CMakeLists.txt).
            cfg.define("GGML_BACKEND_DL", "ON")
                .define("GGML_CPU_ALL_VARIANTS", "ON");
            return;
        }
        if !self.x86 {
            return;
        }
        if self.native {
            if !self.amx {
                // GCC and Clang let an explicit -mno-* win over -march=native.
                for flag in ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"] {
                    cfg.cflag(flag);
                    cfg.cxxflag(flag);
                }
            }
            return;
        }
        // Explicit, because ggml turns these on by default only when it is not cross-compiling.
        for on in [
            "GGML_SSE42",
            "GGML_AVX",
            "GGML_AVX2",
            "GGML_BMI2",
            "GGML_FMA",
            "GGML_F16C",
        ] {
            cfg.define(on, "ON");
        }
        for off in [
            "GGML_AVX_VNNI",
            "GGML_AVX512",
            "GGML_AVX512_VBMI",
            "GGML_AVX512_VNNI",
            "GGML_AVX512_BF16",
            "GGML_AMX_TILE",
            "GGML_AMX_INT8",
            "GGML_AMX_BF16",
        ] {
            cfg.define(off, "OFF");
        }
    }
}

fn link(lib_dir: &Path, cuda: bool, dynamic: bool, dispatch: bool, rpc: bool) {
    println!("cargo::rustc-link-search=native={}", lib_dir.display());
    let kind = if dynamic { "dylib" } else { "static" };
    let mut libs = vec!["llama", "ggml"];
    // With dispatch the CPU backend is a module that ggml loads at run time, never linked.
    if !dispatch {
        libs.push("ggml-cpu");
    }
    if cuda {
        libs.push("ggml-cuda");
    }
    // Like the CPU variants, a dispatch build's RPC backend is a module loaded at run time.
    if rpc && !dispatch {
        libs.push("ggml-rpc");
    }
    libs.push("ggml-base");
    for lib in libs {
        println!("cargo::rustc-link-lib={kind}={lib}");
    }
    if dynamic {
        // The binary finds the libraries where they were built, or through LD_LIBRARY_PATH.
        // Old-style RPATH (not RUNPATH) also applies to libllama's own dependency on libggml.
        let target = env::var("TARGET").unwrap_or_default();
        if target.contains("linux") {
            println!("cargo::rustc-link-arg=-Wl,--disable-new-dtags");
        }
        if dispatch {
            // A folder holding the binary with the libraries and CPU variants beside it (a
            // copied install) wins over the build folder.
            println!("cargo::rustc-link-arg=-Wl,-rpath,$ORIGIN");
        }
        println!("cargo::rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    } else {
        let target = env::var("TARGET").unwrap_or_default();
        if target.contains("apple") {
            println!("cargo::rustc-link-lib=dylib=c++");
            println!("cargo::rustc-link-lib=framework=Accelerate");
            println!("cargo::rustc-link-lib=framework=Foundation");
            println!("cargo::rustc-link-lib=framework=Metal");
        } else {
            println!("cargo::rustc-link-lib=dylib=stdc++");
        }
        if cuda {
            if let Some(cuda_lib) = cuda_lib_dir() {
                println!("cargo::rustc-link-search=native={}", cuda_lib.display());
            }
            for lib in ["cudart", "cublas", "cublasLt", "cuda"] {
                println!("cargo::rustc-link-lib=dylib={lib}");
            }
        }
    }
}

fn cuda_lib_dir() -> Option<PathBuf> {
    let root = env::var_os("CUDA_PATH")
        .or_else(|| env::var_os("CUDA_HOME"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/cuda"));
    ["lib64", "lib", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
}

fn generate_bindings(source: &Path) {
    let include = source.join("include");
    let ggml_include = source.join("ggml/include");
    // ggml-alloc and ggml-cpu: the engine builds its own small scoring graph on the cache's
    // backend (src/ffi.rs, `DeviceScorer`) and its own CPU threadpool (src/ffi/threads.rs).
    let wrapper = "#include \"llama.h\"\n#include \"ggml.h\"\n#include \"ggml-backend.h\"\n#include \"ggml-alloc.h\"\n#include \"ggml-cpu.h\"\n";
    let builder = bindgen::Builder::default()
        .header_contents("qfilters_wrapper.h", wrapper)
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg(format!("-I{}", ggml_include.display()))
        .allowlist_function("llama_.*")
        .allowlist_type("llama_.*")
        .allowlist_function("ggml_.*")
        .allowlist_type("ggml_.*")
        .allowlist_var("LLAMA_.*")
        .allowlist_var("GGML_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false);
    // bindgen panics when libclang cannot be loaded; turn that into one actionable sentence.
    let generated =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    let bindings = match generated {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => fail(&format!("bindgen could not parse llama.h: {e}")),
        Err(_) => fail("bindgen needs libclang: install it (Debian/Ubuntu: `apt-get install -y libclang-dev`) or set LIBCLANG_PATH"),
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("bindings.rs");
    if let Err(e) = bindings.write_to_file(&out) {
        fail(&format!("cannot write {}: {e}", out.display()));
    }
}
