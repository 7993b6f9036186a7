//! How many CPU threads llama.cpp gets, and how its idle workers wait.
//!
//! ggml splits every graph node across its workers and waits for all of them at each node.
//! A worker that shares its core with another busy process is descheduled for whole time
//! slices, and every other worker then waits for it, so on a loaded machine two threads can
//! decode several times slower than one (measured: docs/BENCHMARKS.md, "Threads"). Two things
//! keep that from happening by default:
//! - the default thread count is the number of physical cores that are idle when the program
//!   starts (at least one), not the number of logical CPUs;
//! - idle workers sleep instead of spinning (`poll` 0, where ggml's own pool spins), so they
//!   do not steal the core from other programs between graphs.
//!
//! `-t N` / `QFILTERS_THREADS` and `--poll` override both.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Polling level of idle workers, 0 (sleep at once) to 100 (spin hardest), as llama.cpp's
/// `--poll`; qfilters' default is 0.
static POLL: AtomicU32 = AtomicU32::new(0);

/// Sets the polling level for contexts created from now on (clamped to 0..=100).
pub fn set_poll(level: u32) {
    POLL.store(level.min(100), Ordering::Relaxed);
}

pub fn poll() -> u32 {
    POLL.load(Ordering::Relaxed)
}

/// Logical CPUs this process may run on (affinity and cgroup quotas included).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Physical cores among the CPUs this process may use: hyper-threads of one core share its
/// arithmetic units, so a second thread per core buys little and costs a barrier partner.
pub fn physical_cores() -> usize {
    let logical = available_cpus();
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let cores = count_physical_cores(&info);
    if cores == 0 {
        logical
    } else {
        cores.min(logical)
    }
}

/// Distinct (physical id, core id) pairs in a /proc/cpuinfo text; 0 when it does not say.
pub fn count_physical_cores(cpuinfo: &str) -> usize {
    let mut seen = std::collections::HashSet::new();
    let (mut package, mut core) = (None, None);
    for line in cpuinfo.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let Some(c) = core.take() {
                seen.insert((package.take().unwrap_or(0u64), c));
            }
            package = None;
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().parse::<u64>().ok();
        match key.trim() {
            "physical id" => package = value,
            "core id" => core = value,
            _ => {}
        }
    }
    seen.len()
}

/// CPU time used by other programs, in CPUs, over a short look at /proc/stat (None where the
/// file is missing). Our own process is idle while this runs.
fn busy_cpus(window: Duration) -> Option<f64> {
    /// (idle ticks, all ticks, CPUs) from one read of /proc/stat.
    fn sample() -> Option<(u64, u64, usize)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().next()?.strip_prefix("cpu ")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 5 {
            return None;
        }
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let idle = v[3] + v[4];
        let total: u64 = v.iter().take(8).sum();
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Some((idle, total, cpus))
    }
    let (idle0, total0, _) = sample()?;
    std::thread::sleep(window);
    let (idle1, total1, cpus) = sample()?;
    let total = total1.saturating_sub(total0);
    if total == 0 {
        return None;
    }
    let busy_share = 1.0 - idle1.saturating_sub(idle0) as f64 / total as f64;
    Some(busy_share * cpus as f64)
}

/// Threads to use when the user gives none: physical cores, less the cores other programs
/// keep busy right now (rounded to the nearest core), at least one. Measured once per
/// process, on first use (a 100 ms look at /proc/stat).
pub fn default_threads() -> i32 {
    static DEFAULT: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let cores = physical_cores();
        let busy = busy_cpus(Duration::from_millis(100)).unwrap_or(0.0);
        threads_for(cores, busy) as i32
    })
}

/// The rule behind [`default_threads`], apart for testing.
pub fn threads_for(physical_cores: usize, busy_cpus: f64) -> usize {
    let busy = if busy_cpus.is_finite() {
        busy_cpus.max(0.0).round() as usize
    } else {
        0
    };
    physical_cores.saturating_sub(busy).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cores_not_hyperthreads() {
        let two_cores_four_threads = "processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\n\
            processor\t: 1\nphysical id\t: 0\ncore id\t: 1\n\n\
            processor\t: 2\nphysical id\t: 0\ncore id\t: 0\n\n\
            processor\t: 3\nphysical id\t: 0\ncore id\t: 1\n";
        assert_eq!(count_physical_cores(two_cores_four_threads), 2);
        let two_sockets = "physical id : 0\ncore id : 0\n\nphysical id : 1\ncore id : 0\n";
        assert_eq!(count_physical_cores(two_sockets), 2);
        assert_eq!(count_physical_cores("processor : 0\nflags : avx2\n"), 0);
    }

    #[test]
    fn busy_cores_are_left_alone() {
        assert_eq!(threads_for(2, 0.1), 2);
        assert_eq!(threads_for(2, 1.0), 1);
        assert_eq!(threads_for(2, 0.6), 1);
        assert_eq!(threads_for(2, 5.0), 1);
        assert_eq!(threads_for(8, 2.4), 6);
        assert_eq!(threads_for(4, f64::NAN), 4);
    }
}
