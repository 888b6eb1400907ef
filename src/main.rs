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
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use mio::{Poll, Waker};

use conntrack_metrics::config::{self, Config};
use conntrack_metrics::expo::http::{Endpoint, Limits};
use conntrack_metrics::expo::scrape::{Exposition, ScrapeOptions};
use conntrack_metrics::flow::{FlowTracker, KernelFiltered, ReaderShare, ServiceFilter, Subnet};
use conntrack_metrics::offload::bpf;
use conntrack_metrics::offload::event_mask::{self, EventMask};
use conntrack_metrics::reader::{
    self, ReaderOptions, FLOW_TABLE_CAPACITY, FLOW_TABLE_FLOWS, READER_DATAGRAMS, SLOT_BYTES,
};
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
        "Service flows being tracked between their NEW and DESTROY, by event reader"
    );
    metrics::describe_gauge!(
        FLOW_TABLE_CAPACITY,
        "Flows each reader's flow table holds before it evicts the oldest (--max-flows / --readers)"
    );
    metrics::describe_counter!(
        READER_DATAGRAMS,
        "Netlink datagrams each event reader received (each a conntrack event or a control message)"
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

    // The event mask first: flows created from here on carry it.
    let event_mask = if config.event_mask {
        let mask = EventMask::install(&config.svc_subnets, &config.exclude_subnets)
            .map_err(io::Error::other)?;
        log!(
            "--event-mask: table {} set: the kernel builds no events for flows outside \
             the service subnets (for ANY listener on this node)",
            event_mask::TABLE
        );
        Some(mask)
    } else {
        match event_mask::remove_stale() {
            Ok(true) => log!(
                "removed table {} left by an earlier run (no --event-mask now)",
                event_mask::TABLE
            ),
            Ok(false) => {}
            Err(e) => log!("warning: {e}"),
        }
        None
    };

    let readers = config.readers;
    let cpus = reader_cpus(&config.reader_cpu, readers);
    let window = SummaryWindow::from_minutes(config.summary_timeout.into());
    let shards = Arc::new(ShardSet::new(config.stats_shards.max(readers), window));
    let mut kernel_filtered = KernelFiltered {
        non_service: !config.no_socket_filter,
        other_shares: readers > 1,
    };
    let mut sockets = Vec::with_capacity(readers);
    for index in 0..readers {
        let socket = ConntrackSocket::open(EventGroups::ALL, config.rcvbuf_bytes).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot subscribe to conntrack events: {e} \
                     (needs root or CAP_NET_ADMIN in this network namespace)"
                ),
            )
        })?;
        let share = ReaderShare::new(index as u32, readers as u32).map_err(io::Error::other)?;
        if kernel_filtered.non_service || kernel_filtered.other_shares {
            // Without --no-socket-filter, only Service flows pass; with it
            // (and several readers), every flow of this reader's share.
            let everything = [Subnet::ALL_V4, Subnet::ALL_V6];
            let (services, excluded): (&[Subnet], &[Subnet]) = if kernel_filtered.non_service {
                (&config.svc_subnets, &config.exclude_subnets)
            } else {
                (&everything, &[])
            };
            // The Service filter also keeps out the events the tracker cannot
            // use, unless every event is to be printed.
            let events = if kernel_filtered.non_service && !config.print_events {
                bpf::FlowEvents::Used
            } else {
                bpf::FlowEvents::All
            };
            let attached = bpf::service_event_filter(services, excluded, Some(share), events)
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|program| socket.attach_filter(&program));
            match attached {
                Ok(()) => {}
                // One reader is right without the filter, only costlier: the
                // same tests run in userspace.
                Err(e) if readers == 1 => {
                    log!(
                        "warning: kernel socket filter not attached ({e}); every event \
                         reaches the reader and is filtered there"
                    );
                    kernel_filtered.non_service = false;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "cannot attach the kernel socket filter that splits the flows \
                             between --readers: {e}"
                        ),
                    ))
                }
            }
        }
        if index == 0 {
            log!(
                "subscribed to conntrack NEW/UPDATE/DESTROY with {readers} reader(s), \
                 receive buffer {} bytes each, kernel filter: {}",
                socket.granted_rcvbuf(),
                match (kernel_filtered.non_service, readers > 1) {
                    (true, false) => "service flows".to_string(),
                    (true, true) => format!("service flows, 1/{readers} of them per reader"),
                    (false, true) => format!("1/{readers} of all flows per reader"),
                    (false, false) => "none (--no-socket-filter)".to_string(),
                }
            );
            metrics::gauge!(RCVBUF).set(socket.granted_rcvbuf() as f64);
        }
        sockets.push((socket, share));
    }

    let (endpoint, stop) =
        Endpoint::bind(config.metrics_bind_address, Limits::default()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", config.metrics_bind_address),
            )
        })?;

    // Each reader drains events queued since its subscription; /readyz says
    // 503 until every reader's loop runs. If one stops, it stops the others
    // and the endpoint.
    let stopping = Arc::new(AtomicBool::new(false));
    let mut polls = Vec::with_capacity(readers);
    let mut wakers = Vec::with_capacity(readers);
    for _ in 0..readers {
        let poll = Poll::new()?;
        wakers.push(Arc::new(Waker::new(poll.registry(), reader::WAKE)?));
        polls.push(poll);
    }
    let wakers = Arc::new(wakers);
    let wake_all = {
        let (stop, wakers, stopping) = (stop.clone(), Arc::clone(&wakers), Arc::clone(&stopping));
        move || {
            stopping.store(true, Ordering::Release);
            for waker in wakers.iter() {
                let _ = waker.wake();
            }
            stop.stop();
        }
    };

    // SIGTERM, SIGINT, SIGHUP: stop the readers and the endpoint; main returns.
    {
        let wake_all = wake_all.clone();
        std::thread::Builder::new()
            .name("ct-signals".into())
            .spawn(move || {
                if let Ok(name) = signal::wait_for_stop_signal() {
                    log!("{name}: stopping");
                }
                wake_all();
            })?;
    }

    let filter = ServiceFilter::new(config.svc_subnets.clone(), config.exclude_subnets.clone());
    // Every socket is subscribed by now: flows that started earlier may have
    // events the readers never got, and are not measured.
    let subscribed_ns = reader::wall_clock_ns();
    let mut ready_flags = Vec::with_capacity(readers);
    let mut threads = Vec::with_capacity(readers);
    for (index, ((socket, share), mut poll)) in sockets.into_iter().zip(polls).enumerate() {
        let stopping = Arc::clone(&stopping);
        let shards = Arc::clone(&shards);
        let ready = Arc::new(AtomicBool::new(false));
        ready_flags.push(Arc::clone(&ready));
        let (batch_size, print, cpu) = (config.recv_batch, config.print_events, cpus[index]);
        let drain_delay = Duration::from_micros(config.drain_delay_us);
        // Allocated here, before the reader starts: the per-event path never allocates.
        let mut flows = FlowTracker::for_reader(
            filter.clone(),
            config.max_flows / readers,
            share,
            kernel_filtered,
            subscribed_ns,
        );
        metrics::gauge!(FLOW_TABLE_CAPACITY, "reader" => index.to_string())
            .set(flows.capacity() as f64);
        let wake_all = wake_all.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ct-reader-{index}"))
            .spawn(move || -> io::Result<()> {
                let result = (|| {
                    let mut shard = shards.writer(index).ok_or_else(|| {
                        io::Error::other(format!("stats shard {index} already has a writer"))
                    })?;
                    let mut batch = RecvBatch::new(batch_size, SLOT_BYTES);
                    if let Some(core) = cpu {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                            log!("could not pin event reader {index} to CPU {core}");
                        }
                    }
                    // --print-events only. Not `lock()`ed for the thread's
                    // life: with several readers each line takes the lock.
                    let mut stdout = io::stdout();
                    let print: Option<&mut dyn io::Write> =
                        if print { Some(&mut stdout) } else { None };
                    let options = ReaderOptions { index, drain_delay };
                    reader::run(
                        options, &socket, &mut poll, &stopping, &mut batch, &mut shard, &mut flows,
                        &ready, print,
                    )
                })();
                wake_all();
                result
            })?;
        threads.push(thread);
    }

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
        &|| ready_flags.iter().all(|r| r.load(Ordering::Acquire)),
    );
    served.map_err(|e| io::Error::new(e.kind(), format!("HTTP endpoint stopped: {e}")))?;
    // The endpoint only stops when a reader has stopped, or all are stopping.
    wake_all();
    let mut outcome = Ok(());
    for (index, thread) in threads.into_iter().enumerate() {
        let result = match thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::new(
                e.kind(),
                format!("event reader {index} stopped: {e}"),
            )),
            Err(_) => Err(io::Error::other(format!("event reader {index} panicked"))),
        };
        if outcome.is_ok() {
            outcome = result;
        }
    }
    if let Some(mask) = event_mask {
        match mask.remove() {
            Ok(()) => log!("--event-mask: table {} removed", event_mask::TABLE),
            Err(e) => log!("warning: {e}"),
        }
    }
    outcome
}

/// The CPU each reader is pinned to: the ones given, else none for a single
/// reader, else the first `readers` CPUs this process may run on (in turn,
/// if there are fewer).
fn reader_cpus(given: &[usize], readers: usize) -> Vec<Option<usize>> {
    if !given.is_empty() {
        return given.iter().copied().map(Some).collect();
    }
    if readers == 1 {
        return vec![None];
    }
    let allowed = config::allowed_cpus().unwrap_or_default();
    (0..readers)
        .map(|i| (!allowed.is_empty()).then(|| allowed[i % allowed.len()]))
        .collect()
}
