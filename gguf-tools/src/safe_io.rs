//! The one way both crates read their input files and write their output files.
//!
//! Reading: an input must be a regular file (a FIFO would block, a device can be endless), it
//! is opened without blocking, and at most a given number of bytes are read whatever its length
//! claims (`/dev/zero` and procfs files report 0).
//!
//! Writing: [`AtomicFile`] creates a temporary file beside the destination with a random name
//! and `O_CREAT | O_EXCL | O_NOFOLLOW` (so a planted file or symlink is never opened, and two
//! writers never share one), then writes, `fsync`s and renames it over the destination. Until
//! that rename the destination keeps its previous content. The temporary file is removed on
//! error, on drop and on SIGINT/SIGTERM/SIGHUP. A destination that exists and is not a regular
//! file (FIFO, device node, directory, or a symlink to one) is refused: the rename would
//! replace it. [`check_output`] runs the same checks, and refuses an output that is one of the
//! command's inputs, before the long work starts.

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use thiserror::Error;

/// The path that means standard output for outputs that are a stream (`-o -`).
pub const STDOUT: &str = "-";

#[derive(Debug, Error)]
pub enum FileError {
    #[error("{path} is a directory, not a file; pass the file inside it")]
    IsDirectory { path: PathBuf },
    #[error("{path} is a {kind}, not a regular file; pass a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than the {max} bytes this command reads from it")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "cannot write {path}: {source}; check that the folder is writable and the disk is not full"
    )]
    Write { path: PathBuf, source: io::Error },
    #[error("output {output} is the input {input}; choose a different output path")]
    OutputIsInput { output: PathBuf, input: PathBuf },
    #[error("outputs {a} and {b} are the same file; give each output its own path")]
    OutputsCollide { a: PathBuf, b: PathBuf },
    #[error("cannot write {path}: its folder {folder} does not exist")]
    NoFolder { path: PathBuf, folder: PathBuf },
    #[error("{path} exists and is not a folder; pass a folder or a .safetensors file")]
    NotAFolder { path: PathBuf },
    #[error("{path}: standard output (-) is not available for this output; give a file path")]
    NoStdout { path: PathBuf },
}

/// What a `stat` result is, in words, when it is not a regular file.
fn kind_of(meta: &fs::Metadata) -> Option<&'static str> {
    let t = meta.file_type();
    if t.is_file() {
        return None;
    }
    if t.is_dir() {
        return Some("directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return Some("FIFO (named pipe)");
        }
        if t.is_char_device() {
            return Some("character device");
        }
        if t.is_block_device() {
            return Some("block device");
        }
        if t.is_socket() {
            return Some("socket");
        }
    }
    Some("special file")
}

fn not_regular(path: &Path, meta: &fs::Metadata) -> Option<FileError> {
    let kind = kind_of(meta)?;
    Some(if meta.is_dir() {
        FileError::IsDirectory {
            path: path.to_path_buf(),
        }
    } else {
        FileError::NotRegular {
            path: path.to_path_buf(),
            kind,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Opens an input that must be a regular file, without blocking on a FIFO.
pub fn open_input(path: &Path) -> Result<File, FileError> {
    let read_err = |source| FileError::Read {
        path: path.to_path_buf(),
        source,
    };
    // stat first: a directory or FIFO gets its own message, and opening a FIFO is never tried.
    let meta = fs::metadata(path).map_err(read_err)?;
    if let Some(e) = not_regular(path, &meta) {
        return Err(e);
    }
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The path may have been swapped for a FIFO since the stat; O_NONBLOCK keeps the open
        // from waiting for a writer, and the fstat below refuses it.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if let Some(e) = not_regular(path, &meta) {
        return Err(e);
    }
    Ok(file)
}

/// Reads a whole input, refusing one longer than `max` bytes; the length the file system
/// reports is not trusted (it is 0 for many special files).
pub fn read_input(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let file = open_input(path)?;
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0).min(max);
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Checks before writing

/// Whether `path` names standard output.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == STDOUT
}

/// Refuses a destination that exists and is not a regular file, or a symlink to one that is
/// not. A dangling symlink or a symlink to a regular file is fine: the rename replaces the
/// link itself, never what it points to.
pub fn check_destination(path: &Path) -> Result<(), FileError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FileError::Write {
            path: path.to_path_buf(),
            source,
        }),
        Ok(link) if link.file_type().is_symlink() => match fs::metadata(path) {
            Ok(target) => not_regular(path, &target).map_or(Ok(()), Err),
            Err(_) => Ok(()),
        },
        Ok(meta) => not_regular(path, &meta).map_or(Ok(()), Err),
    }
}

/// The folder a destination's temporary file goes in.
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `a` and `b` name the same file: the same device and inode when both exist (through
/// symlinks and hard links), else the same name in the same (canonical) folder.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    #[cfg(not(unix))]
    if let (Ok(x), Ok(y)) = (fs::canonicalize(a), fs::canonicalize(b)) {
        return x == y;
    }
    match (
        fs::canonicalize(folder_of(a)),
        fs::canonicalize(folder_of(b)),
    ) {
        (Ok(x), Ok(y)) => x == y && a.file_name() == b.file_name(),
        _ => false,
    }
}

/// Everything that can be known about writing `output` before the work starts: `-` only if
/// `stdout_ok`, the destination is a regular file or absent, it is none of `inputs`, its folder
/// exists and a temporary file can be created there.
pub fn check_output(output: &Path, inputs: &[&Path], stdout_ok: bool) -> Result<(), FileError> {
    if is_stdout(output) {
        return if stdout_ok {
            Ok(())
        } else {
            Err(FileError::NoStdout {
                path: output.to_path_buf(),
            })
        };
    }
    check_destination(output)?;
    for input in inputs {
        if same_file(input, output) {
            return Err(FileError::OutputIsInput {
                output: output.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    let folder = folder_of(output);
    if !folder.is_dir() {
        return Err(FileError::NoFolder {
            path: output.to_path_buf(),
            folder,
        });
    }
    // Proves the folder is writable: the same kind of file the real write creates.
    AtomicFile::create(output).map(drop)
}

/// [`check_output`] for a file inside `folder`, which the writer creates if it is missing
/// (with its parents): then only the nearest existing ancestor must be a folder.
pub fn check_output_in_folder(
    folder: &Path,
    files: &[&Path],
    inputs: &[&Path],
) -> Result<(), FileError> {
    match fs::metadata(folder) {
        Ok(m) if m.is_dir() => {
            for f in files {
                check_output(f, inputs, false)?;
            }
            Ok(())
        }
        Ok(_) => Err(FileError::NotAFolder {
            path: folder.to_path_buf(),
        }),
        Err(_) => {
            let mut up = folder.parent();
            while let Some(p) = up {
                let p = if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                };
                if let Ok(m) = fs::metadata(p) {
                    return if m.is_dir() {
                        Ok(())
                    } else {
                        Err(FileError::NotAFolder {
                            path: p.to_path_buf(),
                        })
                    };
                }
                up = p.parent();
            }
            Ok(())
        }
    }
}

/// Refuses two outputs of one command that are the same file.
pub fn check_distinct(outputs: &[&Path]) -> Result<(), FileError> {
    for (i, a) in outputs.iter().enumerate() {
        for b in outputs.iter().skip(i + 1) {
            if !is_stdout(a) && same_file(a, b) {
                return Err(FileError::OutputsCollide {
                    a: a.to_path_buf(),
                    b: b.to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing

/// A file being written under a temporary name, renamed over its destination by [`commit`];
/// dropped without a commit, it is removed and the destination is untouched.
///
/// [`commit`]: AtomicFile::commit
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Creates the temporary file for `dest` (see the module documentation).
    pub fn create(dest: &Path) -> Result<Self, FileError> {
        check_destination(dest)?;
        let folder = folder_of(dest);
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let mut last_err = None;
        // A name is taken only if another writer created it first; a few fresh names suffice.
        for _ in 0..16 {
            let tmp = folder.join(format!(".{name}.{:016x}.tmp", random_u64()));
            register_temp(&tmp);
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
            }
            match options.open(&tmp) {
                Ok(file) => {
                    // A replaced file keeps its permissions.
                    if let Ok(meta) = fs::metadata(dest) {
                        if meta.is_file() {
                            let _ = file.set_permissions(meta.permissions());
                        }
                    }
                    return Ok(AtomicFile {
                        dest: dest.to_path_buf(),
                        tmp,
                        writer: Some(BufWriter::with_capacity(1 << 20, file)),
                    });
                }
                Err(e) => {
                    unregister_temp(&tmp);
                    if e.kind() != io::ErrorKind::AlreadyExists {
                        return Err(FileError::Write {
                            path: dest.to_path_buf(),
                            source: e,
                        });
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(FileError::Write {
            path: dest.to_path_buf(),
            source: last_err.unwrap_or_else(|| io::Error::other("no free temporary name")),
        })
    }

    /// The temporary file itself, everything written so far flushed to it, for writers that
    /// fill it in place at offsets (several threads, `FileExt::write_at`).
    pub fn file(&mut self) -> Result<&File, FileError> {
        let flushed = match &mut self.writer {
            Some(w) => w.flush(),
            None => Err(io::Error::other("file already committed")),
        };
        if let Err(e) = flushed {
            return Err(self.write_err(e));
        }
        match &self.writer {
            Some(w) => Ok(w.get_ref()),
            None => Err(self.write_err(io::Error::other("file already committed"))),
        }
    }

    /// The temporary file's path (for messages and tests).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    fn write_err(&self, source: io::Error) -> FileError {
        FileError::Write {
            path: self.dest.clone(),
            source,
        }
    }

    /// Flushes, syncs and renames the file over its destination.
    pub fn commit(mut self) -> Result<(), FileError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| self.write_err(io::Error::other("already committed")))?;
        let file = writer
            .into_inner()
            .map_err(|e| self.write_err(e.into_error()))?;
        // Data must be on disk before the rename makes it visible under the final name.
        file.sync_all().map_err(|e| self.write_err(e))?;
        drop(file);
        // The destination may have become a FIFO or a folder while we wrote.
        check_destination(&self.dest)?;
        fs::rename(&self.tmp, &self.dest).map_err(|e| self.write_err(e))?;
        unregister_temp(&self.tmp);
        // Best effort: makes the rename itself durable.
        if let Ok(dir) = File::open(folder_of(&self.dest)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.writer {
            Some(w) => w.write(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.write_all(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            // Not committed: the half-written file is useless.
            let _ = fs::remove_file(&self.tmp);
            unregister_temp(&self.tmp);
        }
    }
}

/// Writes `bytes` to `dest` atomically, or to standard output if `dest` is `-`.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<(), FileError> {
    if is_stdout(dest) {
        let mut out = io::stdout().lock();
        return out
            .write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|source| FileError::Write {
                path: dest.to_path_buf(),
                source,
            });
    }
    let mut f = AtomicFile::create(dest)?;
    f.write_all(bytes).map_err(|e| f.write_err(e))?;
    f.commit()
}

/// A log opened once and appended to (JSON Lines): every record is one `write` of a whole
/// line, so a crash leaves at most a last partial line, never a rewritten file.
pub struct AppendLog {
    path: PathBuf,
    file: File,
}

impl AppendLog {
    pub fn open(path: &Path) -> Result<Self, FileError> {
        check_destination(path)?;
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Never wait on a FIFO swapped in after the check; the fstat below refuses it.
            options.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
        }
        let err = |source| FileError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = options.open(path).map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        if let Some(e) = not_regular(path, &meta) {
            return Err(e);
        }
        Ok(AppendLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record (a line without its newline).
    pub fn append_line(&mut self, line: &str) -> Result<(), FileError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.file
            .write_all(&bytes)
            .map_err(|source| FileError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Temporary files and signals

static TEMPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CLEANUP: Once = Once::new();
static SIGINT_ELSEWHERE: AtomicBool = AtomicBool::new(false);

/// Leaves SIGINT to the caller's own handler (an interactive program that reads Ctrl-C as
/// "stop this reply"); call it before the first write. SIGTERM and SIGHUP still clean up.
pub fn leave_sigint_to_caller() {
    SIGINT_ELSEWHERE.store(true, Ordering::SeqCst);
}

fn register_temp(path: &Path) {
    install_cleanup();
    if let Ok(mut temps) = TEMPS.lock() {
        temps.push(path.to_path_buf());
    }
}

fn unregister_temp(path: &Path) {
    if let Ok(mut temps) = TEMPS.lock() {
        temps.retain(|p| p != path);
    }
}

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files in flight, then exits with status
/// 128 + the signal, as a shell reports a process killed by it. Installed with the first
/// temporary file, so commands that write nothing keep the default behaviour.
#[cfg(unix)]
fn install_cleanup() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    CLEANUP.call_once(|| {
        let mut signals = vec![SIGTERM, SIGHUP];
        if !SIGINT_ELSEWHERE.load(Ordering::SeqCst) {
            signals.push(SIGINT);
        }
        // A signal the process ignores (`nohup` ignores SIGHUP) must stay harmless.
        let ignored = ignored_signals();
        signals.retain(|&s| !(1..=64).contains(&s) || ignored & (1u64 << (s - 1)) == 0);
        if signals.is_empty() {
            return;
        }
        let Ok(mut iter) = signal_hook::iterator::Signals::new(&signals) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("temp-cleanup".into())
            .spawn(move || {
                if let Some(sig) = iter.forever().next() {
                    if let Ok(temps) = TEMPS.lock() {
                        for t in temps.iter() {
                            let _ = fs::remove_file(t);
                        }
                    }
                    // _exit: no atexit hooks or C++ destructors racing the threads still running.
                    signal_hook::low_level::exit(128 + sig);
                }
            });
        drop(spawned);
    });
}

/// The mask of ignored signals (bit n-1 for signal n), from /proc/self/status on Linux; 0
/// where it cannot be read.
#[cfg(unix)]
fn ignored_signals() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

#[cfg(not(unix))]
fn install_cleanup() {
    CLEANUP.call_once(|| {});
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS per process; the counter, pid and clock make every
    // call differ within one. Uniqueness itself comes from O_EXCL, not from this.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_previous_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.json");
        fs::write(&dest, "good\n").unwrap();
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.write_all(b"half").unwrap();
            // Dropped without commit, as on any error path.
        }
        assert_eq!(fs::read_to_string(&dest).unwrap(), "good\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        write_file(&dest, b"new\n").unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), "new\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_fifo_directory_and_symlink_to_directory() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(matches!(
            write_file(&sub, b"x"),
            Err(FileError::IsDirectory { .. })
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&sub, &link).unwrap();
        assert!(matches!(
            write_file(&link, b"x"),
            Err(FileError::IsDirectory { .. })
        ));
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(matches!(
            read_input(&sub, 10),
            Err(FileError::IsDirectory { .. })
        ));
    }

    #[test]
    fn reads_are_bounded_whatever_the_length_says() {
        let err = read_input(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(
            matches!(err, FileError::NotRegular { .. }),
            "/dev/zero is a device: {err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, [7u8; 100]).unwrap();
        assert_eq!(read_input(&f, 100).unwrap().len(), 100);
        assert!(matches!(
            read_input(&f, 99),
            Err(FileError::TooLarge { .. })
        ));
    }

    #[test]
    fn same_file_sees_hard_links_symlinks_and_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, "a").unwrap();
        let hard = dir.path().join("hard");
        fs::hard_link(&a, &hard).unwrap();
        let soft = dir.path().join("soft");
        std::os::unix::fs::symlink(&a, &soft).unwrap();
        assert!(same_file(&a, &hard));
        assert!(same_file(&a, &soft));
        let new = dir.path().join("new");
        assert!(same_file(&new, &dir.path().join(".").join("new")));
        assert!(!same_file(&a, &new));
        assert!(matches!(
            check_output(&hard, &[&a], false),
            Err(FileError::OutputIsInput { .. })
        ));
        assert!(matches!(
            check_distinct(&[&new, &dir.path().join("./new")]),
            Err(FileError::OutputsCollide { .. })
        ));
        assert!(matches!(
            check_output(&dir.path().join("missing/x"), &[], false),
            Err(FileError::NoFolder { .. })
        ));
        // The writability probe leaves nothing behind.
        check_output(&new, &[&a], false).unwrap();
        assert!(!new.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
