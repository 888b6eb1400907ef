//! A reader that fails or stops must not leave a healthy-looking exporter:
//! a reader that panics ends the process with a non-zero status and one log
//! line; a reader stuck on a batch turns `/healthz` and `/readyz` to 503.
//! The faults are injected into a test build (`CONNTRACK_METRICS_FAULT`,
//! debug builds only), in a virtual node's namespace. Needs root.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::exporter::{get, start_with_env};
use common::netns::{kernel_tests_possible, VirtualNode};

/// Starts the exporter (a debug build) with `fault` injected and `args`;
/// its pid and its stderr lines after "serving", as they come.
fn start(
    vn: &mut VirtualNode,
    port: u16,
    fault: &str,
    args: &[&str],
) -> (u32, Arc<Mutex<Vec<String>>>) {
    let env = format!("CONNTRACK_METRICS_FAULT={fault}");
    let started = start_with_env(vn, port, &[&env], args);
    (started.pid, started.later)
}

/// A conntrack event in the node's namespace: an entry made with
/// `conntrack -I` (every listener gets its NEW).
fn an_event(vn: &VirtualNode, sport: u16) {
    vn.exec(
        &vn.node,
        &[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "10.200.1.2",
            "-d",
            "10.96.0.10",
            "--sport",
            &sport.to_string(),
            "--dport",
            "53",
            "--timeout",
            "30",
        ],
    );
}

/// The status line of `path`.
fn status(vn: &VirtualNode, port: u16, path: &str) -> String {
    let (head, _) = get(vn, port, path, None);
    head.lines().next().unwrap_or("").to_string()
}

#[test]
fn a_reader_that_panics_ends_the_process_with_one_line() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    // Without the socket filter every event reaches the reader.
    let (pid, lines) = start(&mut vn, 9100, "reader-panic", &["--no-socket-filter"]);
    assert_eq!(status(&vn, 9100, "/readyz"), "HTTP/1.1 200 OK");
    an_event(&vn, 40001);
    let status = vn.wait_child(pid, Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "exit status {status:?}"
    );
    // The output thread may still be reading the last line.
    std::thread::sleep(Duration::from_millis(200));
    let lines = lines.lock().unwrap().clone();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("conntrack-metrics: event reader 0 stopped: ct-reader-0 panicked at ")
            && lines[0].contains("injected fault"),
        "{lines:#?}"
    );
}

#[test]
fn a_reader_stuck_on_a_batch_fails_healthz_and_readyz() {
    if !kernel_tests_possible() {
        return;
    }
    let mut vn = VirtualNode::new();
    let (pid, _) = start(&mut vn, 9101, "reader-stall", &["--no-socket-filter"]);
    assert_eq!(status(&vn, 9101, "/healthz"), "HTTP/1.1 200 OK");
    an_event(&vn, 40002);
    // Stuck from the event on: 503 after READER_STUCK_AFTER (5 s), not before.
    let stuck_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        status(&vn, 9101, "/healthz"),
        "HTTP/1.1 200 OK",
        "too early"
    );
    let deadline = stuck_at + Duration::from_secs(9);
    loop {
        let healthz = status(&vn, 9101, "/healthz");
        if healthz == "HTTP/1.1 503 Service Unavailable" {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz still {healthz}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        status(&vn, 9101, "/readyz"),
        "HTTP/1.1 503 Service Unavailable"
    );
    // The scrape still answers, and says so (an alert can fire on it).
    let (_, text) = get(&vn, 9101, "/metrics", None);
    let stuck = "conntrack_monitoring_readers_stuck{node=\"n1\"}";
    assert_eq!(common::exporter::value(&text, stuck), 1.0);
    // A stuck reader still sees the stop: SIGTERM ends it.
    common::netns::run(&["kill", "-TERM", &pid.to_string()]);
    let status = vn.wait_child(pid, Duration::from_secs(2));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
