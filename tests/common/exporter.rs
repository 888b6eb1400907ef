//! Running the exporter binary inside a virtual node, and scraping it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::VirtualNode;

/// Starts the exporter in the node namespace listening on 127.0.0.1:`port`
/// with `args`, waits until it serves, and keeps draining its stderr.
pub fn start(vn: &mut VirtualNode, port: u16, args: &[&str]) -> std::process::ChildStdout {
    start_with_pid(vn, port, args).1
}

/// [`start`], also returning the exporter's pid (`ip netns exec` execs it,
/// so the child's pid is the exporter's).
pub fn start_with_pid(
    vn: &mut VirtualNode,
    port: u16,
    args: &[&str],
) -> (u32, std::process::ChildStdout) {
    let started = start_with_env(vn, port, &[], args);
    (started.pid, started.stdout)
}

/// A started exporter.
pub struct Started {
    /// Its pid.
    pub pid: u32,
    /// Its stdout (`--print-events`), for the caller to read or keep open.
    pub stdout: std::process::ChildStdout,
    /// Its stderr lines up to "serving".
    pub startup: Vec<String>,
    /// Its stderr lines after "serving", as they come.
    pub later: Arc<Mutex<Vec<String>>>,
}

/// [`start_with_pid`] with `env` (`NAME=value`) set for the exporter, and
/// its stderr kept: the lines up to "serving", and those after.
pub fn start_with_env(vn: &mut VirtualNode, port: u16, env: &[&str], args: &[&str]) -> Started {
    let node = vn.node.clone();
    let bind = format!("127.0.0.1:{port}");
    let mut argv = vec!["env"];
    argv.extend_from_slice(env);
    argv.extend([
        env!("CARGO_BIN_EXE_conntrack-metrics"),
        "--node-name",
        "n1",
        "--metrics-bind-address",
        &bind,
    ]);
    argv.extend_from_slice(args);
    let exporter = vn.spawn(&node, &argv, Stdio::piped(), Stdio::piped());
    let pid = exporter.id();
    let mut stderr = BufReader::new(exporter.stderr.take().unwrap());
    let stdout = exporter.stdout.take().unwrap();
    let mut startup = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "exited: {startup:?}"
        );
        let serving = line.contains("serving");
        startup.push(line);
        if serving {
            break;
        }
    }
    let later = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&later);
    std::thread::spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            kept.lock().unwrap().push(line);
        }
    });
    Started {
        pid,
        stdout,
        startup,
        later,
    }
}

/// GET `path` from the exporter on `port` in the node namespace (curl runs
/// there: the test process cannot reach that namespace's loopback). Returns
/// the head and the body.
pub fn get(vn: &VirtualNode, port: u16, path: &str, accept: Option<&str>) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut argv = vec!["curl", "-s", "-m", "5", "-D", "-", url.as_str()];
    let header;
    if let Some(a) = accept {
        header = format!("Accept: {a}");
        argv.extend(["-H", header.as_str()]);
    }
    let out = vn.exec(&vn.node, &argv);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.to_string(), body.to_string())
}

/// The value of the sample line `series` (name and labels as written).
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}"))
        .parse()
        .unwrap()
}

/// Every sample of `name` whose labels include `want`, with all its labels.
pub fn samples(
    text: &str,
    name: &str,
    want: &[(&str, &str)],
) -> Vec<(std::collections::BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let mut map = std::collections::BTreeMap::new();
        for pair in labels.split("\",") {
            let (k, v) = pair.split_once("=\"").expect("label");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        if want
            .iter()
            .all(|(k, v)| map.get(*k).map(String::as_str) == Some(*v))
        {
            out.push((map, value.parse().unwrap()));
        }
    }
    out
}

/// The sum of [`samples`].
pub fn total(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name, want).iter().map(|(_, v)| v).sum()
}

/// Runs `promtool check metrics` on `text`; panics with its report on failure.
pub fn promtool_check(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Scrapes until `series` reaches `want` (events arrive a little after the
/// traffic), returning the last scrape.
pub fn scrape_until(vn: &VirtualNode, port: u16, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get(vn, port, "/metrics", None);
        let v = value(&text, series);
        if v >= want || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
