//! One scrape: merge the shards, then write every family in the format the
//! scraper asked for.
//!
//! Owns: which families exist in the output, their names, label sets and
//! order; the compatibility names of the original's counters.
//! Never: writes to a shard, or runs anywhere but the exporter thread.
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

use metrics_exporter_prometheus::PrometheusHandle;

use super::formatting::{
    write_counter_meta, write_go_float, write_help, write_sample, write_type, Value,
};
use super::http::Format;
use crate::stats::family::{HistogramFamily, NAMESPACE};
use crate::stats::{Counter, Quantiles, Series, ShardSet, Snapshot};

/// What a scrape shows besides the shards' values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrapeOptions {
    /// Value of the `node` label on every family.
    pub node: String,
    /// Also write the original's counters and summaries under its names.
    pub legacy_names: bool,
}

/// The exporter thread's renderer: owns the reusable snapshot and buffers.
pub struct Exposition {
    shards: Arc<ShardSet>,
    options: ScrapeOptions,
    facade: Option<PrometheusHandle>,
    snapshot: Snapshot,
    cumulative: Vec<u64>,
    facade_text: Vec<u8>,
    name: String,
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

impl Exposition {
    /// A renderer over `shards`, adding the `metrics` facade's families from
    /// `facade` when given.
    pub fn new(
        shards: Arc<ShardSet>,
        options: ScrapeOptions,
        facade: Option<PrometheusHandle>,
    ) -> Self {
        Exposition {
            shards,
            options,
            facade,
            snapshot: Snapshot::default(),
            cumulative: Vec::new(),
            facade_text: Vec::new(),
            name: String::new(),
        }
    }

    /// Merges the shards and appends the whole exposition to `out`.
    pub fn render(&mut self, format: Format, out: &mut Vec<u8>) {
        self.shards.merge_into(&mut self.snapshot);
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
        if let Some(facade) = &self.facade {
            self.facade_text.clear();
            let _ = facade.render_to_write(&mut self.facade_text);
            match format {
                Format::Prometheus => out.extend_from_slice(&self.facade_text),
                Format::OpenMetrics => facade_as_openmetrics(&self.facade_text, out),
            }
        }
        if format == Format::OpenMetrics {
            out.extend_from_slice(b"# EOF\n");
        }
    }

    fn full_name(&mut self, name: &str, suffix: &str) -> &str {
        self.name.clear();
        self.name.push_str(NAMESPACE);
        self.name.push('_');
        self.name.push_str(name);
        self.name.push_str(suffix);
        &self.name
    }

    fn histogram(&mut self, family: &HistogramFamily, out: &mut Vec<u8>) {
        let name = self.full_name(family.name, "").to_owned();
        write_help(out, &name, family.help);
        write_type(out, &name, "histogram");
        // Label values in sorted order, as the original writes them.
        let mut series: Vec<Series> = Series::ALL
            .into_iter()
            .filter(|s| s.family().name == family.name)
            .collect();
        series.sort_by_key(|s| s.direction());
        let node = self.options.node.as_str();
        let unit = family.unit;
        let mut le = Vec::new();
        for s in series {
            self.snapshot.cumulative(s, &mut self.cumulative);
            for (i, &n_obs) in self.cumulative.iter().enumerate() {
                le.clear();
                match family.bounds.get(i) {
                    Some(&b) => write_go_float(&mut le, unit.render(b as f64)),
                    None => le.extend_from_slice(b"+Inf"),
                }
                let le = std::str::from_utf8(&le).unwrap_or("+Inf");
                let (labels, n) = series_labels(s.direction(), node, Some(("le", le)));
                write_sample(out, &name, "_bucket", &labels[..n], Value::Count(n_obs));
            }
            let sum = Value::Float(unit.render(self.snapshot.sum(s)));
            let count = Value::Count(self.snapshot.count(s));
            let (labels, n) = series_labels(s.direction(), node, None);
            write_sample(out, &name, "_sum", &labels[..n], sum);
            write_sample(out, &name, "_count", &labels[..n], count);
        }
    }

    fn summary(&mut self, first: Quantiles, legacy: bool, out: &mut Vec<u8>) {
        let family = first.series().family();
        let name = self.full_name(first.family_name(legacy), "").to_owned();
        write_help(out, &name, family.help);
        write_type(out, &name, "summary");
        let mut series: Vec<Quantiles> = Quantiles::ALL
            .into_iter()
            .filter(|q| q.series().family().name == family.name)
            .collect();
        series.sort_by_key(|q| q.series().direction());
        let node = self.options.node.as_str();
        let unit = family.unit;
        let mut label = Vec::new();
        for q in series {
            let snap = self.snapshot.summary(q);
            for (objective, value) in q.objectives().iter().zip(&snap.quantiles) {
                label.clear();
                write_go_float(&mut label, *objective);
                let quantile = std::str::from_utf8(&label).unwrap_or("NaN");
                let v = Value::Float(value.map_or(f64::NAN, |v| unit.render(v)));
                let (labels, n) =
                    series_labels(q.series().direction(), node, Some(("quantile", quantile)));
                write_sample(out, &name, "", &labels[..n], v);
            }
            // The histogram series holds the same observations: its count
            // and sum are the summary's, over all time as Go's.
            let sum = Value::Float(unit.render(self.snapshot.sum(q.series())));
            let count = Value::Count(self.snapshot.count(q.series()));
            let (labels, n) = series_labels(q.series().direction(), node, None);
            write_sample(out, &name, "_sum", &labels[..n], sum);
            write_sample(out, &name, "_count", &labels[..n], count);
        }
    }

    fn counter_family(
        &mut self,
        format: Format,
        base: &str,
        help: &str,
        samples: &[(Counter, Option<&str>)],
        out: &mut Vec<u8>,
    ) {
        let family = self.full_name(base, "").to_owned();
        write_counter_meta(out, format == Format::OpenMetrics, &family, help);
        let sample = self.full_name(base, "_total").to_owned();
        let node = self.options.node.as_str();
        for &(c, ty) in samples {
            let v = Value::Count(self.snapshot.counter(c));
            match ty {
                Some(t) => write_sample(out, &sample, "", &[("node", node), ("type", t)], v),
                None => write_sample(out, &sample, "", &[("node", node)], v),
            }
        }
    }

    fn counters(&mut self, format: Format, out: &mut Vec<u8>) {
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
        if self.options.legacy_names && format == Format::Prometheus {
            let node = self.options.node.clone();
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
                let name = self.full_name(name, "").to_owned();
                write_help(out, &name, help);
                write_type(out, &name, "counter");
                for &(c, t) in samples {
                    let v = Value::Count(self.snapshot.counter(c));
                    write_sample(out, &name, "", &[("node", &node), ("type", t)], v);
                }
            }
            let name = self.full_name("no_bufs_counter", "").to_owned();
            write_help(
                out,
                &name,
                "How many times socket reader didn't have free buffers",
            );
            write_type(out, &name, "counter");
            let v = Value::Count(self.snapshot.counter(Counter::NetlinkOverruns));
            write_sample(out, &name, "", &[("node", &node)], v);
        }
    }
}

impl Exposition {
    /// The standard `process_*` families (as Prometheus client libraries
    /// write them), from `/proc/self`: CPU and memory for the dashboard
    /// without cAdvisor.
    fn process(&mut self, format: Format, out: &mut Vec<u8>) {
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

/// The labels of a series in the original's order: `direction` (when the
/// family has it), `node`, then the sample's own (`le`, `quantile`).
fn series_labels<'a>(
    direction: Option<&'a str>,
    node: &'a str,
    extra: Option<(&'a str, &'a str)>,
) -> ([(&'a str, &'a str); 3], usize) {
    let mut labels = [("", ""); 3];
    let mut n = 0;
    for label in [
        direction.map(|d| ("direction", d)),
        Some(("node", node)),
        extra,
    ]
    .into_iter()
    .flatten()
    {
        labels[n] = label;
        n += 1;
    }
    (labels, n)
}

/// The facade's Prometheus text, with counter families renamed the
/// OpenMetrics way (`# TYPE x counter` for samples `x_total`).
fn facade_as_openmetrics(text: &[u8], out: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(text);
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    for line in text.lines() {
        let meta = line
            .strip_prefix("# TYPE ")
            .map(|r| ("# TYPE ", r))
            .or_else(|| line.strip_prefix("# HELP ").map(|r| ("# HELP ", r)));
        match meta {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or("");
                let renamed = match name.strip_suffix("_total") {
                    Some(base) if counters.contains(&name) => base,
                    _ => name,
                };
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(renamed.as_bytes());
                out.extend_from_slice(&rest.as_bytes()[name.len()..]);
            }
            None if line.is_empty() => continue,
            None => out.extend_from_slice(line.as_bytes()),
        }
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::summary::SummaryWindow;
    use std::collections::BTreeSet;

    fn original() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/original_metrics_sample.prom"
        );
        std::fs::read_to_string(path).unwrap()
    }

    fn render(options: ScrapeOptions, format: Format, shards: Arc<ShardSet>) -> String {
        let mut e = Exposition::new(shards, options, None);
        let mut out = Vec::new();
        e.render(format, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn n1() -> ScrapeOptions {
        ScrapeOptions {
            node: "n1".into(),
            legacy_names: false,
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
        };
        let shards = Arc::new(ShardSet::new(2, SummaryWindow::from_minutes(10)));
        let ours = service_shape(&render(opts, Format::Prometheus, shards));
        let theirs = service_shape(&original());
        let missing: Vec<_> = theirs.difference(&ours).collect();
        let extra: Vec<_> = ours
            .difference(&theirs)
            .filter(|l| !l.contains("_window_"))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:#?}\nextra {extra:#?}"
        );
    }

    #[test]
    fn by_default_histograms_are_the_originals_and_summaries_renamed() {
        let shards = Arc::new(ShardSet::new(1, SummaryWindow::from_minutes(10)));
        let ours = service_shape(&render(n1(), Format::Prometheus, shards));
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
        let shards = Arc::new(ShardSet::new(2, SummaryWindow::from_minutes(10)));
        {
            let mut a = shards.writer(0).unwrap();
            let mut b = shards.writer(1).unwrap();
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
        let shards = Arc::new(ShardSet::new(1, SummaryWindow::from_minutes(10)));
        shards.writer(0).unwrap().count(Counter::EventsDestroy, 3);
        let opts = ScrapeOptions {
            node: "n1".into(),
            legacy_names: true,
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
        let text = render(
            n1(),
            Format::OpenMetrics,
            Arc::new(ShardSet::new(1, SummaryWindow::from_minutes(10))),
        );
        assert!(text.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE conntrack_monitoring_events counter\n"));
        assert!(text.contains("\nconntrack_monitoring_events_total{node=\"n1\",type=\"new\"} 0\n"));
        assert!(!text.contains("# TYPE conntrack_monitoring_events_total"));
    }

    #[test]
    fn facade_counters_are_renamed_for_openmetrics() {
        let facade = "# HELP x_total things\n# TYPE x_total counter\nx_total{node=\"a\"} 3\n\n\
                      # TYPE g gauge\ng 1\n";
        let mut out = Vec::new();
        facade_as_openmetrics(facade.as_bytes(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# HELP x things\n# TYPE x counter\nx_total{node=\"a\"} 3\n# TYPE g gauge\ng 1\n"
        );
    }
}
