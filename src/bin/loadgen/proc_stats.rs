//! CPU time and memory of the processes under test, read from `/proc`.
//!
//! A watched process counts together with its descendants, found once when
//! the watch starts: nginx does its work in worker processes under the
//! master, tollgate in one process. CPU is `utime + stime` of
//! `/proc/<pid>/stat` in clock ticks (`getconf CLK_TCK`); memory is `VmRSS`
//! (now) and `VmHWM` (peak) of `/proc/<pid>/status`, summed over the tree
//! (so pages shared by nginx's master and workers count once per process).
//! Writing `5` to `/proc/<pid>/clear_refs` resets the peak, so the peak of a
//! measurement is its own, not that of the process's whole life.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Value, json};

/// A process and its descendants.
#[derive(Debug, Clone)]
pub struct ProcessTree {
    pids: Vec<u32>,
    clk_tck: f64,
}

/// One reading of a process tree.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl ProcessTree {
    /// The tree under `root` as it is now.
    pub fn new(root: u32, clk_tck: u64) -> anyhow::Result<ProcessTree> {
        anyhow::ensure!(clk_tck > 0, "CLK_TCK must be positive");
        std::fs::metadata(format!("/proc/{root}"))
            .with_context(|| format!("process {root} does not exist"))?;
        Ok(ProcessTree {
            pids: descendants(root),
            clk_tck: clk_tck as f64,
        })
    }

    /// The calling process alone.
    pub fn current(clk_tck: u64) -> anyhow::Result<ProcessTree> {
        ProcessTree::new(std::process::id(), clk_tck)
    }

    /// Sums the tree's counters; a process that has exited counts zero.
    pub fn sample(&self) -> Sample {
        let mut sample = Sample {
            cpu_seconds: 0.0,
            rss_kib: 0,
            peak_rss_kib: 0,
        };
        for &pid in &self.pids {
            if let Some(ticks) = cpu_ticks(pid) {
                sample.cpu_seconds += ticks as f64 / self.clk_tck;
            }
            if let Some((rss, peak)) = memory_kib(pid) {
                sample.rss_kib += rss;
                sample.peak_rss_kib += peak;
            }
        }
        sample
    }

    /// Resets the peak RSS of every process; false if the kernel refused.
    pub fn reset_peak(&self) -> bool {
        self.pids
            .iter()
            .all(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// How many processes the tree has.
    pub fn processes(&self) -> usize {
        self.pids.len()
    }
}

/// `root` and every process below it.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse().ok()))
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids);
        }
        next += 1;
    }
    tree
}

/// The fields of `/proc/<pid>/stat` after the command name, which may itself
/// contain spaces and parentheses: index 0 is the state (field 3 of proc(5)),
/// 1 the parent pid, 11 `utime` and 12 `stime`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `(VmRSS, VmHWM)` in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The processes one measurement watches: the proxy (if any), the mock
/// upstream (if given) and the load generator itself.
#[derive(Debug, Clone)]
pub struct Watched {
    proxy: Option<ProcessTree>,
    upstream: Option<ProcessTree>,
    loadgen: Option<ProcessTree>,
}

/// Readings of every watched process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    proxy: Option<Sample>,
    upstream: Option<Sample>,
    loadgen: Option<Sample>,
    peak_reset: bool,
}

impl Watched {
    /// Watches the given proxy and upstream trees, and this process.
    pub fn new(proxy: Option<u32>, upstream: Option<u32>, clk_tck: u64) -> anyhow::Result<Watched> {
        Ok(Watched {
            proxy: proxy
                .map(|pid| ProcessTree::new(pid, clk_tck))
                .transpose()?,
            upstream: upstream
                .map(|pid| ProcessTree::new(pid, clk_tck))
                .transpose()?,
            loadgen: ProcessTree::current(clk_tck).ok(),
        })
    }

    /// Reads everything and resets the proxy's peak RSS: the start of a
    /// measurement.
    pub fn start(&self) -> Snapshot {
        let peak_reset = self.proxy.as_ref().is_some_and(ProcessTree::reset_peak);
        let mut snapshot = self.snapshot();
        snapshot.peak_reset = peak_reset;
        snapshot
    }

    /// Reads everything.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            proxy: self.proxy.as_ref().map(ProcessTree::sample),
            upstream: self.upstream.as_ref().map(ProcessTree::sample),
            loadgen: self.loadgen.as_ref().map(ProcessTree::sample),
            peak_reset: false,
        }
    }

    /// The proxy's current reading, if a proxy is watched.
    pub fn proxy_sample(&self) -> Option<Sample> {
        self.proxy.as_ref().map(ProcessTree::sample)
    }

    /// JSON of what happened between `start` and `end`; `requests`, when
    /// given, adds CPU microseconds per request.
    pub fn usage(&self, start: &Snapshot, end: &Snapshot, requests: Option<u64>) -> Value {
        let wall = end.at.duration_since(start.at).as_secs_f64();
        let part = |a: Option<Sample>, b: Option<Sample>, processes: Option<usize>| -> Value {
            let (Some(a), Some(b)) = (a, b) else {
                return Value::Null;
            };
            let cpu = (b.cpu_seconds - a.cpu_seconds).max(0.0);
            let mut v = json!({
                "cpu_seconds": cpu,
                "cpu_cores": if wall > 0.0 { cpu / wall } else { 0.0 },
                "rss_start_kib": a.rss_kib,
                "rss_end_kib": b.rss_kib,
                "peak_rss_kib": b.peak_rss_kib,
                "processes": processes,
            });
            if let Some(n) = requests.filter(|&n| n > 0) {
                v["cpu_us_per_request"] = json!(cpu * 1e6 / n as f64);
            }
            v
        };
        json!({
            "proxy": part(start.proxy, end.proxy, self.proxy.as_ref().map(ProcessTree::processes)),
            "proxy_peak_reset": start.peak_reset,
            "upstream": part(start.upstream, end.upstream, None),
            "loadgen": part(start.loadgen, end.loadgen, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let tree = ProcessTree::current(100).unwrap();
        // Burn a little CPU so the counter is visibly non-zero.
        let mut x = 0u64;
        let started = Instant::now();
        while started.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let s = tree.sample();
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib, "{s:?}");
        assert!(s.cpu_seconds > 0.0, "{s:?}");
    }

    #[test]
    fn finds_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let tree = ProcessTree::current(100).unwrap();
        let found = tree.pids.contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found);
    }
}
