//! What a careless or hostile user does to the outputs: concurrent writers, planted symlinks,
//! FIFOs, outputs naming inputs, failed writes. Each test is a reproduction from issue 14.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gguf-tools"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

/// A 16 MB model (so that two writers really overlap) and filters of its shape.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("m.gguf");
    ok(&run(&[
        "synth",
        "--shape",
        "tiny",
        "--vocab",
        "65536",
        "-o",
        p(&model),
    ]));
    let filters = dir.join("filters");
    gguf_tools::filters::QFilters::new(2, 2, 16, vec![0.125; 64])
        .unwrap()
        .save(&filters)
        .unwrap();
    (model, filters)
}

/// Names in `dir` that look like temporary files.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Runs `a` and, `delay` later, `b`, both writing the same output; waits for both.
fn race(a: &[&str], b: &[&str], delay: std::time::Duration) -> [Output; 2] {
    let spawn = |args: &[&str]| {
        bin()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn(a);
    std::thread::sleep(delay);
    let second = spawn(b);
    [
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    ]
}

/// Two writers of different content race for one output, started 0 to 80 ms apart (the old
/// shared `OUT.tmp` mixed their bytes in most such rounds): each succeeds or fails with one
/// line, at least one succeeds, and the output is exactly one single writer's result.
fn check_race(dir: &Path, a: &[&str], b: &[&str], out: &Path, refs: [&[u8]; 2]) {
    for ms in [0, 5, 10, 20, 40, 80] {
        let results = race(a, b, std::time::Duration::from_millis(ms));
        let succeeded = results.iter().filter(|r| r.status.success()).count();
        assert!(succeeded >= 1, "{ms} ms: neither writer succeeded");
        for r in results.iter().filter(|r| !r.status.success()) {
            fails_with(r, "gguf-tools: ");
        }
        let got = fs::read(out).unwrap();
        assert!(
            got == refs[0] || got == refs[1],
            "{ms} ms apart: the output is neither writer's file"
        );
        ok(&run(&["inspect", p(out)]));
        assert!(leftovers(dir).is_empty(), "{:?}", leftovers(dir));
    }
}

#[test]
fn two_concurrent_writers_to_one_output_never_corrupt_it() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let other = dir.path().join("m2.gguf");
    ok(&run(&[
        "synth",
        "--shape",
        "tiny",
        "--vocab",
        "65536",
        "--seed",
        "2",
        "-o",
        p(&other),
    ]));
    let refs: Vec<Vec<u8>> = [&model, &other]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let r = dir.path().join(format!("ref{i}.gguf"));
            ok(&run(&["embed", p(m), p(&filters), "-o", p(&r)]));
            fs::read(&r).unwrap()
        })
        .collect();
    let out = dir.path().join("c.gguf");
    check_race(
        dir.path(),
        &["embed", p(&model), p(&filters), "-o", p(&out)],
        &["embed", p(&other), p(&filters), "-o", p(&out)],
        &out,
        [&refs[0], &refs[1]],
    );
    // synth writes while it generates, so the writers overlap longer.
    let [s0, s1] = [fs::read(&model).unwrap(), fs::read(&other).unwrap()];
    check_race(
        dir.path(),
        &[
            "synth",
            "--shape",
            "tiny",
            "--vocab",
            "65536",
            "-o",
            p(&out),
        ],
        &[
            "synth",
            "--shape",
            "tiny",
            "--vocab",
            "65536",
            "--seed",
            "2",
            "-o",
            p(&out),
        ],
        &out,
        [&s0, &s1],
    );
}

#[test]
fn a_planted_symlink_or_old_temp_name_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, "precious\n").unwrap();
    let out = dir.path().join("out.gguf");
    // The fixed temporary name the writers used before, planted as a link to the victim.
    std::os::unix::fs::symlink(&victim, dir.path().join("out.gguf.tmp")).unwrap();
    let unrelated = dir.path().join("s.gguf.tmp");
    fs::write(&unrelated, "mine\n").unwrap();
    ok(&run(&["embed", p(&model), p(&filters), "-o", p(&out)]));
    ok(&run(&[
        "strip",
        p(&out),
        "-o",
        p(&dir.path().join("s.gguf")),
    ]));
    ok(&run(&["synth", "--shape", "tiny", "-o", p(&out)]));
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(fs::read_to_string(&unrelated).unwrap(), "mine\n");
    assert!(fs::symlink_metadata(dir.path().join("out.gguf.tmp"))
        .unwrap()
        .file_type()
        .is_symlink());
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success(), "mkfifo");
}

fn is_fifo(path: &Path) -> bool {
    fs::symlink_metadata(path).unwrap().file_type().is_fifo()
}

#[test]
fn a_fifo_output_is_refused_and_stays_a_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    for o in [&fifo, &link] {
        fails_with(&run(&["embed", p(&model), p(&filters), "-o", p(o)]), "FIFO");
        fails_with(&run(&["synth", "--shape", "tiny", "-o", p(o)]), "FIFO");
    }
    let embedded = dir.path().join("e.gguf");
    ok(&run(&["embed", p(&model), p(&filters), "-o", p(&embedded)]));
    fails_with(&run(&["strip", p(&embedded), "-o", p(&fifo)]), "FIFO");
    let fifo_st = dir.path().join("f.safetensors");
    mkfifo(&fifo_st);
    fails_with(&run(&["extract", p(&embedded), "-o", p(&fifo_st)]), "FIFO");
    assert!(is_fifo(&fifo) && is_fifo(&fifo_st));
    // A directory is no output either.
    fails_with(
        &run(&["synth", "--shape", "tiny", "-o", p(dir.path())]),
        "is a directory",
    );
}

#[test]
fn fifo_and_device_inputs_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let fifo = dir.path().join("fifo.gguf");
    mkfifo(&fifo);
    fails_with(&run(&["inspect", p(&fifo)]), "FIFO");
    fails_with(&run(&["inspect", "/dev/zero"]), "character device");
    fails_with(&run(&["inspect", p(dir.path())]), "is a directory");
    let fifo_st = dir.path().join("f.safetensors");
    mkfifo(&fifo_st);
    let out = dir.path().join("o.gguf");
    fails_with(
        &run(&["embed", p(&model), p(&fifo_st), "-o", p(&out)]),
        "FIFO",
    );
    fails_with(
        &run(&["embed", p(&fifo), p(&filters), "-o", p(&out)]),
        "FIFO",
    );
    assert!(!out.exists());
}

#[test]
fn outputs_naming_an_input_are_refused_and_the_input_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let embedded = dir.path().join("e.gguf");
    ok(&run(&["embed", p(&model), p(&filters), "-o", p(&embedded)]));
    let before = fs::read(&embedded).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&embedded, &link).unwrap();
    fails_with(
        &run(&["extract", p(&embedded), "-o", p(&link)]),
        "is the input",
    );
    let hard = dir.path().join("hard.gguf");
    fs::hard_link(&embedded, &hard).unwrap();
    fails_with(
        &run(&["strip", p(&embedded), "-o", p(&hard)]),
        "is the input",
    );
    // The filters file is an input of embed too.
    let st = filters.join("model.safetensors");
    fails_with(
        &run(&["embed", p(&model), p(&filters), "-o", p(&st)]),
        "is the input",
    );
    assert_eq!(fs::read(&embedded).unwrap(), before);
}

#[test]
fn a_failed_write_keeps_the_previous_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let out = dir.path().join("c.gguf");
    ok(&run(&["synth", "--shape", "tiny", "-o", p(&out)]));
    let good = fs::read(&out).unwrap();
    // A file-size limit makes the 16 MB write fail with EFBIG part-way (SIGXFSZ ignored, as
    // the shell passes it on to the command).
    let script = format!(
        "trap '' XFSZ; ulimit -f 1024; exec {} embed {} {} -o {}",
        env!("CARGO_BIN_EXE_gguf-tools"),
        p(&model),
        p(&filters),
        p(&out)
    );
    let r = Command::new("sh").args(["-c", &script]).output().unwrap();
    fails_with(&r, "cannot write");
    assert_eq!(fs::read(&out).unwrap(), good);
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn sigterm_during_a_write_removes_the_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.gguf");
    // ~270 MB: long enough to be caught mid-write.
    let mut child = bin()
        .args(["synth", "--shape", "135m", "-o", p(&out)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while leftovers(dir.path()).is_empty() {
        assert!(
            started.elapsed().as_secs() < 30,
            "no temporary file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{status:?}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    assert!(!out.exists());
}

#[test]
fn an_ignored_sighup_stays_ignored_while_writing() {
    // `nohup` ignores SIGHUP; the temporary-file cleanup must not turn it back into an exit.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.gguf");
    let script = format!(
        "trap '' HUP; exec {} synth --shape 135m -o {}",
        env!("CARGO_BIN_EXE_gguf-tools"),
        p(&out)
    );
    let mut child = Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while leftovers(dir.path()).is_empty() {
        assert!(
            started.elapsed().as_secs() < 30,
            "no temporary file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let st = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(out.is_file());
}
