//! conntrack-metrics binary: flags -> [`Config`] -> the reader threads and
//! the exporter thread, as a list of named steps.
//!
//! Order matters: the netlink subscription is made before the HTTP endpoint
//! listens, so no scrape can happen before events are being read; and all
//! memory is allocated before a reader starts.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conntrack_metrics::census::node_stats::NodeStats;
use conntrack_metrics::census::{self, Census};
use conntrack_metrics::config::Config;
use conntrack_metrics::expo::http::{Endpoint, Limits, StopHandle};
use conntrack_metrics::expo::scrape::{Exposition, KeyLabels, ScrapeOptions};
use conntrack_metrics::expo::web_config::WebConfig;
use conntrack_metrics::flow::services::label_overflow_blocks;
use conntrack_metrics::flow::{
    FlowTracker, KernelFiltered, LiveFlows, ReaderShare, ServiceBudget, ServiceFilter, ServiceKey,
    ServiceSlots,
};
use conntrack_metrics::log;
use conntrack_metrics::offload::event_mask::{self, EventMask};
use conntrack_metrics::offload::socket_filter::SocketFilters;
use conntrack_metrics::reader::threads::{self, ReaderPlan, Readers};
use conntrack_metrics::reader::{ignores_event_stamps, wall_clock_ns, ReaderOptions};
use conntrack_metrics::service_names::ServiceNames;
use conntrack_metrics::stats::self_metrics::{
    EVENT_MASK_HELD, READERS_STUCK, RECEIVE_BUFFER, SCRAPE_DURATION,
};
use conntrack_metrics::stats::summary::SummaryWindow;
use conntrack_metrics::stats::{Registry, SeriesKey, ShardSet};
use conntrack_metrics::sys::local_addresses::local_addresses;
use conntrack_metrics::sys::privileges;
use conntrack_metrics::sys::signal::{self, Signal};
use conntrack_metrics::sys::sysctl::{self, Outcome};
use conntrack_metrics::sys::{ConntrackSocket, EventGroups};
use crossbeam_channel::Sender;

fn main() -> ExitCode {
    // Before any thread starts, so that every thread inherits the mask and
    // only the signal thread takes SIGTERM, SIGINT and SIGHUP.
    if let Err(e) = signal::block_stop_signals() {
        log!("cannot block termination signals: {e}");
        return ExitCode::FAILURE;
    }
    threads::report_reader_panics();
    let config = Config::parse_args();
    // A broken web configuration is a bad flag: exit 2 with the reason,
    // before anything starts.
    let web = match web_config(&config) {
        Ok(web) => web,
        Err(e) => {
            log!("--web.config.file: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread or child starts, so that each inherits it.
    match privileges::keep_only_net_admin() {
        Ok(kept) if kept.net_admin => log!(
            "capabilities: CAP_NET_ADMIN only (every other one dropped, {} from the bounding set)",
            kept.bounding_dropped
        ),
        Ok(_) => log!("capabilities: none (CAP_NET_ADMIN was not granted)"),
        Err(e) => log!("warning: could not drop capabilities: {e}"),
    }
    if config.sysctls_only {
        // The init container's step: nothing else starts.
        return match conntrack_sysctls(&config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&config, web) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The web configuration file, loaded and checked, with its path.
fn web_config(config: &Config) -> Result<Option<(PathBuf, WebConfig)>, String> {
    let Some(path) = &config.web_config_file else {
        return Ok(None);
    };
    let web = WebConfig::load(path)?;
    for w in &web.warnings {
        log!("warning: --web.config.file: {w}");
    }
    log!(
        "web configuration {}: TLS {}, {} user(s); read again on SIGHUP and when it changes",
        path.display(),
        if web.tls.is_some() { "on" } else { "off" },
        web.users.len()
    );
    Ok(Some((path.clone(), web)))
}

fn run(config: &Config, web: Option<(PathBuf, WebConfig)>) -> io::Result<()> {
    let registry = metrics_registry(config)?;
    conntrack_sysctls(config)?;
    let mut event_mask = event_mask(config)?;
    let (sockets, kernel_filtered) = subscribe(config)?;
    if ignores_event_stamps() {
        log!(
            "test build: the kernel's event stamps are ignored \
             (CONNTRACK_METRICS_IGNORE_EVENT_STAMPS=1): latencies from receive times"
        );
    }
    let (endpoint, endpoint_stop) = listen(config, web)?;
    let (plans, mailboxes) = reader_plans(config, sockets, kernel_filtered);
    let (polls, readers_stop) = threads::polls(plans.len())?;
    let reload = endpoint_stop.clone();
    let stop_all = {
        let readers_stop = readers_stop.clone();
        move || {
            readers_stop.stop();
            endpoint_stop.stop();
        }
    };
    stop_on_signals(stop_all.clone(), move || reload.reload())?;
    let options = reader_options(config);
    let readers = Readers::start(
        &registry,
        plans,
        polls,
        options,
        &readers_stop,
        stop_all.clone(),
    )?;
    table_census(config, mailboxes, readers_stop.clone());
    let served = serve(config, registry, endpoint, &readers, event_mask.as_mut());
    // The endpoint only stops when a reader has stopped, or all are stopping.
    stop_all();
    let outcome = served.and(readers.join());
    remove_event_mask(event_mask);
    outcome
}

/// The one registry: the shards the readers write (one per reader at
/// least), and the self-metrics, with the `metrics` facade's recorder
/// writing into it.
fn metrics_registry(config: &Config) -> io::Result<Arc<Registry>> {
    let window = SummaryWindow::from_minutes(config.summary_timeout.into());
    let count = config.stats_shards.max(config.readers);
    let shards = match service_budget(config) {
        Some(budget) => {
            // One block per Service slot, and the overflow's.
            let blocks = ServiceSlots::new(budget).blocks();
            let shards = ShardSet::with_blocks(count, window, blocks);
            label_overflow_blocks(&shards);
            shards
        }
        None => ShardSet::new(count, window),
    };
    let registry = Arc::new(Registry::new(shards));
    metrics::set_global_recorder(registry.recorder())
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(registry)
}

/// With `--service-labels`, how Services get series of their own.
fn service_budget(config: &Config) -> Option<ServiceBudget> {
    // Test builds take the idle time in seconds from the environment, so a
    // test need not wait minutes; a release build has no such variable.
    let test_seconds = std::env::var("CONNTRACK_METRICS_TEST_SERVICE_IDLE_SECONDS")
        .ok()
        .filter(|_| cfg!(debug_assertions))
        .and_then(|v| v.parse::<u64>().ok());
    let idle_ns = test_seconds.map_or(
        u64::from(config.service_idle_minutes) * 60_000_000_000,
        |seconds| seconds * 1_000_000_000,
    );
    config.service_labels.then_some(ServiceBudget {
        max_services: config.max_services,
        idle_ns,
    })
}

/// `nf_conntrack_acct` and `nf_conntrack_timestamp` on (or, with
/// `--no-sysctl`, only checked).
fn conntrack_sysctls(config: &Config) -> io::Result<()> {
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
            Ok(())
        }
        Err(e) if config.no_sysctl => {
            log!("warning: {e}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The legacy `--event-mask` table of earlier versions removed; with
/// `--event-mask`, this instance's own table set (flows created from here
/// on carry its mask).
fn event_mask(config: &Config) -> io::Result<Option<EventMask>> {
    match event_mask::remove_legacy() {
        Ok(true) => log!(
            "removed table {} of an earlier version",
            event_mask::LEGACY_TABLE
        ),
        Ok(false) => {}
        Err(e) => log!("warning: {e}"),
    }
    if !config.event_mask {
        return Ok(None);
    }
    let mask = EventMask::install(&config.svc_subnets, &config.exclude_subnets)
        .map_err(io::Error::other)?;
    log!(
        "--event-mask: table {} set: the kernel builds no events for flows outside \
         the service subnets (for ANY listener on this node)",
        mask.table()
    );
    Ok(Some(mask))
}

/// Removes this instance's `--event-mask` table, if it set one.
fn remove_event_mask(mask: Option<EventMask>) {
    if let Some(mask) = mask {
        let table = mask.table().to_string();
        match mask.remove() {
            Ok(()) => log!("--event-mask: table {table} removed"),
            Err(e) => log!("warning: {e}"),
        }
    }
}

/// One socket per reader, subscribed to the conntrack groups, its buffer
/// enlarged and its kernel filter attached. With one reader a filter that
/// cannot be attached is left out (userspace applies the same rules); with
/// several it is an error, since the filter splits the flows.
fn subscribe(config: &Config) -> io::Result<(Vec<(ConntrackSocket, ReaderShare)>, KernelFiltered)> {
    let readers = config.readers;
    let mut filters = SocketFilters::new(
        &config.svc_subnets,
        &config.exclude_subnets,
        readers as u32,
        !config.no_socket_filter,
        config.print_events,
        config.live_latency,
    );
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
        match filters.attach(&socket, share) {
            Ok(()) => {}
            Err(e) if readers == 1 => {
                log!(
                    "warning: kernel socket filter not attached ({e}); every event \
                     reaches the reader and is filtered there"
                );
                filters.without_services();
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
        sockets.push((socket, share));
    }
    let granted = sockets.first().map_or(0, |(s, _)| s.granted_rcvbuf());
    log!(
        "subscribed to conntrack NEW/UPDATE/DESTROY with {readers} reader(s), receive \
         buffer {granted} bytes each, kernel filter: {}",
        filters.describe()
    );
    metrics::gauge!(RECEIVE_BUFFER).set(granted as f64);
    Ok((sockets, filters.kernel_filtered()))
}

/// The HTTP listener, bound before any reader starts.
fn listen(
    config: &Config,
    web: Option<(PathBuf, WebConfig)>,
) -> io::Result<(Endpoint, StopHandle)> {
    let address = config.metrics_bind_address;
    Endpoint::bind_with(address, Limits::default(), web)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))
}

/// Each reader's socket with its flow tracker, allocated here, before any
/// reader starts: the per-event path never allocates. Every socket is
/// subscribed by now, so flows that started earlier may have events the
/// readers never got, and are not measured. With table dumps on, each
/// reader also gets a mailbox (one dump at most waits in it), whose
/// sending ends are returned.
fn reader_plans(
    config: &Config,
    sockets: Vec<(ConntrackSocket, ReaderShare)>,
    kernel_filtered: KernelFiltered,
) -> (Vec<ReaderPlan>, Vec<Sender<Arc<LiveFlows>>>) {
    let filter = ServiceFilter::new(config.svc_subnets.clone(), config.exclude_subnets.clone());
    let subscribed_ns = wall_clock_ns();
    let per_reader = config.max_flows / config.readers;
    let mut mailboxes = Vec::new();
    let plans = sockets
        .into_iter()
        .zip(config.reader_cpus())
        .map(|((socket, share), cpu)| ReaderPlan {
            socket,
            tracker: {
                let tracker = FlowTracker::for_reader(
                    filter.clone(),
                    per_reader,
                    share,
                    kernel_filtered,
                    subscribed_ns,
                );
                let tracker = match service_budget(config) {
                    Some(budget) => tracker.with_services(budget),
                    None => tracker,
                };
                if config.live_latency {
                    tracker.with_live_latency(unanswered_capacity(per_reader))
                } else {
                    tracker
                }
            },
            cpu,
            live_flows: (config.table_dump_seconds > 0).then(|| {
                let (send, receive) = crossbeam_channel::bounded(1);
                mailboxes.push(send);
                receive
            }),
        })
        .collect();
    (plans, mailboxes)
}

/// With `--live-latency`, the unanswered flows a reader keeps: a quarter of
/// its answered flows' table, at least 1024.
fn unanswered_capacity(per_reader: usize) -> usize {
    (per_reader / 4).max(1024)
}

/// With `--table-dump-seconds`, the census thread: a dump of the kernel's
/// table now and every interval, each left in every reader's mailbox (a
/// reader still busy with the last one skips this one) with a wake-up. A
/// census that cannot start is a warning, never fatal: the exporter
/// measures as well without it.
fn table_census(
    config: &Config,
    mailboxes: Vec<Sender<Arc<LiveFlows>>>,
    readers: threads::StopReaders,
) {
    if config.table_dump_seconds == 0 {
        return;
    }
    let interval = Duration::from_secs(config.table_dump_seconds.into());
    let started = local_addresses()
        .and_then(|local| Census::new(&config.svc_subnets, &config.exclude_subnets, local))
        .and_then(|census| {
            std::thread::Builder::new()
                .name("ct-census".into())
                .spawn(move || {
                    census::run(census, interval, |live| {
                        let live = Arc::new(live);
                        for (index, mailbox) in mailboxes.iter().enumerate() {
                            if mailbox.try_send(Arc::clone(&live)).is_ok() {
                                readers.wake(index);
                            }
                        }
                    })
                })
        });
    if let Err(e) = started {
        log!("warning: no conntrack table dumps ({e}): flows whose DESTROY is lost stay until evicted");
    }
}

fn reader_options(config: &Config) -> ReaderOptions {
    ReaderOptions {
        batch: config.recv_batch,
        drain_delay: Duration::from_micros(config.drain_delay_us),
        print_events: config.print_events,
        // The idle sweep of Service slots, and the flows awaiting a reply,
        // are looked at at a drained socket.
        tick: (config.service_labels || config.live_latency).then_some(Duration::from_secs(1)),
    }
}

/// SIGTERM, SIGINT: `stop` (the readers and the endpoint), from a thread of
/// its own; `main` returns once they have. SIGHUP: `reload` (the web
/// configuration file, which says whether there is one); the rest of the
/// configuration is the command line, which a running process cannot read
/// again.
fn stop_on_signals(
    stop: impl FnOnce() + Send + 'static,
    reload: impl Fn() -> bool + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("ct-signals".into())
        .spawn(move || {
            loop {
                match signal::wait_for_signal() {
                    // The endpoint logs the reload's outcome.
                    Ok(Signal::Hup) if reload() => {}
                    Ok(Signal::Hup) => {
                        log!("SIGHUP: nothing to reload (no --web.config.file; the rest of the configuration is the command line); still running")
                    }
                    Ok(signal) => {
                        log!("{}: stopping", signal.name());
                        break;
                    }
                    Err(e) => {
                        log!("waiting for signals failed ({e}): stopping");
                        break;
                    }
                }
            }
            stop();
        })?;
    Ok(())
}

/// Serves `/metrics`, `/healthz` and `/readyz` on this thread until stopped;
/// `/healthz` is 200 while no reader is stuck on a batch, `/readyz` while
/// moreover every reader's loop runs.
fn serve(
    config: &Config,
    registry: Arc<Registry>,
    endpoint: Endpoint,
    readers: &Readers,
    mut event_mask: Option<&mut EventMask>,
) -> io::Result<()> {
    log!("serving /metrics on {}", endpoint.local_addr());
    let options = ScrapeOptions {
        node: config.node_name.clone(),
        legacy_names: config.legacy_names,
        awaiting_reply: config.live_latency,
    };
    let mut exposition = Exposition::new(registry, options);
    if config.service_labels {
        let names = config.service_names.then(service_names);
        exposition = exposition.with_key_labels(Box::new(ServiceLabels { names }));
    }
    let scrape_duration = metrics::histogram!(SCRAPE_DURATION);
    let readers_stuck = metrics::gauge!(READERS_STUCK);
    let mask_held = event_mask
        .is_some()
        .then(|| metrics::gauge!(EVENT_MASK_HELD));
    let mut mask_lost_logged = false;
    // The node's conntrack counters and table size, read at each render.
    let mut node_stats = NodeStats::open()
        .map_err(|e| log!("warning: no node conntrack statistics ({e})"))
        .ok();
    endpoint
        .run(
            &mut |format, out| {
                readers_stuck.set(readers.stuck() as f64);
                if let (Some(mask), Some(gauge)) = (event_mask.as_deref_mut(), &mask_held) {
                    let held = mask.held();
                    gauge.set(if held { 1.0 } else { 0.0 });
                    if !held && !mask_lost_logged {
                        log!(
                            "warning: --event-mask: the nft -i child holding table {} is gone,                              and the table with it: the kernel builds every event again",
                            mask.table()
                        );
                        mask_lost_logged = true;
                    }
                }
                if let Some(node_stats) = node_stats.as_mut() {
                    node_stats.publish();
                }
                let start = Instant::now();
                exposition.render(format, out);
                scrape_duration.record(start.elapsed().as_secs_f64());
            },
            &|| readers.ready(),
            &|| readers.healthy(),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("HTTP endpoint stopped: {e}")))
}

/// With `--service-names auto`: the names of the node's Services, read
/// from kube-proxy's rules now (so the first scrape has them) and every
/// 30 s on a thread of their own.
fn service_names() -> Arc<ServiceNames> {
    ServiceNames::start(SERVICE_NAMES_EVERY)
}

/// How often kube-proxy's rules are read again for Service names.
const SERVICE_NAMES_EVERY: Duration = Duration::from_secs(30);

/// The labels of a Service's series: `service_ip`, `service_port`,
/// `protocol`, and with names `namespace` and `service` (empty for a
/// Service the rules do not name); the overflow's are `other` and empty.
struct ServiceLabels {
    names: Option<Arc<ServiceNames>>,
}

impl KeyLabels for ServiceLabels {
    fn labels(&self, key: SeriesKey, out: &mut Vec<(&'static str, String)>) {
        let key = ServiceKey::from_series_key(key);
        match key {
            Some(k) => {
                out.push(("service_ip", k.addr.to_string()));
                out.push(("service_port", k.port.to_string()));
                out.push(("protocol", ServiceKey::protocol_name(k.proto).into()));
            }
            None => {
                out.push(("service_ip", "other".into()));
                out.push(("service_port", String::new()));
                out.push(("protocol", String::new()));
            }
        }
        if let Some(names) = &self.names {
            let name = key.and_then(|k| names.lookup(k));
            let (namespace, service) =
                name.map_or_else(Default::default, |n| (n.namespace, n.name));
            out.push(("namespace", namespace));
            out.push(("service", service));
        }
    }
}
