//! A virtual Kubernetes node in network namespaces, for end-to-end tests
//! against the real kernel conntrack:
//!
//! ```text
//!  client ns                     node ns (exporter, nftables DNAT)            backend ns
//!  10.200.1.2  ──veth──  10.200.1.1 | 10.200.2.1  ──veth──  10.200.2.2
//!  fd00:1::2                     fd00:1::1 | fd00:2::1                 fd00:2::2
//!                                          | 10.200.3.1  ──veth──  10.200.3.2  backend2 ns
//!                                          | fd00:3::1                 fd00:3::2
//!               each test's nftables ruleset maps its ClusterIPs to the backends
//! ```
//!
//! Traffic only ever goes to addresses assigned here. Dropping the node kills
//! every process it started and deletes its namespaces, also when a test fails.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `cmd` (whitespace-separated, no quoting) and panics with its stderr on failure.
pub fn sh(cmd: &str) {
    let parts: Vec<&str> = cmd.split_whitespace().collect();
    run(&parts);
}

pub fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this test can build namespaces (root with `ip` and `nft`). When it
/// cannot, the test fails, unless `CONNTRACK_METRICS_SKIP_KERNEL_TESTS=1`,
/// in which case it says so and the caller returns.
pub fn kernel_tests_possible() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let tools = ["ip", "nft", "conntrack", "python3"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = format!(
        "kernel tests need root and ip, nft, conntrack, python3 (root: {root}, tools: {tools})"
    );
    if std::env::var("CONNTRACK_METRICS_SKIP_KERNEL_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {why}");
        false
    } else {
        panic!("{why}; run as root via tests/run.sh, or set CONNTRACK_METRICS_SKIP_KERNEL_TESTS=1");
    }
}

/// Runs `f` on a thread that has joined the network namespace `ns`:
/// sockets it opens belong to that namespace for their whole life.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap()
}

/// Starts `f` on a thread that has joined the network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: `file` is an open namespace file for the whole call;
        // setns only changes this thread's network namespace, and this thread
        // ends when `f` returns.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
}

/// A TCP connection to `to` from the local address `from` (std cannot bind a
/// client socket before it connects), given up after `timeout`.
pub fn connect_from(from: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket() reads no memory of ours; its result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just opened, which nothing else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // A blocking connect gives up after the send timeout (SO_SNDTIMEO).
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let local = sockaddr(SocketAddrV4::new(from, 0));
    // SAFETY: `local` is a sockaddr_in of `len` bytes that outlives the call.
    let rc = unsafe { libc::bind(fd, (&raw const local).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let remote = sockaddr(to);
    // SAFETY: `remote` is a sockaddr_in of `len` bytes that outlives the call.
    let rc = unsafe { libc::connect(fd, (&raw const remote).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

pub struct VirtualNode {
    pub client: String,
    pub node: String,
    pub backend: String,
    pub backend2: String,
    children: Vec<Child>,
}

impl VirtualNode {
    pub fn new() -> VirtualNode {
        let tag = format!(
            "ctm{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let vn = VirtualNode {
            client: format!("{tag}-client"),
            node: format!("{tag}-node"),
            backend: format!("{tag}-backend"),
            backend2: format!("{tag}-backend2"),
            children: Vec::new(),
        };
        for ns in [&vn.client, &vn.node, &vn.backend, &vn.backend2] {
            sh(&format!("ip netns add {ns}"));
            sh(&format!("ip -n {ns} link set lo up"));
        }
        let (c, n, b, b2) = (&vn.client, &vn.node, &vn.backend, &vn.backend2);
        sh(&format!(
            "ip -n {n} link add b1 type veth peer name eth0 netns {b2}"
        ));
        sh(&format!(
            "ip -n {n} link add c0 type veth peer name eth0 netns {c}"
        ));
        sh(&format!(
            "ip -n {n} link add b0 type veth peer name eth0 netns {b}"
        ));
        for (ns, dev, v4, v6) in [
            (n, "c0", "10.200.1.1/24", "fd00:1::1/64"),
            (n, "b0", "10.200.2.1/24", "fd00:2::1/64"),
            (n, "b1", "10.200.3.1/24", "fd00:3::1/64"),
            (b2, "eth0", "10.200.3.2/24", "fd00:3::2/64"),
            (c, "eth0", "10.200.1.2/24", "fd00:1::2/64"),
            (b, "eth0", "10.200.2.2/24", "fd00:2::2/64"),
        ] {
            sh(&format!("ip -n {ns} addr add {v4} dev {dev}"));
            sh(&format!("ip -n {ns} -6 addr add {v6} dev {dev} nodad"));
            sh(&format!("ip -n {ns} link set {dev} up"));
        }
        for (ns, v4, v6) in [
            (c, "10.200.1.1", "fd00:1::1"),
            (b, "10.200.2.1", "fd00:2::1"),
            (b2, "10.200.3.1", "fd00:3::1"),
        ] {
            sh(&format!("ip -n {ns} route add default via {v4}"));
            sh(&format!("ip -n {ns} -6 route add default via {v6}"));
        }
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.netfilter.nf_conntrack_acct=1",
            "net.netfilter.nf_conntrack_timestamp=1",
        ] {
            sh(&format!("ip netns exec {n} sysctl -qw {key}"));
        }
        vn
    }

    /// Short conntrack timeouts in the node namespace (TIME_WAIT and UDP
    /// 1 s), so flows end in seconds instead of minutes.
    pub fn short_timeouts(&self) {
        for key in [
            "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
            "net.netfilter.nf_conntrack_udp_timeout=1",
            "net.netfilter.nf_conntrack_udp_timeout_stream=1",
        ] {
            sh(&format!("ip netns exec {} sysctl -qw {key}", self.node));
        }
    }

    /// Ends the node's flows: waits out TIME_WAIT (1 s with
    /// [`Self::short_timeouts`]), then flushes the conntrack table, so every
    /// flow left gets its DESTROY now.
    pub fn end_flows(&self) {
        std::thread::sleep(Duration::from_millis(1500));
        self.exec(&self.node, &["conntrack", "-F"]);
    }

    /// UDP flows in the node namespace last 300 s (until the test deletes
    /// them), so the table holds still while a test reads it.
    pub fn keep_udp_flows(&self) {
        let key = "net.netfilter.nf_conntrack_udp_timeout=300";
        self.exec(&self.node, &["sysctl", "-qw", key]);
    }

    /// Loads an nftables ruleset (nft -f syntax) into the node namespace.
    pub fn nft(&self, ruleset: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `argv` inside `ns`; it is killed when the node is dropped.
    pub fn spawn(&mut self, ns: &str, argv: &[&str], stdout: Stdio, stderr: Stdio) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    /// Waits up to `limit` for the started process `pid` to exit; its status,
    /// or `None` if it is still running.
    pub fn wait_child(&mut self, pid: u32, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.children.iter_mut().find(|c| c.id() == pid)?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `argv` inside `ns` to completion; panics on failure.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(argv);
        run(&full)
    }
}

impl Drop for VirtualNode {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.client, &self.node, &self.backend, &self.backend2] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
