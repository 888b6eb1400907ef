//! The exporter's start and stop against the real kernel: it turns on the
//! conntrack accounting and timestamp sysctls of its network namespace (or,
//! with `--no-sysctl`, leaves them and warns); SIGTERM or SIGINT stop it
//! cleanly within a second, and SIGHUP is logged and stops nothing. Needs
//! root.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::exporter::get;
use common::netns::{kernel_tests_possible, VirtualNode};

fn sysctl(vn: &VirtualNode, key: &str) -> String {
    vn.exec(&vn.node, &["sysctl", "-n", key]).trim().to_string()
}

/// Starts the exporter with `args`; returns its pid and its stderr lines up
/// to "serving".
fn start(vn: &mut VirtualNode, port: u16, args: &[&str]) -> (u32, Vec<String>) {
    let node = vn.node.clone();
    let bind = format!("127.0.0.1:{port}");
    let mut argv = vec![
        env!("CARGO_BIN_EXE_conntrack-metrics"),
        "--metrics-bind-address",
        &bind,
    ];
    argv.extend_from_slice(args);
    let child = vn.spawn(&node, &argv, Stdio::null(), Stdio::piped());
    let pid = child.id();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited: {lines:?}"
        );
        let serving = line.contains("serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    (pid, lines)
}

#[test]
fn turns_on_the_sysctls_it_needs_or_warns_with_no_sysctl() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let keys = [
        "net.netfilter.nf_conntrack_acct",
        "net.netfilter.nf_conntrack_timestamp",
    ];
    for key in keys {
        vn.exec(&vn.node.clone(), &["sysctl", "-qw", &format!("{key}=0")]);
    }
    let (_, lines) = start(&mut vn, 9100, &["--no-sysctl"]);
    for key in keys {
        assert_eq!(sysctl(&vn, key), "0", "--no-sysctl leaves {key}");
    }
    let name = |k: &str| k.rsplit('.').next().unwrap().to_string();
    for key in keys {
        assert!(
            lines
                .iter()
                .any(|l| l.contains("warning") && l.contains(&name(key))),
            "{lines:?}"
        );
    }
    let (_, lines) = start(&mut vn, 9101, &[]);
    for key in keys {
        assert_eq!(sysctl(&vn, key), "1", "{key}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("set {} to 1", name(key)))),
            "{lines:?}"
        );
    }
}

#[test]
fn stop_signals_end_it_cleanly_within_a_second() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    for (i, signal) in ["TERM", "INT"].into_iter().enumerate() {
        let port = 9100 + i as u16;
        let (pid, _) = start(&mut vn, port, &[]);
        let (head, _) = get(&vn, port, "/readyz", None);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let sent = Instant::now();
        common::netns::run(&["kill", &format!("-{signal}"), &pid.to_string()]);
        let status = vn.wait_child(pid, Duration::from_secs(1));
        let took = sent.elapsed();
        assert!(
            status.is_some_and(|s| s.success()),
            "SIG{signal}: {status:?} after {took:?}"
        );
    }
}

#[test]
fn sighup_is_logged_and_stops_nothing() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let started = common::exporter::start_with_env(&mut vn, 9103, &[], &[]);
    let (pid, later) = (started.pid, started.later);
    common::netns::run(&["kill", "-HUP", &pid.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(1);
    while later.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lines = later.lock().unwrap().clone();
    assert!(
        lines.len() == 1 && lines[0].contains("SIGHUP: nothing to reload"),
        "{lines:?}"
    );
    assert!(
        vn.wait_child(pid, Duration::from_secs(1)).is_none(),
        "SIGHUP stopped it"
    );
    let (head, _) = get(&vn, 9103, "/readyz", None);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    common::netns::run(&["kill", "-TERM", &pid.to_string()]);
    let status = vn.wait_child(pid, Duration::from_secs(1));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// Each thread of `pid`: its name and its allowed CPUs (cpulist form).
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue;
        };
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), cpus));
    }
    out
}

/// Waits (5 s at most) until every `(thread, cpus)` of `want` is there:
/// readers name and pin themselves once they run.
fn wait_pinned(pid: u32, want: &[(&str, &str)]) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = threads(pid);
        let all = want
            .iter()
            .all(|(n, c)| now.iter().any(|(tn, tc)| tn == n && tc == c));
        if all || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reader_cpu_pins_the_reader_thread_only() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let (pid, _) = start(&mut vn, 9100, &["--reader-cpu", "0"]);
    let pinned = wait_pinned(pid, &[("ct-reader-0", "0")]);
    let reader = pinned
        .iter()
        .find(|(n, _)| n == "ct-reader-0")
        .expect("a ct-reader-0 thread");
    assert_eq!(reader.1, "0", "{pinned:?}");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        let main = pinned
            .iter()
            .find(|(n, _)| n == "conntrack-metri")
            .expect("main thread");
        assert_ne!(main.1, "0", "only the reader is pinned: {pinned:?}");
    }
}

#[test]
fn several_readers_each_get_their_own_thread_on_their_own_cpu() {
    if !kernel_tests_possible() {
        return;
    }
    let mut allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    allowed.sort_unstable();
    let mut vn = VirtualNode::new();
    // Unpinned by flag: reader i goes to the i-th allowed CPU (in turn).
    let (pid, _) = start(&mut vn, 9100, &["--readers", "2"]);
    let cpu = |i: usize| allowed[i % allowed.len()].to_string();
    let (c0, c1) = (cpu(0), cpu(1));
    let pinned = wait_pinned(pid, &[("ct-reader-0", &c0), ("ct-reader-1", &c1)]);
    for (name, want) in [("ct-reader-0", &c0), ("ct-reader-1", &c1)] {
        assert!(
            pinned.iter().any(|(n, c)| n == name && c == want),
            "{name} on CPU {want}: {pinned:?}"
        );
    }
    // Pinned by flag, in the order given.
    let list = format!("{},{}", cpu(1), cpu(0));
    let (pid, _) = start(&mut vn, 9101, &["--readers", "2", "--reader-cpu", &list]);
    let pinned = wait_pinned(pid, &[("ct-reader-0", &c1), ("ct-reader-1", &c0)]);
    assert!(
        pinned.iter().any(|(n, c)| n == "ct-reader-0" && *c == c1)
            && pinned.iter().any(|(n, c)| n == "ct-reader-1" && *c == c0),
        "{pinned:?}"
    );
}

/// A Service subnet list too long for a classic BPF program: one reader
/// runs without the kernel filter (userspace applies the same test) and says
/// so; several readers cannot split the flows without it and refuse.
#[test]
fn a_subnet_list_too_long_for_the_kernel_filter() {
    if !kernel_tests_possible() {
        return;
    }
    let list: Vec<String> = (0..5000u32)
        .map(|i| format!("10.{}.{}.0/24", 96 + i / 256, i % 256))
        .collect();
    let list = list.join(",");
    let mut vn = VirtualNode::new();
    let (pid, lines) = start(&mut vn, 9100, &["--svc-subnet", &list]);
    let warning = lines
        .iter()
        .find(|l| l.contains("kernel socket filter not attached"))
        .unwrap_or_else(|| panic!("no warning: {lines:?}"));
    assert!(warning.contains("5000 IPv4"), "{warning}");
    assert!(
        lines.iter().any(|l| l.contains("kernel filter: none")),
        "{lines:?}"
    );
    common::netns::run(&["kill", "-TERM", &pid.to_string()]);
    assert!(vn
        .wait_child(pid, Duration::from_secs(2))
        .is_some_and(|s| s.success()));

    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &vn.node])
        .args([env!("CARGO_BIN_EXE_conntrack-metrics"), "--readers", "2"])
        .args([
            "--metrics-bind-address",
            "127.0.0.1:9101",
            "--svc-subnet",
            &list,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("splits the flows between --readers"),
        "{stderr}"
    );
}

#[test]
fn sysctls_only_turns_them_on_and_exits() {
    if !kernel_tests_possible() {
        return;
    }
    let vn = VirtualNode::new();
    let keys = [
        "net.netfilter.nf_conntrack_acct",
        "net.netfilter.nf_conntrack_timestamp",
    ];
    for key in keys {
        vn.exec(&vn.node, &["sysctl", "-qw", &format!("{key}=0")]);
    }
    let exporter = env!("CARGO_BIN_EXE_conntrack-metrics");
    let out = std::process::Command::new("timeout")
        .args([
            "10",
            "ip",
            "netns",
            "exec",
            &vn.node,
            exporter,
            "--sysctls-only",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for key in keys {
        assert_eq!(sysctl(&vn, key), "1", "{key}: {stderr}");
    }
    // It did nothing else: no subscription, no endpoint.
    assert!(
        !stderr.contains("subscribed") && !stderr.contains("serving"),
        "{stderr}"
    );
    let out = std::process::Command::new(exporter)
        .args(["--sysctls-only", "--no-sysctl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
