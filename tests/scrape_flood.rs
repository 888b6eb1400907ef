//! End to end against the real kernel: a flood of scrapes does not starve the
//! event reader, nor lock a scraper out. A virtual node runs the exporter and
//! an `ab` load through a Service (ClusterIP DNAT); meanwhile 64 clients
//! pipeline `GET /metrics` at full speed and one scraper asks every 0.5 s
//! with a 1 s timeout. The scraper gets at least 99 % of its scrapes, every
//! flow of the load is counted, and the reader never overruns. Needs root,
//! `ab` (apache2-utils); see `tests/run.sh`.

mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::exporter::{scrape_until, start, value};
use common::netns::{connect_from, kernel_tests_possible, spawn_in_netns, VirtualNode};
use common::traffic::{self, start_backend, HTTP_BACKEND};

const RULESET: &str = r#"
table inet ctm_test {
    counter tcp_flows {}
    chain prerouting {
        type nat hook prerouting priority dstnat;
        ip daddr 10.96.1.1 tcp dport 80 counter name tcp_flows dnat ip to 10.200.2.2:8080
    }
    # Scrapes over loopback must not create flows of their own.
    chain raw_pre { type filter hook prerouting priority raw; iif lo notrack; }
    chain raw_out { type filter hook output priority raw; oif lo notrack; }
}
"#;

const PORT: u16 = 9100;
/// Clients of the flood, each on its own keep-alive connection.
const FLOOD_CLIENTS: usize = 64;
/// Requests each flood client keeps in flight: it sends one more for each
/// response it reads.
const IN_FLIGHT: usize = 16;
/// The scraper's interval and timeout, and how many scrapes it makes (15 s).
const SCRAPE_EVERY: Duration = Duration::from_millis(500);
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
const SCRAPES: u32 = 30;
/// Connections of the `ab` load through the Service.
const AB_REQUESTS: &str = "5000";

/// The status and whole length of the response at the start of `buf`, once
/// it is all there.
fn complete_response(buf: &[u8]) -> Option<(u16, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!("bad response: {e}"),
    };
    let length: usize = parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
        .expect("Content-Length");
    let total = head + length;
    (buf.len() >= total).then_some((parsed.code.unwrap(), total))
}

/// One flood client, until `stop`: connects from 127.0.0.1, keeps
/// [`IN_FLIGHT`] requests in flight and reads every response, reconnecting at
/// once when refused or closed. Returns the 200s it got.
fn flood(stop: &AtomicBool) -> u64 {
    const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: flood\r\n\r\n";
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let mut served = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            continue;
        };
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        conn.set_write_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        if conn.write_all(&REQUEST.repeat(IN_FLIGHT)).is_err() {
            continue;
        }
        let mut filled = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Some((status, len)) = complete_response(&buf[..filled]) {
                if status != 200 {
                    break; // refused: 503 and close
                }
                served += 1;
                buf.copy_within(len..filled, 0);
                filled -= len;
                if conn.write_all(REQUEST).is_err() {
                    break;
                }
                continue;
            }
            if filled == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match conn.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
    }
    served
}

/// One scrape as a scraper makes it: a new connection, from 127.0.0.2, and a
/// whole 200 response within [`SCRAPE_TIMEOUT`] of the start.
fn scrape_once() -> bool {
    let start = Instant::now();
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
    let Ok(mut conn) = connect_from(Ipv4Addr::new(127, 0, 0, 2), to, SCRAPE_TIMEOUT) else {
        return false;
    };
    let request = b"GET /metrics HTTP/1.1\r\nHost: scraper\r\nConnection: close\r\n\r\n";
    if conn.write_all(request).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some((status, _)) = complete_response(&buf) {
            return status == 200 && start.elapsed() < SCRAPE_TIMEOUT;
        }
        let Some(left) = SCRAPE_TIMEOUT.checked_sub(start.elapsed()) else {
            return false;
        };
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// [`SCRAPES`] scrapes, one every [`SCRAPE_EVERY`] (or at once when the last
/// took longer); returns how many succeeded.
fn scraper() -> u32 {
    let first = Instant::now();
    let mut ok = 0;
    for k in 0..SCRAPES {
        let at = first + SCRAPE_EVERY * k;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        ok += u32::from(scrape_once());
    }
    ok
}

#[test]
fn a_scrape_flood_starves_neither_the_reader_nor_the_scraper() -> io::Result<()> {
    if !kernel_tests_possible() {
        return Ok(());
    }
    let started = Instant::now();
    let mut vn = VirtualNode::new();
    vn.short_timeouts();
    vn.nft(RULESET);
    let (node, client, backend) = (vn.node.clone(), vn.client.clone(), vn.backend.clone());
    start_backend(&mut vn, &backend, HTTP_BACKEND);
    let _out = start(&mut vn, PORT, &[]);

    // The flood comes from 127.0.0.1 and the scraper from 127.0.0.2: the
    // endpoint caps connections per address, and a scraper sharing the
    // flood's address would share its few slots. A real Prometheus scrapes
    // from an address of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..FLOOD_CLIENTS)
        .map(|_| {
            let stop = Arc::clone(&stop);
            spawn_in_netns(&node, move || flood(&stop))
        })
        .collect();
    let scraper = spawn_in_netns(&node, scraper);
    let ab = vn.spawn(
        &client,
        &[
            "ab",
            "-q",
            "-n",
            AB_REQUESTS,
            "-c",
            "50",
            "http://10.96.1.1:80/",
        ],
        Stdio::piped(),
        Stdio::inherit(),
    );
    let ab_pid = ab.id();
    let mut ab_out = ab.stdout.take().unwrap();
    let ab_status = vn.wait_child(ab_pid, Duration::from_secs(120));
    let scraped = scraper.join().unwrap();
    // The flood lasts until both the load and the scraper are done.
    stop.store(true, Ordering::Relaxed);
    let flooded: u64 = flooders.into_iter().map(|f| f.join().unwrap()).sum();
    let flood_time = started.elapsed();
    assert!(ab_status.is_some_and(|s| s.success()), "ab: {ab_status:?}");
    let mut ab_report = String::new();
    ab_out.read_to_string(&mut ab_report)?;
    let ab_complete = ab_report
        .lines()
        .find_map(|l| l.strip_prefix("Complete requests:"))
        .map(str::trim)
        .unwrap_or("?");

    // TIME_WAIT is 1 s here; then a flush ends whatever is left at once.
    std::thread::sleep(Duration::from_millis(1500));
    vn.exec(&node, &["conntrack", "-F"]);
    let flows = traffic::nft_counter(&vn, "inet ctm_test", "tcp_flows");
    let count = "conntrack_monitoring_service_duration_seconds_count{node=\"n1\"}";
    let text = scrape_until(&vn, PORT, count, flows);
    let counted = value(&text, count);
    let overruns = value(
        &text,
        "conntrack_monitoring_netlink_overruns_total{node=\"n1\"}",
    );
    let refused = |reason: &str| {
        let series = format!(
            "conntrack_monitoring_http_connections_refused_total{{node=\"n1\",reason=\"{reason}\"}}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or("absent".to_string(), |v| v.trim().to_string())
    };
    eprintln!(
        "scraper: {scraped} of {SCRAPES} scrapes; flood: {flooded} responses; \
         ab: {ab_complete} complete, {flows} flows through the DNAT, {counted} counted; \
         overruns: {overruns}; refused: peer cap {}, connection cap {}; \
         flood and load {flood_time:?}",
        refused("peer cap"),
        refused("connection cap"),
    );
    assert!(
        flooded > u64::from(SCRAPES),
        "the flood was served too little"
    );
    assert!(flows >= 5000.0, "{flows} flows");
    assert_eq!(counted, flows, "every flow of the load is counted");
    assert_eq!(overruns, 0.0);
    assert!(
        scraped * 100 >= SCRAPES * 99,
        "the scraper got {scraped} of {SCRAPES} scrapes"
    );
    Ok(())
}
