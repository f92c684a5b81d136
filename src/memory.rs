//! Memory budgets: whether a request's buffers fit in the memory that is free, checked before
//! they are allocated, so a model or batch too big for the machine fails with
//! [`Error::OutOfMemory`] naming the sizes instead of aborting the process (a failed host
//! allocation aborts a Rust program) or failing half-way. The host's free memory is Linux's
//! `MemAvailable`; the CUDA backend checks the device's the same way
//! (`backend::cuda::memory`).

use crate::error::{Error, Result};

/// Memory left aside beyond the planned buffers (allocator slack, buffers too small to plan;
/// on a device: the context, kernel modules, reduction scratch and captured graphs).
pub const HEADROOM_BYTES: u64 = 256 << 20;

/// Free and total memory of the host or of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: u64,
    pub total: u64,
}

/// "12.3 GiB" / "456.7 MiB".
pub fn human_bytes(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

/// `Ok` when `need` bytes for `what` fit in `mem.free` with [`HEADROOM_BYTES`] to spare, else
/// [`Error::OutOfMemory`] naming what, the sizes and `place` ("the host", a device's name).
pub fn check_fits(what: &str, need: u64, mem: MemoryInfo, place: &str) -> Result<()> {
    if need.saturating_add(HEADROOM_BYTES) <= mem.free {
        return Ok(());
    }
    Err(Error::OutOfMemory(format!(
        "{what} need {} of memory (+ {} headroom); {place} has {} free of {}",
        human_bytes(need),
        human_bytes(HEADROOM_BYTES),
        human_bytes(mem.free),
        human_bytes(mem.total)
    )))
}

/// The host's available and total memory (`/proc/meminfo`), within this process's cgroup
/// limit where one is set (a container: `memory.max` − `memory.current`); `None` where
/// `/proc/meminfo` cannot be read (not Linux), and the checks are then skipped.
pub fn host_memory() -> Option<MemoryInfo> {
    let host = parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok();
    Some(within_cgroup(
        host,
        read("memory.max").as_deref(),
        read("memory.current").as_deref(),
    ))
}

/// `host` limited by a cgroup v2 `memory.max` ("max" or bytes) and `memory.current` (bytes).
fn within_cgroup(host: MemoryInfo, max: Option<&str>, current: Option<&str>) -> MemoryInfo {
    let parse = |t: Option<&str>| t.and_then(|t| t.trim().parse::<u64>().ok());
    match (parse(max), parse(current)) {
        (Some(max), Some(current)) => MemoryInfo {
            free: host.free.min(max.saturating_sub(current)),
            total: host.total.min(max),
        },
        _ => host,
    }
}

/// Host requests below this are not checked: reading `/proc/meminfo` (tens of microseconds)
/// would cost a small cached step more than such a request risks.
pub const HOST_CHECK_MIN_BYTES: u64 = 64 << 20;

/// [`check_fits`] against the host's memory (nothing is checked where it is unknown, or for
/// requests under [`HOST_CHECK_MIN_BYTES`]).
pub fn check_host_fits(what: &str, need: u64) -> Result<()> {
    if need < HOST_CHECK_MIN_BYTES {
        return Ok(());
    }
    match host_memory() {
        Some(mem) => check_fits(what, need, mem, "the host"),
        None => Ok(()),
    }
}

/// `MemAvailable` and `MemTotal` of a `/proc/meminfo` text (values in kB).
fn parse_meminfo(text: &str) -> Option<MemoryInfo> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    };
    Some(MemoryInfo {
        free: field("MemAvailable:")?,
        total: field("MemTotal:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn a_request_fits_only_with_the_headroom_to_spare() {
        let mem = MemoryInfo {
            free: 10 << 30,
            total: 80 << 30,
        };
        assert!(check_fits("weights", (10 << 30) - HEADROOM_BYTES, mem, "dev").is_ok());
        let e = check_fits("weights", (10 << 30) - HEADROOM_BYTES + 1, mem, "GPU X").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory);
        let msg = e.to_string();
        for part in [
            "weights need 9.8 GiB",
            "GPU X has 10.0 GiB free of 80.0 GiB",
        ] {
            assert!(msg.contains(part), "{msg}");
        }
        // No overflow on absurd requests.
        assert!(check_fits("x", u64::MAX, mem, "dev").is_err());
    }

    #[test]
    fn sizes_read_as_gib_or_mib() {
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(256 << 20), "256.0 MiB");
    }

    #[test]
    fn meminfo_gives_available_and_total_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\n\
                    MemAvailable:   20480000 kB\nBuffers:          100 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(MemoryInfo {
                free: 20480000 * 1024,
                total: 24576000 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
    }

    #[test]
    fn a_cgroup_limit_bounds_the_hosts_memory() {
        let host = MemoryInfo {
            free: 20 << 30,
            total: 24 << 30,
        };
        let limited = within_cgroup(host, Some("8589934592\n"), Some("2147483648\n"));
        assert_eq!(
            limited,
            MemoryInfo {
                free: 6 << 30,
                total: 8 << 30
            }
        );
        // No limit ("max"), no cgroup files, or a limit above the host: the host's figures.
        assert_eq!(within_cgroup(host, Some("max\n"), Some("1000\n")), host);
        assert_eq!(within_cgroup(host, None, None), host);
        let loose = within_cgroup(host, Some(&(64u64 << 30).to_string()), Some("0"));
        assert_eq!(loose, host);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_hosts_memory_is_read() {
        let mem = host_memory().expect("/proc/meminfo is readable on Linux");
        assert!(mem.total > 0 && mem.free <= mem.total, "{mem:?}");
    }
}
