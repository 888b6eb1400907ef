//! `--web.config.file` on the real exporter, in a virtual node: https with a
//! certificate signed by a test CA and Basic credentials (curl, as a person
//! would; and its OpenSSL is not ours), 401 for none or wrong ones, no
//! metrics for plain HTTP or TLS 1.1 on the TLS port, client-certificate
//! mode, a reload on SIGHUP (the old password refused after) and on a
//! rotated certificate, a broken file (exit 2 at start; kept out on a
//! reload), and a flood of wrong passwords held to the password-check
//! thread's CPU share. Needs root.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::exporter::{start_with_env, Started};
use common::netns::{connect_from, in_netns, kernel_tests_possible, spawn_in_netns, VirtualNode};
use conntrack_metrics::expo::http::{CHECK_CPU_SHARE, WATCH_EVERY};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A test CA, and what it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `sans` (an IP address or a name) and its key, PEM.
    fn sign(&self, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, "client");
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A folder of this test's files, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ctm-web-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        // Written aside and renamed, as a Secret volume's update is atomic.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// Writes `files` the way the kubelet updates a Secret volume: into a
    /// new folder, then `..data` swapped to it in one rename; each name is
    /// a symlink through `..data`.
    fn secret_volume(&self, files: &[(&str, &str)]) {
        static VERSION: AtomicUsize = AtomicUsize::new(0);
        let version = format!("..v{}", VERSION.fetch_add(1, Ordering::Relaxed));
        std::fs::create_dir_all(self.0.join(&version)).unwrap();
        for (name, text) in files {
            std::fs::write(self.0.join(&version).join(name), text).unwrap();
        }
        let tmp = self.0.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.0.join("..data")).unwrap();
        for (name, _) in files {
            let link = self.0.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), link).unwrap();
            }
        }
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hash(password: &str) -> String {
    bcrypt::hash(password, 10).unwrap()
}

/// A server certificate for 127.0.0.1 signed by `ca`, written with a web
/// configuration of `users` (name, password) and `extra` lines.
fn tls_setup(dir: &Dir, ca: &Ca, users: &[(&str, &str)], extra: &str) -> String {
    let (cert, key) = ca.sign(&["127.0.0.1"]);
    dir.secret_volume(&[("tls.crt", &cert), ("tls.key", &key)]);
    dir.write("ca.crt", &ca.pem);
    write_config(dir, users, extra)
}

fn write_config(dir: &Dir, users: &[(&str, &str)], extra: &str) -> String {
    let mut text = String::from("tls_server_config:\n  cert_file: tls.crt\n  key_file: tls.key\n");
    text.push_str(extra);
    if !users.is_empty() {
        text.push_str("basic_auth_users:\n");
        for (user, password) in users {
            text.push_str(&format!("  {user}: {}\n", hash(password)));
        }
    }
    dir.write("web.yml", &text)
}

fn start(vn: &mut VirtualNode, port: u16, config: &str) -> Started {
    start_with_env(vn, port, &[], &["--web.config.file", config])
}

/// The exporter in a virtual node, on `port` with TLS (a certificate of a
/// new test CA, whose PEM is `ca.crt` in the folder) and `users`.
fn serve_tls(
    tag: &str,
    port: u16,
    users: &[(&str, &str)],
    extra: &str,
) -> (Dir, Ca, VirtualNode, Started) {
    let dir = Dir::new(tag);
    let ca = Ca::new("test ca");
    let config = tls_setup(&dir, &ca, users, extra);
    let mut vn = VirtualNode::new();
    let started = start(&mut vn, port, &config);
    (dir, ca, vn, started)
}

/// curl in the node namespace: the status code (000 when no HTTP response
/// came), and the head and body.
fn curl(vn: &VirtualNode, url: &str, args: &[&str]) -> (String, String) {
    let mut argv = vec!["curl", "-s", "-m", "5", "-D", "-", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    argv.push(url);
    let mut full = vec!["ip", "netns", "exec", vn.node.as_str()];
    full.extend_from_slice(&argv);
    let out = std::process::Command::new(full[0])
        .args(&full[1..])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (rest, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().to_string(), rest.to_string())
}

fn https(port: u16, path: &str) -> String {
    format!("https://127.0.0.1:{port}{path}")
}

/// Waits for a stderr line of the exporter holding `needle`.
fn wait_log(started: &Started, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(l) = started
            .later
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
        {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}: {:?}",
            started.later.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exporter's stderr lines so far that hold `needle`.
fn count_log(started: &Started, needle: &str) -> usize {
    let lines = started.later.lock().unwrap();
    lines.iter().filter(|l| l.contains(needle)).count()
}

fn stop(vn: &mut VirtualNode, started: &Started) {
    common::netns::run(&["kill", "-TERM", &started.pid.to_string()]);
    let status = vn.wait_child(started.pid, Duration::from_secs(2));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn https_with_the_right_password_gets_metrics_and_nothing_else_does() {
    if !kernel_tests_possible() {
        return;
    }
    let headers = "http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=300\n";
    let port = 9300;
    let (dir, _ca, mut vn, started) = serve_tls("auth", port, &[("prometheus", "s3cret")], headers);
    let ca_file = dir.path("ca.crt");
    let ca_arg = ["--cacert", ca_file.as_str()];

    let (code, text) = curl(
        &vn,
        &https(port, "/metrics"),
        &[&ca_arg[..], &["-u", "prometheus:s3cret"]].concat(),
    );
    assert_eq!(code, "200", "{text}");
    assert!(
        text.contains("\nconntrack_monitoring_service_bytes_bucket{"),
        "{text}"
    );
    assert!(
        text.contains("Strict-Transport-Security: max-age=300\r\n"),
        "{text}"
    );
    // Again: from the cache of accepted credentials this time.
    let (code, _) = curl(
        &vn,
        &https(port, "/metrics"),
        &[&ca_arg[..], &["-u", "prometheus:s3cret"]].concat(),
    );
    assert_eq!(code, "200");

    for creds in [
        None,
        Some("prometheus:wrong"),
        Some("nobody:s3cret"),
        Some("prometheus:"),
    ] {
        let mut args = ca_arg.to_vec();
        if let Some(c) = creds {
            args.extend(["-u", c]);
        }
        let (code, text) = curl(&vn, &https(port, "/metrics"), &args);
        assert_eq!(code, "401", "{creds:?}: {text}");
        assert!(
            text.contains("WWW-Authenticate: Basic realm=\"conntrack-metrics\"\r\n"),
            "{creds:?}: {text}"
        );
        assert!(!text.contains("conntrack_monitoring_"), "{creds:?}: {text}");
    }
    // The probes' paths need TLS, not a password.
    let (code, _) = curl(&vn, &https(port, "/healthz"), &ca_arg);
    assert_eq!(code, "200");
    // Not trusted without the CA: curl refuses the certificate.
    let (code, _) = curl(&vn, &https(port, "/metrics"), &["-u", "prometheus:s3cret"]);
    assert_eq!(code, "000");

    // Plain HTTP to the TLS port: no HTTP response, only a TLS alert.
    let raw = in_netns(&vn.node, move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let auth = "Authorization: Basic cHJvbWV0aGV1czpzM2NyZXQ=\r\n"; // prometheus:s3cret
        let request = format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
        // The server may close before all of it is written: that is fine.
        let _ = s.write_all(request.as_bytes());
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    assert!(
        !String::from_utf8_lossy(&raw).contains("conntrack_monitoring"),
        "plain HTTP got metrics"
    );
    assert!(raw.is_empty() || raw[0] == 0x15, "not an alert: {raw:?}");

    // TLS 1.1 only: refused with an alert; the same hello offering TLS 1.2
    // gets a ServerHello, so the hello itself is sound.
    let answer = |version: u16| {
        in_netns(&vn.node, move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s.write_all(&client_hello(version)).unwrap();
            let mut got = [0u8; 8];
            let n = s.read(&mut got).unwrap_or(0);
            got[..n].to_vec()
        })
    };
    let tls12 = answer(0x0303);
    assert_eq!(tls12.first(), Some(&0x16), "TLS 1.2 hello: {tls12:?}");
    let tls11 = answer(0x0302);
    assert!(
        tls11.is_empty() || tls11[0] == 0x15,
        "TLS 1.1 hello got {tls11:?}"
    );
    let (code, _) = curl(
        &vn,
        &https(port, "/metrics"),
        &[
            &ca_arg[..],
            &["--tls-max", "1.1", "-u", "prometheus:s3cret"],
        ]
        .concat(),
    );
    assert_eq!(code, "000", "TLS 1.1 got an answer");

    let (_, text) = curl(
        &vn,
        &https(port, "/metrics"),
        &[&ca_arg[..], &["-u", "prometheus:s3cret"]].concat(),
    );
    let count = |series: &str| common::exporter::value(&text, series);
    assert!(
        count("conntrack_monitoring_http_tls_errors_total{node=\"n1\"}") >= 3.0,
        "{text}"
    );
    assert!(
        count("conntrack_monitoring_http_auth_total{node=\"n1\",outcome=\"no credentials\"}")
            >= 1.0
    );
    assert!(count("conntrack_monitoring_http_auth_total{node=\"n1\",outcome=\"refused\"}") >= 3.0);
    assert!(
        count("conntrack_monitoring_http_auth_total{node=\"n1\",outcome=\"accepted cached\"}")
            >= 1.0
    );
    stop(&mut vn, &started);
}

/// A TLS ClientHello offering `version` (no supported_versions extension,
/// so it is the highest version offered), ECDHE with AES-GCM and, for TLS
/// 1.1's sake, AES-CBC-SHA suites.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(version.to_be_bytes());
    body.extend([7u8; 32]); // random
    body.push(0); // no session id
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc009, 0xc013];
    body.extend(((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend(s.to_be_bytes());
    }
    body.extend([1, 0]); // null compression
    let mut ext = Vec::new();
    // supported_groups: x25519, secp256r1
    ext.extend([0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    ext.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext.extend([
        0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
    ]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
}

#[test]
fn client_certificate_mode_lets_in_only_the_ca_s_clients() {
    if !kernel_tests_possible() {
        return;
    }
    let dir = Dir::new("mtls");
    let ca = Ca::new("test ca");
    let extra = "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n";
    let config = tls_setup(&dir, &ca, &[], extra);
    let (cert, key) = ca.sign(&["prometheus.monitoring.svc"]);
    dir.write("client.crt", &cert);
    dir.write("client.key", &key);
    let other = Ca::new("another ca");
    let (cert, key) = other.sign(&["prometheus.monitoring.svc"]);
    dir.write("stranger.crt", &cert);
    dir.write("stranger.key", &key);

    let mut vn = VirtualNode::new();
    let port = 9310;
    let started = start(&mut vn, port, &config);
    let ca_file = dir.path("ca.crt");
    let with = |name: &str| {
        let (c, k) = (
            dir.path(&format!("{name}.crt")),
            dir.path(&format!("{name}.key")),
        );
        curl(
            &vn,
            &https(port, "/metrics"),
            &["--cacert", &ca_file, "--cert", &c, "--key", &k],
        )
    };
    let (code, text) = with("client");
    assert_eq!(code, "200", "{text}");
    assert!(text.contains("conntrack_monitoring_"));
    let (code, text) = with("stranger");
    assert_eq!(code, "000", "a certificate of another CA: {text}");
    let (code, text) = curl(&vn, &https(port, "/metrics"), &["--cacert", &ca_file]);
    assert_eq!(code, "000", "no certificate: {text}");
    stop(&mut vn, &started);
}

#[test]
fn sighup_and_a_rotated_certificate_reload_it_and_a_broken_file_is_kept_out() {
    if !kernel_tests_possible() {
        return;
    }
    let port = 9320;
    let (dir, _ca, mut vn, started) = serve_tls("reload", port, &[("prometheus", "old")], "");
    let ca_file = dir.path("ca.crt");
    let get = |vn: &VirtualNode, creds: &str| {
        curl(
            vn,
            &https(port, "/metrics"),
            &["--cacert", &ca_file, "-u", creds],
        )
        .0
    };
    assert_eq!(get(&vn, "prometheus:old"), "200");

    // A new password, on SIGHUP: the old one is refused from then on.
    write_config(&dir, &[("prometheus", "new")], "");
    common::netns::run(&["kill", "-HUP", &started.pid.to_string()]);
    wait_log(
        &started,
        "SIGHUP: web configuration",
        Duration::from_secs(3),
    );
    assert_eq!(get(&vn, "prometheus:old"), "401");
    assert_eq!(get(&vn, "prometheus:new"), "200");

    // A broken file: logged, the configuration in force kept.
    dir.write("web.yml", "basic_auth_users:\n  prometheus: not-a-hash\n");
    common::netns::run(&["kill", "-HUP", &started.pid.to_string()]);
    let line = wait_log(&started, "not reloaded", Duration::from_secs(3));
    assert!(line.contains("prometheus"), "{line}");
    assert_eq!(get(&vn, "prometheus:new"), "200");
    // A fresh render, not the one cached for the scrape just before.
    std::thread::sleep(Duration::from_millis(300));
    let (_, text) = curl(
        &vn,
        &https(port, "/metrics"),
        &["--cacert", &ca_file, "-u", "prometheus:new"],
    );
    let value = |s: &str| common::exporter::value(&text, s);
    assert_eq!(
        value("conntrack_monitoring_web_config_last_reload_successful{node=\"n1\"}"),
        0.0
    );
    assert_eq!(
        value("conntrack_monitoring_web_config_reloads_total{node=\"n1\",outcome=\"failure\"}"),
        1.0
    );
    // TLS off on a reload is refused too: never plain text by mistake.
    dir.write(
        "web.yml",
        &format!("basic_auth_users:\n  prometheus: {}\n", hash("new")),
    );
    common::netns::run(&["kill", "-HUP", &started.pid.to_string()]);
    wait_log(&started, "turns TLS off", Duration::from_secs(3));
    assert_eq!(get(&vn, "prometheus:new"), "200");

    // The file gone (a volume unmounted, a typo in a rollout) right after
    // a good reload: noticed without a signal, logged, the configuration in
    // force kept.
    let reloads = count_log(&started, "file changed: web configuration");
    write_config(&dir, &[("prometheus", "new")], "");
    let deadline = Instant::now() + WATCH_EVERY + Duration::from_secs(3);
    while count_log(&started, "file changed: web configuration") == reloads {
        assert!(Instant::now() < deadline, "the good file was not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(dir.path("web.yml")).unwrap();
    let line = wait_log(
        &started,
        "No such file",
        WATCH_EVERY + Duration::from_secs(3),
    );
    assert!(
        line.contains("file changed") && line.contains("not reloaded"),
        "{line}"
    );
    assert_eq!(get(&vn, "prometheus:new"), "200");

    // A certificate rotated by another CA, without a signal, as cert-manager
    // and the kubelet do it (a new folder behind the Secret volume's
    // symlinks): in force within the watch interval.
    write_config(&dir, &[("prometheus", "new")], "");
    let second = Ca::new("second ca");
    let (cert, key) = second.sign(&["127.0.0.1"]);
    dir.secret_volume(&[("tls.crt", &cert), ("tls.key", &key)]);
    dir.write("ca2.crt", &second.pem);
    let ca2 = dir.path("ca2.crt");
    let rotated = Instant::now();
    let limit = WATCH_EVERY + Duration::from_secs(3);
    loop {
        let (code, _) = curl(
            &vn,
            &https(port, "/metrics"),
            &["--cacert", &ca2, "-u", "prometheus:new"],
        );
        if code == "200" {
            break;
        }
        assert!(
            rotated.elapsed() < limit,
            "the rotated certificate is not served: {code}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_log(
        &started,
        "file changed: web configuration",
        Duration::from_secs(1),
    );
    // The first CA's certificate is no longer the one served.
    assert_eq!(get(&vn, "prometheus:new"), "000");
    stop(&mut vn, &started);
}

#[test]
fn a_broken_file_at_start_exits_2_with_the_reason() {
    let dir = Dir::new("start");
    let cases = [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            "missing.crt",
        ),
        ("basic_auth_users:\n  alice: plain\n", "alice"),
        ("tls_server_config:\n  min_version: TLS14\n", "TLS14"),
        ("no_such_key: 1\n", "no_such_key"),
        (
            "tls_server_config:\n  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n",
            "RC4",
        ),
    ];
    for (text, needle) in cases {
        let config = dir.write("web.yml", text);
        // `timeout`: a file wrongly taken would start the exporter.
        let out = std::process::Command::new("timeout")
            .args(["10", env!("CARGO_BIN_EXE_conntrack-metrics")])
            .args(["--no-sysctl", "--metrics-bind-address", "127.0.0.1:0"])
            .args(["--web.config.file", &config])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(
            stderr.contains("--web.config.file") && stderr.contains(needle),
            "{stderr}"
        );
    }
    // The other spelling names the same flag.
    let out = std::process::Command::new("timeout")
        .args(["10", env!("CARGO_BIN_EXE_conntrack-metrics")])
        .args(["--no-sysctl", "--metrics-bind-address", "127.0.0.1:0"])
        .args(["--web-config-file", &dir.path("none.yml")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.yml"));
}

/// CPU seconds (user + system) the thread of `pid` named `name` has used.
fn thread_cpu(pid: u32, name: &str) -> f64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        return ticks / hz;
    }
    panic!("no thread {name} in {pid}");
}

#[test]
fn a_flood_of_wrong_passwords_is_held_to_the_check_share_and_prometheus_still_gets_in() {
    if !kernel_tests_possible() {
        return;
    }
    let port = 9330;
    let (dir, ca, mut vn, started) = serve_tls("flood", port, &[("prometheus", "right")], "");
    let ca_file = dir.path("ca.crt");
    let scrape = |vn: &VirtualNode| {
        curl(
            vn,
            &https(port, "/metrics"),
            &["--cacert", &ca_file, "-u", "prometheus:right"],
        )
        .0
    };
    assert_eq!(scrape(&vn), "200"); // now cached

    // Four source addresses (all of 127/8 is local), two flooders each: every request a TLS
    // connection with a new wrong password.
    let ca_pem = ca.pem.clone();
    let stop_flood = Arc::new(AtomicBool::new(false));
    let mut flooders = Vec::new();
    for i in 0..8u8 {
        let stop_flood = Arc::clone(&stop_flood);
        let ca_pem = ca_pem.clone();
        let from = Ipv4Addr::new(127, 0, 0, 1 + i % 4);
        flooders.push(spawn_in_netns(&vn.node, move || {
            flood(from, port, &ca_pem, i, &stop_flood)
        }));
    }
    let before = thread_cpu(started.pid, "ct-web-auth");
    let t0 = Instant::now();
    let flood_for = Duration::from_secs(6);
    let serving_before = thread_cpu(started.pid, "conntrack-metri");
    let (mut scrapes, mut scrapes_ok) = (0, 0);
    while t0.elapsed() < flood_for {
        scrapes += 1;
        if scrape(&vn) == "200" {
            scrapes_ok += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let spent = thread_cpu(started.pid, "ct-web-auth") - before;
    let serving = thread_cpu(started.pid, "conntrack-metri") - serving_before;
    let elapsed = t0.elapsed().as_secs_f64();
    stop_flood.store(true, Ordering::Relaxed);
    let sent: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    // The share, the burst, and one check that overdraws it (cost 10: well
    // under 0.3 s with the optimized bcrypt of every build).
    let bound = CHECK_CPU_SHARE * elapsed + 0.5 + 0.3;
    eprintln!(
        "flood: {sent} wrong passwords in {elapsed:.1} s; ct-web-auth used {spent:.2} CPU s (bound {bound:.2}), \
         the endpoint thread {serving:.2} (TLS handshakes, 429s); Prometheus {scrapes_ok} of {scrapes} scrapes through"
    );
    assert!(sent > 50, "the flood did not flood: {sent}");
    assert!(
        spent <= bound,
        "ct-web-auth used {spent:.2} CPU s in {elapsed:.1} s"
    );
    // Its credentials are cached: no check, no limit applies to it.
    assert!(
        scrapes >= 4 && scrapes_ok + 1 >= scrapes,
        "Prometheus got {scrapes_ok} of {scrapes} scrapes through"
    );
    let (_, text) = curl(
        &vn,
        &https(port, "/metrics"),
        &["--cacert", &ca_file, "-u", "prometheus:right"],
    );
    let limited = common::exporter::value(
        &text,
        "conntrack_monitoring_http_auth_total{node=\"n1\",outcome=\"limited\"}",
    );
    assert!(limited > 0.0, "nothing was limited");
    stop(&mut vn, &started);
}

/// Sends requests with wrong passwords from `from` until `stop`, each on a
/// new TLS connection; returns how many got an answer.
fn flood(from: Ipv4Addr, port: u16, ca_pem: &str, id: u8, stop: &AtomicBool) -> u64 {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let mut n = 0u64;
    let mut answered = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let Ok(mut sock) = connect_from(from, to, Duration::from_secs(2)) else {
            continue;
        };
        sock.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let creds = format!("prometheus:wrong-{id}-{n}");
        let encoded = base64_encode(creds.as_bytes());
        let req = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {encoded}\r\nConnection: close\r\n\r\n");
        if tls.write_all(req.as_bytes()).is_err() {
            continue;
        }
        let mut got = Vec::new();
        let _ = tls.read_to_end(&mut got);
        if got.starts_with(b"HTTP/1.1 ") {
            answered += 1;
            assert!(!got.starts_with(b"HTTP/1.1 200"), "a wrong password got in");
        }
    }
    answered
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
