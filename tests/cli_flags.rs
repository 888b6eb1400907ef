//! The real binary's answer to bad flags: exit status 2 and a message on
//! stderr naming the flag and the problem, before anything is opened (these
//! tests need no root and open no socket). `--help` and `--version` exit 0.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs the binary with `args` and `env` (and no other `CONNTRACK_METRICS_*`
/// variable). A bad flag must end it at once; should it start instead, it is
/// killed after a few seconds and the test fails.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conntrack-metrics"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONNTRACK_METRICS_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("start conntrack-metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "{args:?} did not exit (flags accepted?); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

fn assert_usage_error(args: &[&str], env: &[(&str, &str)], wants: &[&str]) {
    let out = run(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
    for want in wants {
        assert!(
            stderr.contains(want),
            "{args:?} {env:?}: {want:?} not in: {stderr}"
        );
    }
}

#[test]
fn bad_values_exit_2_naming_the_flag_and_the_problem() {
    for (args, wants) in [
        (
            &["--svc-subnet", "10.96.0.1/16"][..],
            &["--svc-subnet", "host bits", "10.96.0.0/16"][..],
        ),
        (
            &["--svc-subnet=10.96.0.0/16,fd00::/129"],
            &["--svc-subnet", "0 to 128"],
        ),
        (
            &["--exclude-subnet", "banana"],
            &["--exclude-subnet", "not an IP"],
        ),
        (
            &["--summary-timeout", "0"],
            &["--summary-timeout", "1..=100"],
        ),
        (&["--max-flows", "10"], &["--max-flows", "1024..=16777216"]),
        (
            &["--reader-cpu", "100000"],
            &["--reader-cpu", "CPU 100000", "allowed CPUs"],
        ),
        (
            &["--metrics-bind-address", "9000"],
            &["--metrics-bind-address", "9000"],
        ),
        (&["--print-events=maybe"], &["--print-events", "maybe"]),
        (&["--no-such-flag"], &["--no-such-flag"]),
        (
            &["--node-name", "a", "--node-name", "b"],
            &["--node-name", "multiple times"],
        ),
    ] {
        assert_usage_error(args, &[], wants);
    }
}

#[test]
fn bad_environment_values_exit_2_naming_the_flag() {
    assert_usage_error(
        &[],
        &[("CONNTRACK_METRICS_MAX_FLOWS", "12")],
        &["--max-flows", "1024"],
    );
    assert_usage_error(
        &[],
        &[("CONNTRACK_METRICS_SVC_SUBNET", "10.96.0.0/16,10.97.0.1/16")],
        &["--svc-subnet", "host bits"],
    );
}

/// Needs `main` to parse with `Config::parse_args()` (clap's own `parse()`
/// knows nothing of the Go spelling and reports `-s`).
#[test]
fn go_spelling_bad_values_exit_2_naming_the_flag() {
    assert_usage_error(
        &["-summary-timeout=0"],
        &[],
        &["--summary-timeout", "1..=100"],
    );
    assert_usage_error(
        &["-svc-subnet", "10.96.0.1/16"],
        &[],
        &["--svc-subnet", "host bits"],
    );
    assert_usage_error(&["-no-such-flag"], &[], &["'-no-such-flag'"]);
}

#[test]
fn help_and_version_exit_0() {
    for args in [&["--help"][..], &["-h"], &["--version"], &["-V"]] {
        let out = run(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
    let help = String::from_utf8_lossy(&run(&["--help"], &[]).stdout).into_owned();
    for want in [
        "--svc-subnet",
        "CONNTRACK_METRICS_SVC_SUBNET",
        "--exclude-subnet",
        "--max-flows",
        "--reader-cpu",
        "--no-sysctl",
        "[default: 10.96.0.0/16]",
    ] {
        assert!(help.contains(want), "{want} not in --help:\n{help}");
    }
}
