//! The two conntrack sysctls the measurements need: per-flow byte and packet
//! counters (`nf_conntrack_acct`) and flow start/stop stamps
//! (`nf_conntrack_timestamp`), both off by default in the kernel.
//!
//! Owns: reading and, at start, setting them in this network namespace, as
//! the Go original does. Never: runs after start.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The sysctls, under `/proc/sys/net/netfilter/`.
pub const NEEDED: [&str; 2] = ["nf_conntrack_acct", "nf_conntrack_timestamp"];

/// What [`enable`] did with one sysctl.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It was already 1.
    AlreadyOn(&'static str),
    /// It was 0 and is now 1.
    TurnedOn(&'static str),
    /// It is 0 and was left so (`--no-sysctl`): flows get no counters or
    /// stamps, so bytes, packets, duration and latencies are not measured.
    LeftOff(&'static str),
}

/// Makes sure each of [`NEEDED`] is 1 under `dir` (normally
/// `/proc/sys/net/netfilter`). With `write` false, only reads. A sysctl that
/// cannot be read, or written when it must be, is an error naming it (for
/// example a read-only `/proc/sys` in a container).
pub fn enable(dir: &Path, write: bool) -> io::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for name in NEEDED {
        let path: PathBuf = dir.join(name);
        let value = fs::read_to_string(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))
        })?;
        if value.trim() != "0" {
            outcomes.push(Outcome::AlreadyOn(name));
        } else if !write {
            outcomes.push(Outcome::LeftOff(name));
        } else {
            fs::write(&path, "1").map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot set {} to 1: {e} (a read-only /proc/sys? set it on the node, \
                         or pass --no-sysctl to run without it)",
                        path.display()
                    ),
                )
            })?;
            outcomes.push(Outcome::TurnedOn(name));
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(acct: &str, ts: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ctm-sysctl-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("nf_conntrack_acct"), acct).unwrap();
        fs::write(d.join("nf_conntrack_timestamp"), ts).unwrap();
        d
    }

    #[test]
    fn turns_on_what_is_off_and_says_so() {
        let d = dir("0\n", "1\n");
        assert_eq!(
            enable(&d, true).unwrap(),
            vec![
                Outcome::TurnedOn("nf_conntrack_acct"),
                Outcome::AlreadyOn("nf_conntrack_timestamp")
            ]
        );
        assert_eq!(
            fs::read_to_string(d.join("nf_conntrack_acct")).unwrap(),
            "1"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn without_write_leaves_it_and_reports_it() {
        let d = dir("0\n", "0\n");
        assert_eq!(
            enable(&d, false).unwrap(),
            vec![
                Outcome::LeftOff("nf_conntrack_acct"),
                Outcome::LeftOff("nf_conntrack_timestamp")
            ]
        );
        assert_eq!(
            fs::read_to_string(d.join("nf_conntrack_acct")).unwrap(),
            "0\n"
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_missing_sysctl_is_an_error_naming_it() {
        let err = enable(Path::new("/nonexistent-ctm"), true).unwrap_err();
        assert!(err.to_string().contains("nf_conntrack_acct"), "{err}");
    }
}
