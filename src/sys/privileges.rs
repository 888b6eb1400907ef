//! Least privilege: the one capability the exporter needs, and nothing
//! else, from its first instruction on.
//!
//! Why one is enough: everything the exporter does with privilege is
//! netlink and network-namespace work, which `CAP_NET_ADMIN` covers:
//! joining the conntrack groups, `SO_RCVBUFFORCE`, the conntrack sysctls of
//! its namespace, ctnetlink dumps and statistics, and the `nft` and
//! `iptables-save` children it runs (the `--event-mask` table, kube-proxy's
//! rules). So `main` drops every other capability before it starts any
//! thread or child, and each inherits the reduced sets.
//!
//! Owns: the calls that change the process's capability sets (`capget`,
//! `capset`, `prctl`), each in a small wrapper.
//! Never: adds a capability, or fails the start because a set could not be
//! reduced (an unprivileged container has nothing to drop); it reports
//! what it kept.

use std::fs;
use std::io;

/// `CAP_NET_ADMIN`.
pub const CAP_NET_ADMIN: u32 = 12;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What [`keep_only_net_admin`] left the process with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    /// Whether `CAP_NET_ADMIN` is still effective (it was before).
    pub net_admin: bool,
    /// Capabilities removed from the bounding set (0 without
    /// `CAP_SETPCAP`: then children run as root get what the bounding set
    /// already limits them to).
    pub bounding_dropped: u32,
}

/// Drops every capability but `CAP_NET_ADMIN` from the effective,
/// permitted, inheritable, ambient and (with `CAP_SETPCAP`) bounding sets
/// of the calling thread, so of every thread and child it starts after.
/// Call it before any thread starts.
pub fn keep_only_net_admin() -> io::Result<Kept> {
    let keep = 1u32 << CAP_NET_ADMIN;
    let current = capget()?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // the capset below removes.
    let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    let mut bounding_dropped = 0;
    for cap in (0..=last).filter(|&c| c != CAP_NET_ADMIN) {
        let held = prctl(libc::PR_CAPBSET_READ, cap).is_ok_and(|r| r == 1);
        if held && prctl(libc::PR_CAPBSET_DROP, cap).is_ok() {
            bounding_dropped += 1;
        }
    }
    // No ambient capability: a child gets what its file and bounding set
    // give it, no more. Kernels before 4.3 have no ambient set.
    let _ = prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as u32);
    let word0 = CapData {
        effective: current[0].permitted & keep,
        permitted: current[0].permitted & keep,
        inheritable: 0,
    };
    capset([word0, CapData::default()])?;
    Ok(Kept {
        net_admin: word0.effective & keep != 0,
        bounding_dropped,
    })
}

fn capget() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `header` and `data` are live, properly laid out
    // `__user_cap_header_struct` and two `__user_cap_data_struct`s, as
    // version 3 reads and writes; the kernel touches nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc == 0 {
        Ok(data)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn capset(data: [CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    // SAFETY: as in `capget`; the kernel only reads `data`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `prctl(option, arg)` for the capability options, which take one integer
/// and read no memory.
fn prctl(option: libc::c_int, arg: u32) -> io::Result<libc::c_int> {
    // SAFETY: the capability options take integer arguments only; the
    // unused ones must be 0.
    let rc = unsafe { libc::prctl(option, libc::c_ulong::from(arg), 0, 0, 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}
