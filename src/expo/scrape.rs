//! One scrape: merge the registry, then write every family in the format
//! the scraper asked for.
//!
//! Owns: which families exist in the output, their names, label sets and
//! order; the compatibility names of the original's counters; the label
//! values of a run-time [`SeriesKey`] (through [`KeyLabels`]).
//! Never: writes to a shard or a cell, runs anywhere but the exporter
//! thread, or parses text it rendered: every family, the self-metrics
//! included, is written once, in the format asked for.
//!
//! The original exporter's histogram families keep their exact names,
//! labels and `le` strings. Its counters (`events_counter`, `error_counter`,
//! `no_bufs_counter`) and its summaries (`service_*_summary`) break the
//! naming rules (no `_total`; a type in the name), so they are carried by
//! `events_total`, `errors_total`, `netlink_overruns_total` and
//! `service_*_window_*`, and written under the old names as well only with
//! `--legacy-names`. The old counter names exist in the Prometheus text only:
//! OpenMetrics cannot express a counter without `_total`.

use std::sync::Arc;

use super::formatting::{
    write_counter_meta, write_go_float, write_help, write_sample, write_type, Value,
};
use super::http::Format;
use crate::stats::family::{HistogramFamily, AWAITING_REPLY, AWAITING_REPLY_HELP, NAMESPACE};
use crate::stats::self_metrics::{FamilyView, Kind, SeriesValue};
use crate::stats::{
    BlockGauge, BlockLabels, Counter, Outcome, Quantiles, Registry, Series, SeriesKey, Snapshot,
};

/// What a scrape shows besides the registry's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeOptions {
    /// Value of the `node` label on every family.
    pub node: String,
    /// Also write the original's counters and summaries under its names.
    pub legacy_names: bool,
    /// Write `service_flows_awaiting_reply` (`--live-latency`).
    pub awaiting_reply: bool,
}

/// The label names and values of a run-time [`SeriesKey`], written after
/// `node` on every series of its block.
pub trait KeyLabels: Send {
    /// Appends `key`'s labels to `out`, in the order they are written.
    fn labels(&self, key: SeriesKey, out: &mut Vec<(&'static str, String)>);
}

/// The labels of a key no [`KeyLabels`] was given for: `key`, its words in
/// hexadecimal.
struct KeyInHex;

impl KeyLabels for KeyInHex {
    fn labels(&self, key: SeriesKey, out: &mut Vec<(&'static str, String)>) {
        let [a, b, c] = key.0;
        out.push(("key", format!("{a:016x}{b:016x}{c:016x}")));
    }
}

/// The exporter thread's renderer: owns the reusable snapshot and buffers.
pub struct Exposition {
    registry: Arc<Registry>,
    options: ScrapeOptions,
    key_labels: Box<dyn KeyLabels>,
    snapshot: Snapshot,
    cumulative: Vec<u64>,
}

/// The three event types, as the original labels them.
const EVENT_TYPES: [(Counter, &str); 3] = [
    (Counter::EventsDestroy, "destroy"),
    (Counter::EventsNew, "new"),
    (Counter::EventsUpdate, "update"),
];

/// Error types, as `type` label values (sorted).
const ERROR_TYPES: [(Counter, &str); 3] = [
    (Counter::EventsOrderErrors, "events order"),
    (Counter::MalformedMessages, "malformed message"),
    (Counter::TruncatedDatagrams, "truncated datagram"),
];

/// `{NAMESPACE}_{name}{suffix}`.
fn full_name(name: &str, suffix: &str) -> String {
    format!("{NAMESPACE}_{name}{suffix}")
}

/// A series' label set under construction: `direction` (when the family has
/// it), `node`, the block's key labels, then the sample's own (`le`,
/// `quantile`), in the original's order.
fn labels<'a>(
    direction: Option<&'a str>,
    node: &'a str,
    key: &'a [(&'static str, String)],
) -> Vec<(&'a str, &'a str)> {
    let mut out = Vec::with_capacity(4 + key.len());
    if let Some(d) = direction {
        out.push(("direction", d));
    }
    out.push(("node", node));
    out.extend(key.iter().map(|(k, v)| (*k, v.as_str())));
    out
}

/// The labels of a block's key into `out`, cleared first: none for the
/// node's block.
fn key_labels_of(
    key_labels: &dyn KeyLabels,
    labels: BlockLabels,
    out: &mut Vec<(&'static str, String)>,
) {
    out.clear();
    if let BlockLabels::Key(k) = labels {
        key_labels.labels(k, out);
    }
}

/// `labels` and one more, last.
fn with<'a>(labels: &[(&'a str, &'a str)], last: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    let mut all = Vec::with_capacity(labels.len() + 1);
    all.extend_from_slice(labels);
    all.push(last);
    all
}

/// Writes one histogram series: cumulative buckets with their `le` labels,
/// then `_sum` and `_count`. `le` strings are the bounds as Go writes them.
fn write_histogram_series(
    out: &mut Vec<u8>,
    name: &str,
    labels: &[(&str, &str)],
    bounds: impl Iterator<Item = f64>,
    cumulative: &[u64],
    sum: f64,
) {
    let mut bounds = bounds;
    for &n_obs in cumulative {
        let mut le = Vec::new();
        match bounds.next() {
            Some(b) => write_go_float(&mut le, b),
            None => le.extend_from_slice(b"+Inf"),
        }
        let le = std::str::from_utf8(&le).unwrap_or("+Inf");
        write_sample(
            out,
            name,
            "_bucket",
            &with(labels, ("le", le)),
            Value::Count(n_obs),
        );
    }
    let count = cumulative.last().copied().unwrap_or(0);
    write_sample(out, name, "_sum", labels, Value::Float(sum));
    write_sample(out, name, "_count", labels, Value::Count(count));
}

impl Exposition {
    /// A renderer over `registry`. Keyed blocks' labels are written as
    /// `key="<hex>"` until [`Self::with_key_labels`] says otherwise.
    pub fn new(registry: Arc<Registry>, options: ScrapeOptions) -> Self {
        Exposition {
            registry,
            options,
            key_labels: Box::new(KeyInHex),
            snapshot: Snapshot::default(),
            cumulative: Vec::new(),
        }
    }

    /// The same, writing the labels of keyed blocks with `key_labels`.
    pub fn with_key_labels(mut self, key_labels: Box<dyn KeyLabels>) -> Self {
        self.key_labels = key_labels;
        self
    }

    /// Merges the registry and appends the whole exposition to `out`.
    pub fn render(&mut self, format: Format, out: &mut Vec<u8>) {
        self.registry.shards().merge_into(&mut self.snapshot);
        for family in [
            &crate::stats::family::SERVICE_BYTES,
            &crate::stats::family::SERVICE_PACKETS,
            &crate::stats::family::SERVICE_DURATION,
            &crate::stats::family::SEEN_REPLY_LATENCY,
            &crate::stats::family::FIN_LATENCY,
            &crate::stats::family::FIN_THROUGHPUT,
        ] {
            self.histogram(family, out);
        }
        self.flow_outcomes(format, out);
        if self.options.awaiting_reply {
            self.awaiting_reply(out);
        }
        for legacy in [false, true] {
            if legacy && !self.options.legacy_names {
                continue;
            }
            for q in Quantiles::ALL {
                // The throughput summary has two series in one family.
                if q != Quantiles::FinThroughputFromService {
                    self.summary(q, legacy, out);
                }
            }
        }
        self.counters(format, out);
        self.histogram(&crate::stats::family::READER_BATCH, out);
        self.process(format, out);
        let (registry, node) = (&self.registry, self.options.node.as_str());
        registry
            .self_metrics()
            .for_each(|family| self_metric(family, format, node, out));
        if format == Format::OpenMetrics {
            out.extend_from_slice(b"# EOF\n");
        }
    }

    /// The series of `family`, sorted by their label values, as the
    /// original writes them.
    fn family_series(family: &HistogramFamily) -> Vec<Series> {
        let mut series: Vec<Series> = Series::ALL
            .into_iter()
            .filter(|s| s.family().name == family.name)
            .collect();
        series.sort_by_key(|s| s.direction());
        series
    }

    fn histogram(&mut self, family: &HistogramFamily, out: &mut Vec<u8>) {
        let name = full_name(family.name, "");
        write_help(out, &name, family.help);
        write_type(out, &name, "histogram");
        let series = Self::family_series(family);
        let unit = family.unit;
        let bounds = || family.bounds.iter().map(move |&b| unit.render(b as f64));
        let node = self.options.node.as_str();
        if !series.first().is_some_and(|s| s.keyed()) {
            for s in series {
                self.snapshot.cumulative(s, &mut self.cumulative);
                let sum = unit.render(self.snapshot.sum(s));
                let labels = labels(s.direction(), node, &[]);
                write_histogram_series(out, &name, &labels, bounds(), &self.cumulative, sum);
            }
            return;
        }
        let mut key = Vec::new();
        for block in self.snapshot.blocks() {
            key_labels_of(&*self.key_labels, block.labels(), &mut key);
            for &s in &series {
                block.cumulative(s, &mut self.cumulative);
                let sum = unit.render(block.sum(s));
                let labels = labels(s.direction(), node, &key);
                write_histogram_series(out, &name, &labels, bounds(), &self.cumulative, sum);
            }
        }
    }

    /// `service_flows_total{outcome, protocol}`: the buckets of the outcome
    /// series, one sample each, per block. A Service's block has its own
    /// `protocol` label: only that protocol's series is written (the others
    /// are empty by construction); the overflow's (empty `protocol`) and the
    /// node's get one series per protocol.
    fn flow_outcomes(&mut self, format: Format, out: &mut Vec<u8>) {
        let family = &crate::stats::family::SERVICE_FLOWS;
        let base = full_name(family.name, "");
        write_counter_meta(out, format == Format::OpenMetrics, &base, family.help);
        let sample = full_name(family.name, "_total");
        let node = self.options.node.as_str();
        let series = Self::family_series(family);
        let mut key = Vec::new();
        for block in self.snapshot.blocks() {
            key_labels_of(&*self.key_labels, block.labels(), &mut key);
            let own = key.iter().position(|(name, _)| *name == "protocol");
            for &s in &series {
                let Some(protocol) = s.protocol() else {
                    continue;
                };
                let mut labels = labels(None, node, &key);
                match own {
                    Some(i) if !key[i].1.is_empty() && key[i].1 != protocol => continue,
                    // The label's place is the key's; its value the series'.
                    Some(i) => labels[i + 1].1 = protocol,
                    None => labels.push(("protocol", protocol)),
                }
                for (outcome, &n) in Outcome::ALL.iter().zip(block.buckets(s)) {
                    let labels = with(&labels, ("outcome", outcome.label()));
                    write_sample(out, &sample, "", &labels, Value::Count(n));
                }
            }
        }
    }

    /// `service_flows_awaiting_reply` (`--live-latency`): a gauge per block,
    /// with the label sets of the Service histograms (the node's alone
    /// without Service labels; with them, each Service's and the overflow's).
    fn awaiting_reply(&self, out: &mut Vec<u8>) {
        let name = full_name(AWAITING_REPLY, "");
        write_help(out, &name, AWAITING_REPLY_HELP);
        write_type(out, &name, "gauge");
        let node = self.options.node.as_str();
        let mut key = Vec::new();
        for block in self.snapshot.blocks() {
            key_labels_of(&*self.key_labels, block.labels(), &mut key);
            let n = block.gauge(BlockGauge::AwaitingReply);
            write_sample(out, &name, "", &labels(None, node, &key), Value::Count(n));
        }
    }

    /// A summary family: node-level quantiles over the window (summaries
    /// are not kept per block).
    fn summary(&mut self, first: Quantiles, legacy: bool, out: &mut Vec<u8>) {
        let family = first.series().family();
        let name = full_name(first.family_name(legacy), "");
        write_help(out, &name, family.help);
        write_type(out, &name, "summary");
        let mut series: Vec<Quantiles> = Quantiles::ALL
            .into_iter()
            .filter(|q| q.series().family().name == family.name)
            .collect();
        series.sort_by_key(|q| q.series().direction());
        let node = self.options.node.as_str();
        let unit = family.unit;
        for q in series {
            let snap = self.snapshot.summary(q);
            let labels = labels(q.series().direction(), node, &[]);
            for (objective, value) in q.objectives().iter().zip(&snap.quantiles) {
                let mut label = Vec::new();
                write_go_float(&mut label, *objective);
                let quantile = std::str::from_utf8(&label).unwrap_or("NaN");
                let v = Value::Float(value.map_or(f64::NAN, |v| unit.render(v)));
                write_sample(out, &name, "", &with(&labels, ("quantile", quantile)), v);
            }
            // The histogram series holds the same observations: its count
            // and sum are the summary's, over all time as Go's.
            let sum = Value::Float(unit.render(self.snapshot.sum(q.series())));
            let count = Value::Count(self.snapshot.count(q.series()));
            write_sample(out, &name, "_sum", &labels, sum);
            write_sample(out, &name, "_count", &labels, count);
        }
    }

    fn counter_family(
        &self,
        format: Format,
        base: &str,
        help: &str,
        samples: &[(Counter, Option<&str>)],
        out: &mut Vec<u8>,
    ) {
        let family = full_name(base, "");
        write_counter_meta(out, format == Format::OpenMetrics, &family, help);
        let sample = full_name(base, "_total");
        let node = self.options.node.as_str();
        for &(c, ty) in samples {
            let v = Value::Count(self.snapshot.counter(c));
            match ty {
                Some(t) => write_sample(out, &sample, "", &[("node", node), ("type", t)], v),
                None => write_sample(out, &sample, "", &[("node", node)], v),
            }
        }
    }

    fn counters(&self, format: Format, out: &mut Vec<u8>) {
        let events = EVENT_TYPES.map(|(c, t)| (c, Some(t)));
        let errors = ERROR_TYPES.map(|(c, t)| (c, Some(t)));
        self.counter_family(
            format,
            "events",
            "Conntrack events received, by type",
            &events,
            out,
        );
        self.counter_family(
            format,
            "errors",
            "Events or messages that could not be used, by reason",
            &errors,
            out,
        );
        self.counter_family(
            format,
            "netlink_overruns",
            "ENOBUFS errors from the netlink socket: the kernel dropped events for this exporter",
            &[(Counter::NetlinkOverruns, None)],
            out,
        );
        self.counter_family(
            format,
            "flows_evicted",
            "Service flows evicted, oldest first, from a full flow table before their DESTROY was seen: more concurrent Service flows than --max-flows, or DESTROY events lost",
            &[(Counter::FlowsEvicted, None)],
            out,
        );
        self.counter_family(
            format,
            "kernel_filter_misses",
            "Events the kernel-side socket filter should have dropped (not to a Service subnet, or another reader's share) but that reached the exporter; dropped here instead. Expected 0",
            &[(Counter::KernelFilterMisses, None)],
            out,
        );
        self.counter_family(
            format,
            "duplicate_destroys",
            "DESTROY events of a flow already counted, dropped: the kernel delivers a DESTROY again, to every listener, while a listener that asked for reliable delivery (conntrackd's NetlinkEventsReliable) cannot take it",
            &[(Counter::DuplicateDestroys, None)],
            out,
        );
        self.counter_family(
            format,
            "lost_destroys",
            "Service flows dropped from a flow table because a dump of the kernel's conntrack table (--table-dump-seconds) no longer had them: their DESTROY event was lost (see netlink_overruns_total)",
            &[(Counter::LostDestroys, None)],
            out,
        );
        self.counter_family(
            format,
            "flows_over_service_budget",
            "Service flows counted in the overflow series (service_ip=\"other\") because --max-services Services already had series of their own (--service-labels)",
            &[(Counter::ServiceBudgetOverflow, None)],
            out,
        );
        self.counter_family(
            format,
            "unanswered_flows_dropped",
            "With --live-latency: Service flows still waiting for their first reply dropped from their full table (the oldest first) to make room for newer ones; their latencies are then observed at their DESTROY",
            &[(Counter::UnansweredDropped, None)],
            out,
        );
        if self.options.legacy_names && format == Format::Prometheus {
            self.legacy_counters(out);
        }
    }

    /// The original's counters under its names (Prometheus text only).
    fn legacy_counters(&self, out: &mut Vec<u8>) {
        let node = self.options.node.as_str();
        for (name, help, samples) in [
            (
                "events_counter",
                "Number of handled conntrack events.",
                &EVENT_TYPES[..],
            ),
            (
                "error_counter",
                "Number of errors occurred in conntrack monitoring",
                &ERROR_TYPES[..1],
            ),
        ] {
            let name = full_name(name, "");
            write_help(out, &name, help);
            write_type(out, &name, "counter");
            for &(c, t) in samples {
                let v = Value::Count(self.snapshot.counter(c));
                write_sample(out, &name, "", &[("node", node), ("type", t)], v);
            }
        }
        let name = full_name("no_bufs_counter", "");
        write_help(
            out,
            &name,
            "How many times socket reader didn't have free buffers",
        );
        write_type(out, &name, "counter");
        let v = Value::Count(self.snapshot.counter(Counter::NetlinkOverruns));
        write_sample(out, &name, "", &[("node", node)], v);
    }

    /// The standard `process_*` families (as Prometheus client libraries
    /// write them), from `/proc/self`: CPU and memory for the dashboard
    /// without cAdvisor.
    fn process(&self, format: Format, out: &mut Vec<u8>) {
        let p = crate::sys::process::read();
        let node = self.options.node.as_str();
        let labels = [("node", node)];
        write_counter_meta(
            out,
            format == Format::OpenMetrics,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
        );
        write_sample(
            out,
            "process_cpu_seconds_total",
            "",
            &labels,
            Value::Float(p.cpu_seconds),
        );
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                Value::Count(p.resident_bytes),
            ),
            (
                "process_resident_memory_peak_bytes",
                "Peak resident memory size in bytes (VmHWM).",
                Value::Count(p.resident_peak_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                Value::Count(p.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                Value::Count(p.open_fds),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                Value::Float(p.start_time_seconds),
            ),
        ] {
            write_help(out, name, help);
            write_type(out, name, "gauge");
            write_sample(out, name, "", &labels, value);
        }
    }
}

/// A gauge's value: an integer when it is one (byte and flow counts),
/// else as Go writes floats.
fn gauge_value(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..9.007_199_254_740_992e15).contains(&v) {
        Value::Count(v as u64)
    } else {
        Value::Float(v)
    }
}

/// One self-metric family (from the `metrics` facade), with `node` first on
/// every series.
fn self_metric(family: FamilyView<'_>, format: Format, node: &str, out: &mut Vec<u8>) {
    let name = family.name();
    match family.kind() {
        Kind::Counter => {
            let base = name.strip_suffix("_total").unwrap_or(name);
            write_counter_meta(out, format == Format::OpenMetrics, base, family.help());
        }
        Kind::Gauge => {
            write_help(out, name, family.help());
            write_type(out, name, "gauge");
        }
        Kind::Histogram => {
            write_help(out, name, family.help());
            write_type(out, name, "histogram");
        }
    }
    let mut cumulative = Vec::new();
    for (series_labels, value) in family.series() {
        let mut labels = vec![("node", node)];
        labels.extend(series_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match value {
            SeriesValue::Counter(n) => write_sample(out, name, "", &labels, Value::Count(n)),
            SeriesValue::Gauge(g) => write_sample(out, name, "", &labels, gauge_value(g)),
            SeriesValue::Histogram {
                bounds,
                buckets,
                sum,
            } => {
                cumulative.clear();
                let mut total = 0u64;
                for b in buckets {
                    total = total.wrapping_add(b.load(std::sync::atomic::Ordering::Relaxed));
                    cumulative.push(total);
                }
                let bounds = bounds.iter().copied();
                write_histogram_series(out, name, &labels, bounds, &cumulative, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summary::SummaryWindow;
    use crate::stats::ShardSet;
    use std::collections::BTreeSet;

    fn original() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/original_metrics_sample.prom"
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn render(options: ScrapeOptions, format: Format, registry: Arc<Registry>) -> String {
        let mut e = Exposition::new(registry, options);
        let mut out = Vec::new();
        e.render(format, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn registry(shards: usize) -> Arc<Registry> {
        Arc::new(Registry::new(ShardSet::new(
            shards,
            SummaryWindow::from_minutes(10),
        )))
    }

    fn n1() -> ScrapeOptions {
        ScrapeOptions {
            node: "n1".into(),
            legacy_names: false,
            awaiting_reply: false,
        }
    }

    /// Lines of `text` for the original's service families, with sample
    /// values cut off: names, label sets, `le` and `quantile` strings.
    fn service_shape(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| l.contains("conntrack_monitoring_service_"))
            .map(|l| match l.strip_prefix('#') {
                Some(_) => l.to_string(),
                None => l.rsplit_once(' ').unwrap().0.to_string(),
            })
            .collect()
    }

    #[test]
    fn with_legacy_names_service_families_include_exactly_the_originals() {
        let opts = ScrapeOptions {
            node: "n1".into(),
            legacy_names: true,
            awaiting_reply: false,
        };
        let ours = service_shape(&render(opts, Format::Prometheus, registry(2)));
        let theirs = service_shape(&original());
        let missing: Vec<_> = theirs.difference(&ours).collect();
        let extra: Vec<_> = ours
            .difference(&theirs)
            // Ours beside the original's: the window quantiles, the outcomes.
            .filter(|l| !l.contains("_window_") && !l.contains("_service_flows_total"))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:#?}\nextra {extra:#?}"
        );
    }

    #[test]
    fn by_default_histograms_are_the_originals_and_summaries_renamed() {
        let ours = service_shape(&render(n1(), Format::Prometheus, registry(1)));
        let theirs = service_shape(&original());
        let (histograms, summaries): (Vec<_>, Vec<_>) =
            theirs.iter().partition(|l| !l.contains("_summary"));
        for line in histograms {
            assert!(ours.contains(line), "{line}");
        }
        assert!(!ours.iter().any(|l| l.contains("_summary")));
        // Every original summary line exists under the new family name.
        for line in summaries {
            let renamed = line
                .replace("latency_seconds_summary", "latency_window_seconds")
                .replace(
                    "throughput_bytes_per_second_summary",
                    "throughput_window_bytes_per_second",
                );
            assert!(ours.contains(&renamed), "{renamed}");
        }
    }

    #[test]
    fn observations_render_in_base_units_with_consistent_counts() {
        let shards = registry(2);
        {
            let mut a = shards.shards().writer(0).unwrap();
            let mut b = shards.shards().writer(1).unwrap();
            a.observe(Series::SeenReplyLatency, 800_000); // 0.8 ms -> le="0.001"
            b.observe(Series::SeenReplyLatency, 3_000_000_000); // 3 s -> le="5"
            a.observe(Series::FinThroughputToService, 30_000_000); // 30000 B/s
            a.count(Counter::EventsUpdate, 5);
            b.count(Counter::EventsUpdate, 2);
            b.count(Counter::NetlinkOverruns, 1);
        }
        let text = render(n1(), Format::Prometheus, shards);
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no line {line:?}");
        let p = "conntrack_monitoring_service_seen_reply_latency_seconds";
        has(&format!("{p}_bucket{{node=\"n1\",le=\"0.00075\"}} 0"));
        has(&format!("{p}_bucket{{node=\"n1\",le=\"0.001\"}} 1"));
        has(&format!("{p}_bucket{{node=\"n1\",le=\"1\"}} 1"));
        has(&format!("{p}_bucket{{node=\"n1\",le=\"5\"}} 2"));
        has(&format!("{p}_bucket{{node=\"n1\",le=\"+Inf\"}} 2"));
        has(&format!("{p}_sum{{node=\"n1\"}} 3.0008"));
        has(&format!("{p}_count{{node=\"n1\"}} 2"));
        let t = "conntrack_monitoring_service_TCP_FIN_throughput_bytes_per_second";
        has(&format!(
            "{t}_bucket{{direction=\"to-svc\",node=\"n1\",le=\"50000\"}} 1"
        ));
        has(&format!(
            "{t}_sum{{direction=\"to-svc\",node=\"n1\"}} 30000"
        ));
        has(&format!(
            "{t}_count{{direction=\"from-svc\",node=\"n1\"}} 0"
        ));
        has("conntrack_monitoring_events_total{node=\"n1\",type=\"update\"} 7");
        has("conntrack_monitoring_netlink_overruns_total{node=\"n1\"} 1");
        has("# TYPE conntrack_monitoring_events_total counter");
        // Quantiles over both shards: min 0.8 ms, max 3 s (within 1 %).
        let p = "conntrack_monitoring_service_seen_reply_latency_window_seconds";
        has(&format!("{p}{{node=\"n1\",quantile=\"1\"}} 3"));
        has(&format!("{p}_count{{node=\"n1\"}} 2"));
        has(&format!("{p}_sum{{node=\"n1\"}} 3.0008"));
        let q01: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{p}{{node=\"n1\",quantile=\"0.01\"}} ")))
            .unwrap()
            .parse()
            .unwrap();
        assert!((q01 - 0.0008).abs() <= 0.0008 * 0.01, "{q01}");
        // Empty summaries say NaN, as Go's do.
        let f = "conntrack_monitoring_service_TCP_FIN_latency_window_seconds";
        has(&format!("{f}{{node=\"n1\",quantile=\"0.5\"}} NaN"));
        assert!(
            !text.contains("_counter"),
            "legacy names are off by default"
        );
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn legacy_names_only_when_asked_and_only_in_prometheus_text() {
        let shards = registry(1);
        shards
            .shards()
            .writer(0)
            .unwrap()
            .count(Counter::EventsDestroy, 3);
        let opts = ScrapeOptions {
            node: "n1".into(),
            legacy_names: true,
            awaiting_reply: false,
        };
        let text = render(opts.clone(), Format::Prometheus, Arc::clone(&shards));
        for line in [
            "conntrack_monitoring_events_counter{node=\"n1\",type=\"destroy\"} 3",
            "conntrack_monitoring_error_counter{node=\"n1\",type=\"events order\"} 0",
            "conntrack_monitoring_no_bufs_counter{node=\"n1\"} 0",
            "# TYPE conntrack_monitoring_events_counter counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?}");
        }
        // The original's own lines for them, as its dashboards read them.
        for line in original()
            .lines()
            .filter(|l| l.starts_with("# HELP conntrack_monitoring_events_counter"))
        {
            assert!(text.contains(line), "{line}");
        }
        let om = render(opts, Format::OpenMetrics, shards);
        assert!(!om.contains("_counter"));
        assert!(om.contains("_seconds_summary{node=\"n1\",quantile=\"0.5\"} NaN"));
    }

    #[test]
    fn openmetrics_names_counters_without_total_and_ends_with_eof() {
        let text = render(n1(), Format::OpenMetrics, registry(1));
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE conntrack_monitoring_events counter\n"));
        assert!(text.contains("\nconntrack_monitoring_events_total{node=\"n1\",type=\"new\"} 0\n"));
        assert!(!text.contains("# TYPE conntrack_monitoring_events_total"));
    }

    #[test]
    fn self_metrics_are_rendered_once_in_either_format() {
        let registry = registry(1);
        let recorder = registry.recorder();
        metrics::with_local_recorder(&recorder, || {
            use crate::stats::self_metrics::*;
            metrics::counter!(READER_DATAGRAMS, "reader" => "1").increment(4);
            metrics::counter!(READER_DATAGRAMS, "reader" => "0").increment(9);
            metrics::gauge!(RECEIVE_BUFFER).set(134_217_728.0);
            metrics::histogram!(SCRAPE_DURATION).record(0.0004);
        });
        let d = "conntrack_monitoring_reader_datagrams";
        let text = render(n1(), Format::Prometheus, Arc::clone(&registry));
        let expected = [
            format!("# HELP {d}_total Netlink datagrams each event reader received (each a conntrack event or a control message)"),
            format!("# TYPE {d}_total counter"),
            format!("{d}_total{{node=\"n1\",reader=\"0\"}} 9"),
            format!("{d}_total{{node=\"n1\",reader=\"1\"}} 4"),
        ];
        assert!(text.contains(&(expected.join("\n") + "\n")), "{text}");
        let b = "conntrack_monitoring_netlink_receive_buffer_bytes";
        assert!(text.contains(&format!("# TYPE {b} gauge\n{b}{{node=\"n1\"}} 134217728\n")));
        let s = "conntrack_monitoring_scrape_duration_seconds";
        for line in [
            format!("{s}_bucket{{node=\"n1\",le=\"0.0005\"}} 1"),
            format!("{s}_bucket{{node=\"n1\",le=\"+Inf\"}} 1"),
            format!("{s}_sum{{node=\"n1\"}} 0.0004"),
            format!("{s}_count{{node=\"n1\"}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?}");
        }
        // Each family once; not yet registered families not at all.
        assert_eq!(text.matches(&format!("# TYPE {d}_total")).count(), 1);
        assert!(!text.contains("flow_table_flows"));
        let om = render(n1(), Format::OpenMetrics, registry);
        assert!(om.contains(&format!("# TYPE {d} counter\n")));
        assert!(om.contains(&format!("\n{d}_total{{node=\"n1\",reader=\"0\"}} 9\n")));
        assert!(!om.contains(&format!("# TYPE {d}_total")));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn flows_awaiting_a_reply_are_a_gauge_per_block_with_live_latency() {
        let set = ShardSet::with_blocks(2, SummaryWindow::from_minutes(10), 3);
        let (b1, b2) = (set.block(1).unwrap(), set.block(2).unwrap());
        {
            let (mut w0, mut w1) = (set.writer(0).unwrap(), set.writer(1).unwrap());
            w0.relabel(b1, Some(BlockLabels::Key(SeriesKey([10, 53, 0]))));
            w0.relabel(b2, Some(BlockLabels::Key(SeriesKey([2, 80, 0]))));
            w1.relabel(b1, Some(BlockLabels::Key(SeriesKey([2, 80, 0]))));
            w0.set_gauge(b1, BlockGauge::AwaitingReply, 4);
            w0.set_gauge(b2, BlockGauge::AwaitingReply, 1);
            w1.set_gauge(b1, BlockGauge::AwaitingReply, 2);
        }
        let registry = Arc::new(Registry::new(set));
        let options = ScrapeOptions {
            awaiting_reply: true,
            ..n1()
        };
        let mut e = Exposition::new(registry, options).with_key_labels(Box::new(ServiceLabels));
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let mut out = Vec::new();
            e.render(format, &mut out);
            let text = String::from_utf8(out).unwrap();
            let g = "conntrack_monitoring_service_flows_awaiting_reply";
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(g)).collect();
            assert_eq!(
                lines[..2],
                [
                    format!("# HELP {g} {AWAITING_REPLY_HELP}"),
                    format!("# TYPE {g} gauge")
                ],
                "{format:?}"
            );
            assert_eq!(
                lines[2..],
                [
                    format!("{g}{{node=\"n1\"}} 0"),
                    format!("{g}{{node=\"n1\",service_ip=\"10.96.0.2\",service_port=\"80\"}} 3"),
                    format!("{g}{{node=\"n1\",service_ip=\"10.96.0.10\",service_port=\"53\"}} 4"),
                ],
                "{format:?}"
            );
        }
    }

    struct ServiceLabels;

    impl KeyLabels for ServiceLabels {
        fn labels(&self, key: SeriesKey, out: &mut Vec<(&'static str, String)>) {
            out.push(("service_ip", format!("10.96.0.{}", key.0[0])));
            out.push(("service_port", key.0[1].to_string()));
        }
    }

    #[test]
    fn keyed_blocks_are_series_with_their_labels_after_node() {
        let set = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), 3);
        let (b1, b2) = (set.block(1).unwrap(), set.block(2).unwrap());
        {
            let mut w = set.writer(0).unwrap();
            w.relabel(b1, Some(BlockLabels::Key(SeriesKey([10, 53, 0]))));
            w.relabel(b2, Some(BlockLabels::Key(SeriesKey([2, 80, 0]))));
            w.observe_in(b1, Series::SeenReplyLatency, 800_000);
            w.observe_in(b2, Series::BytesToService, 7);
            w.observe_in(b2, Series::BytesToService, 70);
        }
        let registry = Arc::new(Registry::new(set));
        let mut e = Exposition::new(registry, n1()).with_key_labels(Box::new(ServiceLabels));
        let mut out = Vec::new();
        e.render(Format::Prometheus, &mut out);
        let text = String::from_utf8(out).unwrap();
        let p = "conntrack_monitoring_service_seen_reply_latency_seconds";
        for line in [
            format!("{p}_bucket{{node=\"n1\",le=\"0.001\"}} 0"),
            format!("{p}_bucket{{node=\"n1\",service_ip=\"10.96.0.10\",service_port=\"53\",le=\"0.001\"}} 1"),
            format!("{p}_count{{node=\"n1\",service_ip=\"10.96.0.2\",service_port=\"80\"}} 0"),
            "conntrack_monitoring_service_bytes_count{direction=\"to-svc\",node=\"n1\",service_ip=\"10.96.0.2\",service_port=\"80\"} 2".into(),
            "conntrack_monitoring_service_bytes_sum{direction=\"to-svc\",node=\"n1\",service_ip=\"10.96.0.2\",service_port=\"80\"} 77".into(),
            // The window summaries stay the node's.
            "conntrack_monitoring_service_seen_reply_latency_window_seconds_count{node=\"n1\"} 1".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?}");
        }
        assert!(!text.contains("awaiting_reply"), "only with --live-latency");
        // Without label names for keys, a key is written in hexadecimal.
        let set = ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), 2);
        set.writer(0).unwrap().relabel(
            set.block(1).unwrap(),
            Some(BlockLabels::Key(SeriesKey([1, 2, 3]))),
        );
        let text = render(n1(), Format::Prometheus, Arc::new(Registry::new(set)));
        assert!(text.contains("key=\"000000000000000100000000000000020000000000000003\""));
    }
}
