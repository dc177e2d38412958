//! Process facts from `/proc` and the few system tools `chat-load` needs (`getconf`, `taskset`,
//! `prlimit`). The workspace forbids `unsafe`, so CPU affinity and the file limit are changed
//! through those tools rather than through `libc`.

use std::process::Command;

use anyhow::{Context, bail};

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS: no value")?
        .parse()
        .context("VmRSS: not a number")?;
    Ok(kib * 1024)
}

/// User + system CPU time of `pid` (all its threads) in clock ticks (`/proc/<pid>/stat`
/// fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: fields are counted after its ')'.
    let after = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field N is at index N - 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when it cannot be asked).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Soft and hard `RLIMIT_NOFILE` of this process (from `/proc/self/limits`).
pub fn nofile_limits() -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no 'Max open files' line")?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums.as_slice() {
        [soft, hard, ..] => Ok((*soft, *hard)),
        // "unlimited"
        _ => Ok((u64::MAX, u64::MAX)),
    }
}

/// Raises this process's soft open-file limit to the hard limit (with `prlimit`, since the
/// workspace forbids the `unsafe` a `setrlimit` call needs). Returns the soft limit in force.
pub fn raise_nofile_limit() -> u64 {
    let Ok((soft, hard)) = nofile_limits() else {
        return 1024;
    };
    if soft >= hard || hard == u64::MAX {
        return soft;
    }
    let ok = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        nofile_limits().map(|(s, _)| s).unwrap_or(soft)
    } else {
        soft
    }
}

/// Pins every thread of this process to `cpu` (`taskset -a -p -c`). Call it before building the
/// tokio runtime: threads created later inherit the mask, and tokio then sizes its worker pool
/// from the one CPU it may use.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string()])
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset failed: {status}");
    }
    Ok(())
}

/// A before/after sample of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Resident set size, bytes.
    pub rss: u64,
    /// CPU ticks (user + system).
    pub ticks: u64,
}

/// Samples `pid` (zeros when it is gone).
pub fn sample(pid: u32) -> Sample {
    Sample {
        rss: rss_bytes(pid).unwrap_or(0),
        ticks: cpu_ticks(pid).unwrap_or(0),
    }
}

/// Ephemeral ports a socket bound to one source address may get (the size of
/// `net.ipv4.ip_local_port_range`; `None` when it cannot be read).
pub fn local_port_count() -> Option<usize> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = range.split_whitespace().map(str::parse::<usize>);
    let (lo, hi) = (it.next()?.ok()?, it.next()?.ok()?);
    Some(hi.checked_sub(lo)? + 1)
}
