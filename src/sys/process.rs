//! The exporter's own CPU time, memory and file descriptors, from
//! `/proc/self`, for the standard `process_*` families.
//!
//! Owns: reading `/proc/self/stat`, `/proc/self/status` and `/proc/self/fd`.
//! Never: runs on the reader thread (the scrape calls it).

use std::fs;

/// What the kernel says of this process now.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Peak resident set size, bytes.
    pub resident_peak_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value; any name is allowed.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Reads the stats; fields that cannot be read are 0.
pub fn read() -> ProcessStats {
    let mut stats = ProcessStats::default();
    let ticks = clock_ticks();
    if let Ok(stat) = fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may contain spaces), from 3 on.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime 14, stime 15, starttime 22 (1-based): here index - 3.
            stats.cpu_seconds = (num(11) + num(12)) / ticks;
            let boot = fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0);
            stats.start_time_seconds = boot + num(19) / ticks;
        }
    }
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        stats.resident_bytes = kib("VmRSS:");
        stats.resident_peak_bytes = kib("VmHWM:");
        stats.virtual_bytes = kib("VmSize:");
    }
    stats.open_fds = fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        // Burn a little CPU so the counter is above zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let s = read();
        assert!(s.cpu_seconds > 0.0, "{s:?}");
        assert!(s.resident_bytes > 1 << 20, "{s:?}");
        assert!(s.resident_peak_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.virtual_bytes >= s.resident_bytes, "{s:?}");
        assert!(s.open_fds >= 3, "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            s.start_time_seconds > now - 3600.0 && s.start_time_seconds <= now + 1.0,
            "{s:?}"
        );
    }
}
