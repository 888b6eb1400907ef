//! The metric families kept in the shards: names, help, units and bucket
//! bounds, and where each series lives in a shard.
//!
//! Owns: the original exporter's histogram and summary families with their
//! exact names, label values and bucket bounds (dashboards depend on them,
//! down to the `le` strings), and this exporter's own per-event families.
//! Never: holds values. Everything here is `const`, so a writer finds a
//! series' slots with no lookup at run time.

/// Namespace of every family, the original's.
pub const NAMESPACE: &str = "conntrack_monitoring";

/// How a family's integer values become the base unit when rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Stored in nanoseconds, rendered in seconds.
    Nanoseconds,
    /// Stored in microseconds, rendered in seconds.
    Microseconds,
    /// Stored and rendered as is (bytes, packets, messages).
    Count,
    /// Stored in thousandths, rendered in units (bytes per second).
    Milli,
}

impl Unit {
    /// Stored units per rendered unit. Rendering divides by it: dividing by
    /// an exact power of ten rounds correctly, so 7,500,000 ns renders as the
    /// float nearest 0.0075 (what Go's literal `.0075` is), where multiplying
    /// by 1e-9 would give 0.007500000000000001.
    pub const fn per_base_unit(self) -> f64 {
        match self {
            Unit::Nanoseconds => 1e9,
            Unit::Microseconds => 1e6,
            Unit::Count => 1.0,
            Unit::Milli => 1e3,
        }
    }

    /// `value` stored units in the rendered unit.
    pub fn render(self, value: f64) -> f64 {
        value / self.per_base_unit()
    }
}

/// A histogram family: its bounds are inclusive upper bounds (`le`) in the
/// stored unit, ascending; `+Inf` is implicit.
#[derive(Debug)]
pub struct HistogramFamily {
    /// Name after the namespace (`service_seen_reply_latency_seconds`).
    pub name: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// Stored unit.
    pub unit: Unit,
    /// Bucket upper bounds in the stored unit.
    pub bounds: &'static [u64],
    /// Whether the family has the `direction` label (`to-svc`, `from-svc`).
    pub by_direction: bool,
}

const NS: u64 = 1;
const US: u64 = 1_000 * NS;
const MS: u64 = 1_000 * US;
const S: u64 = 1_000 * MS;

/// `conntrack_monitoring_service_bytes{direction}`.
pub const SERVICE_BYTES: HistogramFamily = HistogramFamily {
    name: "service_bytes",
    help: "Amount of bytes sent to/received from a service",
    unit: Unit::Count,
    bounds: &[1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 50000, 100000],
    by_direction: true,
};

/// `conntrack_monitoring_service_packets{direction}`.
pub const SERVICE_PACKETS: HistogramFamily = HistogramFamily {
    name: "service_packets",
    help: "Amount of packets sent to/received from a service",
    unit: Unit::Count,
    bounds: SERVICE_BYTES.bounds,
    by_direction: true,
};

/// `conntrack_monitoring_service_duration_seconds`, stored in microseconds.
pub const SERVICE_DURATION: HistogramFamily = HistogramFamily {
    name: "service_duration_seconds",
    help: "Conntrack flow duration (includes timeout waiting time)",
    unit: Unit::Microseconds,
    bounds: &[
        0,
        S / US,
        2_500 * MS / US,
        5 * S / US,
        10 * S / US,
        30 * S / US,
        31 * S / US,
        35 * S / US,
        119_900 * MS / US,
        119_990 * MS / US,
        120 * S / US,
        120_010 * MS / US,
        120_015 * MS / US,
        120_020 * MS / US,
        120_025 * MS / US,
        120_030 * MS / US,
        120_100 * MS / US,
        120_500 * MS / US,
        121 * S / US,
        125 * S / US,
        130 * S / US,
    ],
    by_direction: false,
};

/// `conntrack_monitoring_service_seen_reply_latency_seconds`, in nanoseconds.
pub const SEEN_REPLY_LATENCY: HistogramFamily = HistogramFamily {
    name: "service_seen_reply_latency_seconds",
    help: "Latency between conntrack flow being created and SEEN_REPLY event",
    unit: Unit::Nanoseconds,
    bounds: &[
        0,
        10 * US,
        50 * US,
        100 * US,
        250 * US,
        500 * US,
        750 * US,
        MS,
        2_500 * US,
        5 * MS,
        7_500 * US,
        10 * MS,
        25 * MS,
        50 * MS,
        100 * MS,
        200 * MS,
        500 * MS,
        S,
        5 * S,
        10 * S,
    ],
    by_direction: false,
};

/// `conntrack_monitoring_service_TCP_FIN_latency_seconds`, in nanoseconds.
pub const FIN_LATENCY: HistogramFamily = HistogramFamily {
    name: "service_TCP_FIN_latency_seconds",
    help: "Latency between conntrack flow being created and TCP FIN packet seen",
    unit: Unit::Nanoseconds,
    bounds: &[
        0,
        MS,
        5 * MS,
        7_500 * US,
        10 * MS,
        20 * MS,
        30 * MS,
        40 * MS,
        50 * MS,
        75 * MS,
        100 * MS,
        125 * MS,
        150 * MS,
        175 * MS,
        200 * MS,
        300 * MS,
        400 * MS,
        500 * MS,
        S,
        3 * S,
        5 * S,
        10 * S,
        20 * S,
        50 * S,
    ],
    by_direction: false,
};

/// `conntrack_monitoring_service_TCP_FIN_throughput_bytes_per_second{direction}`,
/// in thousandths of a byte per second.
pub const FIN_THROUGHPUT: HistogramFamily = HistogramFamily {
    name: "service_TCP_FIN_throughput_bytes_per_second",
    help: "Throughput=(bytes sent as recorded when TCP FIN packet sent)/(service_TCP_FIN_latency_seconds)",
    unit: Unit::Milli,
    bounds: &[
        100_000,
        500_000,
        1_000_000,
        5_000_000,
        10_000_000,
        25_000_000,
        50_000_000,
        100_000_000,
        500_000_000,
        10_000_000_000,
        100_000_000_000,
    ],
    by_direction: true,
};

/// `conntrack_monitoring_reader_batch_messages`: datagrams taken per
/// `recvmmsg` call (ours; replaces the original's `mmsg_batch_size_hist`).
pub const READER_BATCH: HistogramFamily = HistogramFamily {
    name: "reader_batch_messages",
    help: "Netlink datagrams received per recvmmsg call by the event reader",
    unit: Unit::Count,
    bounds: &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
    by_direction: false,
};

/// `conntrack_monitoring_service_flows_total{outcome, protocol}`: Service
/// flows ended, by outcome. Kept as a histogram of [`Outcome`] codes, one
/// series per protocol, so that each Service's block holds its counts;
/// rendered as a counter, one sample per bucket (outcome), never as a
/// histogram.
pub const SERVICE_FLOWS: HistogramFamily = HistogramFamily {
    name: "service_flows",
    help: "Service flows ended, by outcome: answered (a reply came), refused (TCP: the backend's side sent packets, a reset, but no reply), unanswered (nothing came back), reset (answered, then closed by a reset without a FIN)",
    unit: Unit::Count,
    bounds: &[
        Outcome::Answered as u64,
        Outcome::Refused as u64,
        Outcome::Unanswered as u64,
    ],
    by_direction: false,
};

/// How a Service flow ended, as its DESTROY tells: the bucket of
/// [`SERVICE_FLOWS`] it counts in (the last, `Reset`, is `+Inf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The flow saw a reply (`SEEN_REPLY`).
    Answered = 0,
    /// TCP: the backend's side carried packets, yet no reply was seen: the
    /// SYN was answered with a reset.
    Refused = 1,
    /// No packet came back: a dead or blackholed backend, a dropped SYN, a
    /// UDP request without an answer.
    Unanswered = 2,
    /// TCP: answered, then closed by a reset without a FIN.
    Reset = 3,
}

impl Outcome {
    /// Every outcome, in bucket order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Answered,
        Outcome::Refused,
        Outcome::Unanswered,
        Outcome::Reset,
    ];

    /// Its `outcome` label value.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Unanswered => "unanswered",
            Outcome::Reset => "reset",
        }
    }
}

/// A histogram series: a family and, where it has one, a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Series {
    /// Bytes sent to the service (original direction).
    BytesToService,
    /// Bytes received from the service (reply direction).
    BytesFromService,
    /// Packets to the service.
    PacketsToService,
    /// Packets from the service.
    PacketsFromService,
    /// Flow duration, microseconds.
    Duration,
    /// Seen-reply latency, nanoseconds.
    SeenReplyLatency,
    /// TCP FIN latency, nanoseconds.
    FinLatency,
    /// Throughput to the service until FIN, milli-bytes per second.
    FinThroughputToService,
    /// Throughput from the service until FIN, milli-bytes per second.
    FinThroughputFromService,
    /// Outcomes of TCP Service flows ([`SERVICE_FLOWS`]).
    FlowsTcp,
    /// Outcomes of UDP Service flows.
    FlowsUdp,
    /// Outcomes of SCTP Service flows.
    FlowsSctp,
    /// Outcomes of Service flows of any other protocol.
    FlowsOther,
    /// Datagrams per `recvmmsg` call.
    ReaderBatch,
}

/// Direction label values, the original's.
pub const TO_SERVICE: &str = "to-svc";
/// Direction label values, the original's.
pub const FROM_SERVICE: &str = "from-svc";

impl Series {
    /// Every series, in render order.
    pub const ALL: [Series; 14] = [
        Series::BytesToService,
        Series::BytesFromService,
        Series::PacketsToService,
        Series::PacketsFromService,
        Series::Duration,
        Series::SeenReplyLatency,
        Series::FinLatency,
        Series::FinThroughputToService,
        Series::FinThroughputFromService,
        Series::FlowsTcp,
        Series::FlowsUdp,
        Series::FlowsSctp,
        Series::FlowsOther,
        Series::ReaderBatch,
    ];

    /// The outcome series of IP protocol `proto`.
    #[inline]
    pub const fn flows(proto: u8) -> Series {
        match proto {
            6 => Series::FlowsTcp,
            17 => Series::FlowsUdp,
            132 => Series::FlowsSctp,
            _ => Series::FlowsOther,
        }
    }

    /// The `protocol` label value of an outcome series.
    pub const fn protocol(self) -> Option<&'static str> {
        match self {
            Series::FlowsTcp => Some("tcp"),
            Series::FlowsUdp => Some("udp"),
            Series::FlowsSctp => Some("sctp"),
            Series::FlowsOther => Some("other"),
            _ => None,
        }
    }

    /// Its family.
    pub const fn family(self) -> &'static HistogramFamily {
        match self {
            Series::BytesToService | Series::BytesFromService => &SERVICE_BYTES,
            Series::PacketsToService | Series::PacketsFromService => &SERVICE_PACKETS,
            Series::Duration => &SERVICE_DURATION,
            Series::SeenReplyLatency => &SEEN_REPLY_LATENCY,
            Series::FinLatency => &FIN_LATENCY,
            Series::FinThroughputToService | Series::FinThroughputFromService => &FIN_THROUGHPUT,
            Series::FlowsTcp | Series::FlowsUdp | Series::FlowsSctp | Series::FlowsOther => {
                &SERVICE_FLOWS
            }
            Series::ReaderBatch => &READER_BATCH,
        }
    }

    /// Its `direction` label value, if its family has that label.
    pub const fn direction(self) -> Option<&'static str> {
        match self {
            Series::BytesToService | Series::PacketsToService | Series::FinThroughputToService => {
                Some(TO_SERVICE)
            }
            Series::BytesFromService
            | Series::PacketsFromService
            | Series::FinThroughputFromService => Some(FROM_SERVICE),
            _ => None,
        }
    }

    /// Whether the series is kept per labelled block (a Service family,
    /// whose label sets may be known only at run time) rather than once per
    /// shard (the reader's own families).
    pub const fn keyed(self) -> bool {
        !matches!(self, Series::ReaderBatch)
    }

    /// Slots the series takes: one per bucket, one for `+Inf` (values above
    /// the last bound), one for the sum. The count is the sum of the
    /// buckets, so it always agrees with `+Inf`.
    pub const fn slots(self) -> usize {
        self.family().bounds.len() + 2
    }

    /// Slot of the series' sum (after its buckets and `+Inf`), in its region.
    pub const fn sum_slot(self) -> usize {
        self.offset() + self.family().bounds.len() + 1
    }

    /// Offset of the series' first slot in its region: a block for a
    /// [`keyed`](Self::keyed) series, the shard's own slots otherwise.
    pub const fn offset(self) -> usize {
        let mut at = 0;
        let mut i = 0;
        while i < Series::ALL.len() {
            let s = Series::ALL[i];
            if s as u8 == self as u8 {
                return at;
            }
            if s.keyed() == self.keyed() {
                at += s.slots();
            }
            i += 1;
        }
        at
    }
}

/// Slots the histogram series of a region take: the keyed ones (one block)
/// or the shard's own.
const fn region_histogram_slots(keyed: bool) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < Series::ALL.len() {
        if Series::ALL[i].keyed() == keyed {
            n += Series::ALL[i].slots();
        }
        i += 1;
    }
    n
}

/// Slots the keyed histogram series take in a block, before its gauges.
pub const BLOCK_HISTOGRAM_SLOTS: usize = region_histogram_slots(true);

/// A gauge kept per labelled block: a value its writer sets (not adds to),
/// summed over shards at a scrape like the blocks' counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockGauge {
    /// With `--live-latency`: the block's Service flows whose NEW is more
    /// than 1 s old and that have seen no reply.
    AwaitingReply,
}

impl BlockGauge {
    /// Every block gauge, in slot order.
    pub const ALL: [BlockGauge; 1] = [BlockGauge::AwaitingReply];

    /// Slot of the gauge in a block, after the histograms.
    pub const fn slot(self) -> usize {
        BLOCK_HISTOGRAM_SLOTS + self as usize
    }
}

/// The Service families' gauge of flows awaiting a reply.
pub const AWAITING_REPLY: &str = "service_flows_awaiting_reply";

/// Help of [`AWAITING_REPLY`].
pub const AWAITING_REPLY_HELP: &str = "With --live-latency: Service flows whose first packet is more than 1 s old and that have seen no reply yet (a dead or blackholed backend shows here long before the SYN_SENT timeout ends them)";

/// Slots of one labelled block: every keyed series, then the gauges.
pub const BLOCK_SLOTS: usize = BLOCK_HISTOGRAM_SLOTS + BlockGauge::ALL.len();

/// Slots the shard's own histogram series take, before its counters.
pub const SHARD_HISTOGRAM_SLOTS: usize = region_histogram_slots(false);

/// A per-event counter kept in the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// NEW events received.
    EventsNew,
    /// UPDATE events received.
    EventsUpdate,
    /// DESTROY events received.
    EventsDestroy,
    /// Flows whose events came in an order that cannot be measured.
    EventsOrderErrors,
    /// Netlink messages that could not be parsed (counted, skipped).
    MalformedMessages,
    /// Datagrams longer than a receive slot (cut short, skipped).
    TruncatedDatagrams,
    /// `ENOBUFS` from the socket: the kernel dropped events for us.
    NetlinkOverruns,
    /// Flows evicted from a full flow table before their DESTROY.
    FlowsEvicted,
    /// Events the kernel-side socket filter should have dropped (not to a
    /// Service, or another reader's share) that reached userspace anyway.
    KernelFilterMisses,
    /// DESTROY events of a flow already counted, delivered again by the
    /// kernel; dropped.
    DuplicateDestroys,
    /// Flows dropped from a flow table because a dump of the kernel's table
    /// no longer had them: their DESTROY was lost.
    LostDestroys,
    /// Service flows counted in the overflow series: `--max-services`
    /// Services already had series of their own.
    ServiceBudgetOverflow,
    /// With `--live-latency`: unanswered flows dropped from their full
    /// table (the oldest first) to make room for a newer NEW.
    UnansweredDropped,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 13] = [
        Counter::EventsNew,
        Counter::EventsUpdate,
        Counter::EventsDestroy,
        Counter::EventsOrderErrors,
        Counter::MalformedMessages,
        Counter::TruncatedDatagrams,
        Counter::NetlinkOverruns,
        Counter::FlowsEvicted,
        Counter::KernelFilterMisses,
        Counter::DuplicateDestroys,
        Counter::LostDestroys,
        Counter::ServiceBudgetOverflow,
        Counter::UnansweredDropped,
    ];

    /// Slot of the counter among the shard's own slots.
    pub const fn slot(self) -> usize {
        SHARD_HISTOGRAM_SLOTS + self as usize
    }
}

/// The shard's own slots: its histograms, then the counters.
pub const SHARD_SLOTS: usize = SHARD_HISTOGRAM_SLOTS + Counter::ALL.len();

/// A summary series: the original's quantile families, computed over a
/// sliding window from the shards' log-linear histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quantiles {
    /// `service_seen_reply_latency_seconds_summary`.
    SeenReplyLatency,
    /// `service_TCP_FIN_latency_seconds_summary`.
    FinLatency,
    /// `service_TCP_FIN_throughput_bytes_per_second_summary{direction="to-svc"}`.
    FinThroughputToService,
    /// `service_TCP_FIN_throughput_bytes_per_second_summary{direction="from-svc"}`.
    FinThroughputFromService,
}

impl Quantiles {
    /// Every summary series, in render order.
    pub const ALL: [Quantiles; 4] = [
        Quantiles::SeenReplyLatency,
        Quantiles::FinLatency,
        Quantiles::FinThroughputToService,
        Quantiles::FinThroughputFromService,
    ];

    /// The histogram series it summarises (same values, same unit).
    pub const fn series(self) -> Series {
        match self {
            Quantiles::SeenReplyLatency => Series::SeenReplyLatency,
            Quantiles::FinLatency => Series::FinLatency,
            Quantiles::FinThroughputToService => Series::FinThroughputToService,
            Quantiles::FinThroughputFromService => Series::FinThroughputFromService,
        }
    }

    /// Its family name after the namespace. The original's (`legacy`) ends in
    /// `_summary`, which `promtool check metrics` rejects (a type in the
    /// name); ours says what it is: quantiles over a sliding window.
    pub const fn family_name(self, legacy: bool) -> &'static str {
        match (self, legacy) {
            (Quantiles::SeenReplyLatency, false) => "service_seen_reply_latency_window_seconds",
            (Quantiles::SeenReplyLatency, true) => "service_seen_reply_latency_seconds_summary",
            (Quantiles::FinLatency, false) => "service_TCP_FIN_latency_window_seconds",
            (Quantiles::FinLatency, true) => "service_TCP_FIN_latency_seconds_summary",
            (Quantiles::FinThroughputToService | Quantiles::FinThroughputFromService, false) => {
                "service_TCP_FIN_throughput_window_bytes_per_second"
            }
            (Quantiles::FinThroughputToService | Quantiles::FinThroughputFromService, true) => {
                "service_TCP_FIN_throughput_bytes_per_second_summary"
            }
        }
    }

    /// The quantiles the original reports for it.
    pub const fn objectives(self) -> &'static [f64] {
        match self {
            Quantiles::FinLatency => &[0.01, 0.1, 0.5, 0.9, 0.99],
            _ => &[0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0],
        }
    }

    /// The summary series a histogram series feeds, if any.
    pub const fn of(series: Series) -> Option<Quantiles> {
        match series {
            Series::SeenReplyLatency => Some(Quantiles::SeenReplyLatency),
            Series::FinLatency => Some(Quantiles::FinLatency),
            Series::FinThroughputToService => Some(Quantiles::FinThroughputToService),
            Series::FinThroughputFromService => Some(Quantiles::FinThroughputFromService),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_ascend_and_series_do_not_overlap() {
        for s in Series::ALL {
            let b = s.family().bounds;
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        }
        for (i, s) in Series::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "ALL is in declaration order");
        }
        for keyed in [true, false] {
            let mut next = 0;
            for s in Series::ALL.into_iter().filter(|s| s.keyed() == keyed) {
                assert_eq!(s.offset(), next, "{s:?}");
                next += s.slots();
            }
            let region = if keyed {
                BLOCK_HISTOGRAM_SLOTS
            } else {
                SHARD_HISTOGRAM_SLOTS
            };
            assert_eq!(next, region);
        }
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.slot(), SHARD_HISTOGRAM_SLOTS + i);
        }
        for (i, g) in BlockGauge::ALL.iter().enumerate() {
            assert_eq!(*g as usize, i, "ALL is in declaration order");
            assert_eq!(g.slot(), BLOCK_HISTOGRAM_SLOTS + i);
            assert!(g.slot() < BLOCK_SLOTS);
        }
        for q in Quantiles::ALL {
            assert_eq!(Quantiles::of(q.series()), Some(q));
        }
    }
}
