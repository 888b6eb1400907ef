//! conntrack-metrics binary: flags -> [`Config`] -> the reader thread and the
//! exporter thread.
//!
//! Order matters: the netlink subscription is made before the HTTP endpoint
//! listens, so no scrape can happen before events are being read.

use std::io;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use mio::{Poll, Waker};

use conntrack_metrics::config::Config;
use conntrack_metrics::expo::http::{Endpoint, Limits};
use conntrack_metrics::expo::scrape::{Exposition, ScrapeOptions};
use conntrack_metrics::flow::{FlowTracker, ServiceFilter};
use conntrack_metrics::reader::{self, FLOW_TABLE_CAPACITY, FLOW_TABLE_FLOWS, SLOT_BYTES};
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::ShardSet;
use conntrack_metrics::sys::signal;
use conntrack_metrics::sys::sysctl::{self, Outcome};
use conntrack_metrics::sys::{ConntrackSocket, EventGroups, RecvBatch};

const SCRAPE_DURATION: &str = "conntrack_monitoring_scrape_duration_seconds";
const RCVBUF: &str = "conntrack_monitoring_netlink_receive_buffer_bytes";

/// A line on stderr. A closed or full stderr must not stop the exporter, so
/// write errors are ignored (`eprintln!` would panic on them).
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "conntrack-metrics: {}", format_args!($($arg)*));
    }};
}

fn main() -> ExitCode {
    // Before any thread starts, so that every thread inherits the mask and
    // only the signal thread takes SIGTERM, SIGINT and SIGHUP.
    if let Err(e) = signal::block_stop_signals() {
        log!("cannot block termination signals: {e}");
        return ExitCode::FAILURE;
    }
    let config = Config::parse_args();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> io::Result<()> {
    let recorder = PrometheusBuilder::new()
        .add_global_label("node", config.node_name.clone())
        .set_buckets_for_metric(
            Matcher::Full(SCRAPE_DURATION.into()),
            &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25],
        )
        .map_err(|e| io::Error::other(e.to_string()))?
        .build_recorder();
    let facade = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| io::Error::other(e.to_string()))?;
    metrics::describe_gauge!(
        RCVBUF,
        metrics::Unit::Bytes,
        "Receive buffer the kernel granted the netlink socket"
    );
    metrics::describe_gauge!(
        FLOW_TABLE_FLOWS,
        "Service flows being tracked between their NEW and DESTROY"
    );
    metrics::describe_gauge!(
        FLOW_TABLE_CAPACITY,
        "Flows the flow table holds before it evicts the oldest (--max-flows)"
    );
    metrics::describe_histogram!(
        SCRAPE_DURATION,
        metrics::Unit::Seconds,
        "Time to merge the shards and render one scrape"
    );

    let sysctls = Path::new("/proc/sys/net/netfilter");
    match sysctl::enable(sysctls, !config.no_sysctl) {
        Ok(outcomes) => {
            for outcome in outcomes {
                match outcome {
                    Outcome::TurnedOn(name) => log!("set {name} to 1 (was 0)"),
                    Outcome::LeftOff(name) => log!(
                        "warning: {name} is 0 and --no-sysctl leaves it: flows get no \
                         counters or timestamps, so they are not measured"
                    ),
                    Outcome::AlreadyOn(_) => {}
                }
            }
        }
        Err(e) if config.no_sysctl => log!("warning: {e}"),
        Err(e) => return Err(e),
    }

    let socket = ConntrackSocket::open(EventGroups::ALL, config.rcvbuf_bytes).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot subscribe to conntrack events: {e} \
                 (needs root or CAP_NET_ADMIN in this network namespace)"
            ),
        )
    })?;
    log!(
        "subscribed to conntrack NEW/UPDATE/DESTROY, receive buffer {} bytes",
        socket.granted_rcvbuf()
    );
    metrics::gauge!(RCVBUF).set(socket.granted_rcvbuf() as f64);

    let window = SummaryWindow::from_minutes(config.summary_timeout.into());
    let shards = Arc::new(ShardSet::new(config.stats_shards, window));
    let ready = Arc::new(AtomicBool::new(false));
    let (endpoint, stop) =
        Endpoint::bind(config.metrics_bind_address, Limits::default()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", config.metrics_bind_address),
            )
        })?;

    // The reader drains events queued since the subscription; /readyz says
    // 503 until its loop runs. If it ever stops, it stops the endpoint too.
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), reader::WAKE)?);
    let stopping = Arc::new(AtomicBool::new(false));

    // SIGTERM, SIGINT, SIGHUP: stop the reader and the endpoint; main returns.
    {
        let (stop, waker, stopping) = (stop.clone(), Arc::clone(&waker), Arc::clone(&stopping));
        std::thread::Builder::new()
            .name("ct-signals".into())
            .spawn(move || {
                if let Ok(name) = signal::wait_for_stop_signal() {
                    log!("{name}: stopping");
                }
                stopping.store(true, Ordering::Release);
                let _ = waker.wake();
                stop.stop();
            })?;
    }

    let reader = {
        let stopping = Arc::clone(&stopping);
        let (shards, ready) = (Arc::clone(&shards), Arc::clone(&ready));
        let (batch_size, print) = (config.recv_batch, config.print_events);
        let reader_cpu = config.reader_cpu;
        let filter = ServiceFilter::new(config.svc_subnets.clone(), config.exclude_subnets.clone());
        // Allocated here, before the reader starts: the per-event path never allocates.
        let mut flows = FlowTracker::new(filter, config.max_flows);
        metrics::gauge!(FLOW_TABLE_CAPACITY).set(flows.capacity() as f64);
        std::thread::Builder::new()
            .name("ct-reader".into())
            .spawn(move || -> io::Result<()> {
                let result = (|| {
                    let mut shard = shards
                        .writer(0)
                        .ok_or_else(|| io::Error::other("stats shard 0 already has a writer"))?;
                    let mut batch = RecvBatch::new(batch_size, SLOT_BYTES);
                    if let Some(core) = reader_cpu {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                            log!("could not pin the event reader to CPU {core}");
                        }
                    }
                    let mut stdout = io::stdout().lock();
                    let print: Option<&mut dyn io::Write> =
                        if print { Some(&mut stdout) } else { None };
                    reader::run(
                        &socket, &mut poll, &stopping, &mut batch, &mut shard, &mut flows, &ready,
                        print,
                    )
                })();
                stop.stop();
                result
            })?
    };

    log!("serving /metrics on {}", endpoint.local_addr());
    let options = ScrapeOptions {
        node: config.node_name.clone(),
        legacy_names: config.legacy_names,
    };
    let mut exposition = Exposition::new(Arc::clone(&shards), options, Some(facade));
    let scrape_duration = metrics::histogram!(SCRAPE_DURATION);
    let served = endpoint.run(
        &mut |format, out| {
            let start = Instant::now();
            exposition.render(format, out);
            scrape_duration.record(start.elapsed().as_secs_f64());
        },
        &|| ready.load(Ordering::Acquire),
    );
    served.map_err(|e| io::Error::new(e.kind(), format!("HTTP endpoint stopped: {e}")))?;
    // The endpoint only stops when the reader has stopped.
    match reader.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(io::Error::new(
            e.kind(),
            format!("event reader stopped: {e}"),
        )),
        Err(_) => Err(io::Error::other("event reader panicked")),
    }
}
