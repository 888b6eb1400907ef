//! What a Service flow's events mean: the moments it saw its first reply and
//! its first FIN, and, at its DESTROY, the observations it yields.
//!
//! Owns: which events count (original destination in a Service subnet and
//! not in an excluded one, DNAT'd to a backend), the per-flow milestones, and
//! the rule that a flow is measured only when none of its events can have
//! been lost.
//! Never: allocates, locks, logs or makes a syscall per event.
//!
//! Clocks: every moment is wall-clock nanoseconds. The flow's start and stop
//! come from the kernel (`CTA_TIMESTAMP` on DESTROY). The seen-reply and FIN
//! moments are the kernel's stamp of the event that showed them
//! (`CTA_TIMESTAMP_EVENT`, Linux 6.14+), or else the receive time of the
//! batch that carried it, as the Go original always does.
//!
//! - seen-reply latency = first event with `SEEN_REPLY` - flow start;
//! - FIN latency (TCP) = first event in a closing state (FIN_WAIT,
//!   CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE) - flow start: the kernel may
//!   skip FIN_WAIT when both FINs cross, which cost the original ~1 flow in
//!   20,000 as an "events order" error;
//! - throughput (TCP, per direction) = bytes at DESTROY / FIN latency;
//! - duration = stop - start; bytes and packets per direction, at DESTROY.
//!
//! The table: a flow enters it at its first event with `SEEN_REPLY` and
//! leaves at its DESTROY. Its NEW, UPDATEs that show no reply, and the
//! DESTROY of a flow never answered touch no table: a burst of unanswered
//! flows (a scan, a dead backend, a SYN flood) takes neither room nor
//! lookups. Events that touch the table wait in a short queue whose cells
//! and entries are prefetched, so a batch's cache misses overlap.
//!
//! Lost events: a latency is observed only if no event of the flow up to
//! the milestone can have been lost, so a milestone is never taken from a
//! later event than the one that really showed it. The kernel reports an
//! overrun (`ENOBUFS`) before any event it queues after the drop, so if an
//! event of a flow started at `start` was dropped, an overrun is reported
//! after `start` and before the next event of the flow is read. But only
//! the first drop is reported: the socket stays congested, and the kernel
//! drops events for it unreported, until its queue is empty; a flow
//! inserted meanwhile is never measured. Hence the loss horizon: the latest
//! of the subscription time, each overrun's report time (wall clock read
//! after the report), the time the reader found its socket drained after
//! one, the receive time of each truncated or malformed message, and the
//! seen-reply moment of each evicted flow. A flow's entry takes the horizon and the overrun count
//! at insertion; at the DESTROY, which carries the kernel's start stamp, a
//! milestone counts if the flow started after that horizon and no overrun
//! came between the insertion and the milestone. (The horizon never goes
//! back: after a wall-clock step backwards that follows an overrun, flows
//! go unmeasured until the clock passes the overrun again; never measured
//! wrongly.) DESTROY-only observations (duration, bytes, packets) carry
//! their own data and are always taken.

use crate::stats::{BlockGauge, BlockId, Counter, Outcome, Series, ShardWriter};
use crate::wire::{Counters, CtEvent, EventKind, Status, TcpState};

use std::net::IpAddr;

use super::live::LiveFlows;
use super::recent::RecentDestroys;
use super::services::{ServiceBudget, ServiceKey, ServiceSlots, TCP};
use super::table::{FlowKey, FlowState, FlowTable, Inserted};
use super::{ReaderShare, Subnet};

/// Which flows are Service flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFilter {
    services: Vec<Subnet>,
    excluded: Vec<Subnet>,
}

impl ServiceFilter {
    /// Flows to any of `services` but none of `excluded`.
    pub fn new(services: Vec<Subnet>, excluded: Vec<Subnet>) -> ServiceFilter {
        ServiceFilter { services, excluded }
    }

    /// Whether `ev`'s original destination is in a Service subnet and in no
    /// excluded one.
    #[inline]
    pub fn to_service(&self, ev: &CtEvent) -> bool {
        let Some(dst) = ev.orig.and_then(|t| t.dst) else {
            return false;
        };
        self.services.iter().any(|s| s.contains(dst))
            && !self.excluded.iter().any(|s| s.contains(dst))
    }

    /// Whether `ev`'s flow was DNAT'd to a backend: the kernel says
    /// `DST_NAT`, or the reply comes from another address than the one the
    /// client sent to.
    #[inline]
    pub fn dnat(ev: &CtEvent) -> bool {
        let dst = ev.orig.and_then(|t| t.dst);
        let dnat_status = ev.status.is_some_and(|s| s.has(Status::DST_NAT));
        let reply_elsewhere = ev
            .reply
            .and_then(|t| t.src)
            .is_some_and(|src| Some(src) != dst);
        dnat_status || reply_elsewhere
    }
}

/// Whether the tracker may draw an observation from `ev` (of a Service
/// flow): the rule the kernel-side socket filter applies by default, so that
/// the events it drops are ones [`FlowTracker::event`] would not use.
///
/// - Every DESTROY: it ends the flow and carries its counters and stamps.
/// - No NEW or UPDATE without `SEEN_REPLY`: nothing is kept before a flow's
///   first reply.
/// - Every NEW with `SEEN_REPLY` (a merged re-send, see
///   [`FlowTracker::event`]), and every UPDATE with `SEEN_REPLY` but not yet
///   `ASSURED`: each may be the flow's first reply.
/// - An UPDATE with both only in a closing TCP state: it may be the FIN.
///
/// Why an UPDATE after `ASSURED` is never a flow's first reply: the kernel
/// sets `SEEN_REPLY` on the first packet of the reply direction, after the
/// protocol's own handler has run for that packet, and TCP, UDP, SCTP, DCCP
/// and GRE set `ASSURED` only on a packet that finds `SEEN_REPLY` already
/// set: a later one. (The Go original took its non-TCP seen-reply moment
/// from this very event: "SEEN_REPLY set and ASSURED not yet set".) An
/// UPDATE the kernel re-sends merged with missed ones reaches this listener
/// after the originals it did not miss; if it missed them, an overrun was
/// reported and the flow is not measured anyway.
///
/// An event without a status is kept (the kernel always sends one; the
/// reader judges what it cannot read).
#[inline]
pub fn tracker_may_use(ev: &CtEvent) -> bool {
    tracker_may_use_with(ev, false)
}

/// [`tracker_may_use`], and with `live` (`--live-latency`) every NEW too:
/// a flow's start as its events tell it, taken when it begins.
#[inline]
pub fn tracker_may_use_with(ev: &CtEvent, live: bool) -> bool {
    if live && ev.kind == EventKind::New {
        return true;
    }
    let Some(status) = ev.status else {
        return true;
    };
    match ev.kind {
        EventKind::Destroy => true,
        _ if !status.has(Status::SEEN_REPLY) => false,
        EventKind::New => true,
        EventKind::Update => {
            !status.has(Status::ASSURED) || ev.tcp_state.is_some_and(TcpState::is_closing)
        }
    }
}

/// What the kernel-side socket filter already dropped before events reach
/// the tracker; an event it should have dropped is counted as a miss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelFiltered {
    /// Events of flows not to a Service.
    pub non_service: bool,
    /// Events of other readers' flows.
    pub other_shares: bool,
}

/// How many table steps wait in the queue at most: their index cells are
/// prefetched as they are queued and their entries just before the steps
/// run, so the cache misses of a batch's flows overlap.
pub const QUEUE_DEPTH: usize = 32;

/// Flows whose DESTROY each tracker remembers, so that a DESTROY the kernel
/// delivers again counts once (`RecentDestroys`; 512 KiB).
pub const RECENT_DESTROYS: usize = 65_536;

/// A flow is reconciled with a dump of the kernel's table only if it
/// entered the flow table this long before the dump began (1 s): it was in
/// the kernel's table for the whole dump, whatever the clocks' grain.
pub const RECONCILE_MARGIN_NS: u64 = 1_000_000_000;

/// How far ahead of the step it runs the queue prefetches entries.
const ENTRY_LOOKAHEAD: usize = 8;

/// With `--live-latency`: a flow waits for its first reply "too long" once
/// its NEW is this old (1 s), and counts in
/// [`FlowTracker::count_awaiting`].
pub const AWAITING_AFTER_NS: u64 = 1_000_000_000;

/// With `--live-latency`: how often a drained reader counts its flows
/// awaiting a reply (250 ms).
pub const AWAITING_EVERY_NS: u64 = 250_000_000;

/// Service flows between their first reply and their DESTROY.
pub struct FlowTracker {
    filter: ServiceFilter,
    table: FlowTable,
    /// Overruns seen so far (wrapping): a flow remembers the count at its
    /// insertion.
    overruns: u32,
    /// The latest moment at or before which events may have been lost: the
    /// subscription, the last overrun's report, the latest seen-reply moment
    /// of an evicted flow. Never goes back.
    loss_horizon_ns: u64,
    share: ReaderShare,
    kernel_filtered: KernelFiltered,
    /// Table steps not yet taken, in event order; allocated once.
    queue: Vec<Step>,
    /// Flows whose DESTROY was taken lately.
    recent_destroys: RecentDestroys,
    /// Between an overrun's report and the reader finding its socket
    /// drained: the kernel may be dropping events without a report.
    congested: bool,
    /// With `--service-labels`: the block of each Service.
    services: Option<ServiceSlots>,
    /// With `--live-latency`: Service flows from their NEW to their first
    /// reply, apart from the answered ones so that a flood of unanswered
    /// flows evicts only its own kind (the oldest first, counted).
    unanswered: Option<FlowTable>,
    /// With `--live-latency`: flows awaiting a reply per block, as last
    /// counted (one per block of the shard; allocated once).
    awaiting: Box<[u64]>,
    /// When they were counted last (wall clock, ns).
    awaiting_counted_ns: u64,
}

/// An event that touches the table, queued: what its step needs.
#[derive(Clone, Copy, Debug)]
struct Step {
    key: FlowKey,
    moment: Moment,
    /// For a DESTROY, what its observations need; `None` for an UPDATE.
    end: Option<Ended>,
    /// With `--live-latency`: what the event does to the table of
    /// unanswered flows, and the block a live observation goes to.
    live: LiveStep,
}

/// What a step does with `--live-latency` beyond the answered flows' table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LiveStep {
    /// Nothing (the flag is off, or a DESTROY of an answered flow).
    No,
    /// A NEW without a reply: the flow enters the unanswered table,
    /// remembering the block of its Service.
    New(BlockId),
    /// An event with the reply (or the FIN): observations of the flow go
    /// to this block now.
    Reply(BlockId),
    /// The DESTROY of a flow never answered: it leaves the unanswered
    /// table.
    Forget,
}

/// What a DESTROY carries for its observations.
#[derive(Clone, Copy, Debug)]
struct Ended {
    /// The kernel's start and stop stamps, when it gave both.
    span: Option<(u64, u64)>,
    to: Counters,
    from: Counters,
    /// Ended by its DESTROY alone, in TCP state CLOSE (a reset).
    reset: bool,
    /// The block its observations go to: its Service's, or the node's.
    block: BlockId,
    /// Its IP protocol number.
    proto: u8,
    /// Its DESTROY shows `SEEN_REPLY`: it was answered.
    answered: bool,
}

impl Ended {
    #[inline]
    fn of(ev: &CtEvent, block: BlockId) -> Ended {
        Ended {
            block,
            span: ev.timestamp.and_then(|t| Some((t.start?, t.stop?))),
            to: ev.counters_orig.unwrap_or_default(),
            from: ev.counters_reply.unwrap_or_default(),
            proto: ev.orig.and_then(|t| t.proto).unwrap_or(0),
            answered: ev.status.is_some_and(|s| s.has(Status::SEEN_REPLY)),
            reset: ev.tcp_state == Some(TcpState::CLOSE),
        }
    }

    /// Whether the flow is TCP.
    #[inline]
    fn tcp(&self) -> bool {
        self.proto == TCP
    }
}

impl FlowTracker {
    /// A tracker for at most `max_flows` flows at once, allocated now, taking
    /// every flow, behind no kernel filter, subscribed before any flow it is
    /// given started (replays, benches).
    pub fn new(filter: ServiceFilter, max_flows: usize) -> FlowTracker {
        FlowTracker::for_reader(
            filter,
            max_flows,
            ReaderShare::ALL,
            KernelFiltered::default(),
            0,
        )
    }

    /// A tracker of one reader's `share` of the flows, behind a kernel
    /// filter that drops what `kernel_filtered` says, on a socket subscribed
    /// at or before `subscribed_ns` (wall clock): flows that started earlier
    /// may have events it never got, and are not measured.
    pub fn for_reader(
        filter: ServiceFilter,
        max_flows: usize,
        share: ReaderShare,
        kernel_filtered: KernelFiltered,
        subscribed_ns: u64,
    ) -> FlowTracker {
        FlowTracker {
            filter,
            table: FlowTable::new(max_flows),
            overruns: 0,
            loss_horizon_ns: subscribed_ns,
            share,
            kernel_filtered,
            queue: Vec::with_capacity(QUEUE_DEPTH),
            recent_destroys: RecentDestroys::new(RECENT_DESTROYS),
            congested: false,
            services: None,
            unanswered: None,
            awaiting: Box::default(),
            awaiting_counted_ns: 0,
        }
    }

    /// The same tracker, observing seen-reply and FIN latencies when they
    /// happen (`--live-latency`): each flow's start is its NEW, kept in a
    /// table of `unanswered` flows of its own until the flow's first reply.
    pub fn with_live_latency(mut self, unanswered: usize) -> FlowTracker {
        self.unanswered = Some(FlowTable::new(unanswered));
        self.awaiting = vec![0; self.blocks()].into_boxed_slice();
        self
    }

    /// Whether latencies are observed when they happen.
    pub fn live(&self) -> bool {
        self.unanswered.is_some()
    }

    /// With `--live-latency`: flows waiting for their first reply.
    pub fn unanswered(&self) -> usize {
        self.unanswered.as_ref().map_or(0, FlowTable::len)
    }

    /// With `--live-latency`: counts the flows whose NEW came more than
    /// [`AWAITING_AFTER_NS`] before `now_ns` and that have seen no reply, per
    /// block, sets each block's [`BlockGauge::AwaitingReply`] to its count
    /// through `shard`, and returns the count over every block. A Service
    /// with flows awaiting a reply is not idle: it keeps its slot, so a flow
    /// is never counted under another Service's labels.
    ///
    /// Between batches, never per event: it walks the unanswered flows
    /// oldest first and stops at the first younger one (a SYN flood makes
    /// that walk long; the reader runs it at most every
    /// [`AWAITING_EVERY_NS`]).
    pub fn count_awaiting(&mut self, now_ns: u64, shard: &mut ShardWriter<'_>) -> u64 {
        let Some(table) = &self.unanswered else {
            return 0;
        };
        let cutoff = now_ns.saturating_sub(AWAITING_AFTER_NS);
        self.awaiting.fill(0);
        let mut total = 0;
        for flow in table.oldest_first().take_while(|f| f.started_ns <= cutoff) {
            if let Some(n) = self.awaiting.get_mut(flow.block as usize) {
                *n += 1;
            }
            total += 1;
        }
        for (index, &n) in self.awaiting.iter().enumerate() {
            let Some(block) = shard.block(index) else {
                break;
            };
            shard.set_gauge(block, BlockGauge::AwaitingReply, n);
            if let (true, Some(services)) = (n > 0, self.services.as_mut()) {
                services.keep(block, now_ns);
            }
        }
        total
    }

    /// The same tracker, recording each Service's flows in a block of its
    /// own (`--service-labels`) within `budget`. The shard it writes needs
    /// [`ServiceSlots::blocks`] blocks, block 0 labelled as the overflow
    /// ([`label_overflow_blocks`](super::services::label_overflow_blocks)).
    pub fn with_services(mut self, budget: ServiceBudget) -> FlowTracker {
        self.services = Some(ServiceSlots::new(budget));
        if self.live() {
            self.awaiting = vec![0; self.blocks()].into_boxed_slice();
        }
        self
    }

    /// Blocks the shard this tracker writes needs.
    pub fn blocks(&self) -> usize {
        self.services.as_ref().map_or(1, ServiceSlots::blocks)
    }

    /// Flows being tracked.
    pub fn flows(&self) -> usize {
        self.table.len()
    }

    /// The table's capacity.
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }

    /// The kernel reported an overrun (`ENOBUFS`, or an overrun message)
    /// read at `at_ns`: events were lost. Until the reader finds its socket
    /// drained ([`FlowTracker::drained`]) the kernel keeps dropping events
    /// for it without another report (the socket stays congested until its
    /// queue is empty), so no flow entered meanwhile is measured.
    #[inline]
    pub fn overrun(&mut self, at_ns: u64, shard: &mut ShardWriter<'_>) {
        self.lost(at_ns, shard);
        self.congested = true;
    }

    /// An event of some flow was lost at `at_ns` (a truncated or malformed
    /// message): no flow started before then is measured from later events.
    #[inline]
    pub fn lost(&mut self, at_ns: u64, shard: &mut ShardWriter<'_>) {
        self.flush(shard);
        self.overruns = self.overruns.wrapping_add(1);
        self.loss_horizon_ns = self.loss_horizon_ns.max(at_ns);
    }

    /// The reader found its socket drained at `at_ns`: after an overrun,
    /// the kernel dropped events silently until now, so the horizon moves
    /// here too, and flows enter the table as whole again. With
    /// `--live-latency`, the flows awaiting a reply are counted (at most
    /// every [`AWAITING_EVERY_NS`]) before idle Services give their slots
    /// back.
    #[inline]
    pub fn drained(&mut self, at_ns: u64, shard: &mut ShardWriter<'_>) {
        if self.live() && at_ns.saturating_sub(self.awaiting_counted_ns) >= AWAITING_EVERY_NS {
            self.count_awaiting(at_ns, shard);
            self.awaiting_counted_ns = at_ns;
        }
        if let Some(services) = self.services.as_mut() {
            services.expire_idle(at_ns, shard);
        }
        if self.congested {
            self.flush(shard);
            self.loss_horizon_ns = self.loss_horizon_ns.max(at_ns);
            self.congested = false;
        }
    }

    /// The key under which a flow table holds `ev`'s flow, if `ev` carries
    /// the flow's conntrack id: an entry of a table dump maps to the same
    /// key as the flow's events.
    pub fn key_of(ev: &CtEvent) -> Option<FlowKey> {
        ev.id.map(|id| flow_key(id, ev))
    }

    /// Reconciles up to `slots` entry slots of the table, from slot `from`,
    /// with `live`, the Service flows a dump of the kernel's table found: a
    /// flow that entered the table more than [`RECONCILE_MARGIN_NS`] before
    /// the dump began and that the dump did not find is gone from the
    /// kernel, its DESTROY lost. It is dropped and counted
    /// ([`Counter::LostDestroys`]); a flow that entered later may be too new
    /// for the dump and stays. Returns the slot to go on from, `None` once
    /// the whole table is done.
    ///
    /// The reader calls this only when its socket is drained after it got
    /// `live`, so every DESTROY the kernel sent before the dump ended has
    /// been taken: a flow absent from the dump whose DESTROY came is no
    /// longer in the table.
    pub fn reconcile(
        &mut self,
        live: &LiveFlows,
        from: usize,
        slots: usize,
        shard: &mut ShardWriter<'_>,
    ) -> Option<usize> {
        self.flush(shard);
        let entered_before = live.taken_ns().saturating_sub(RECONCILE_MARGIN_NS);
        let (next, mut dropped) = self.table.retain_slots(from, slots, |key, flow| {
            flow.seen_reply_ns.is_none_or(|at| at >= entered_before) || live.contains(key)
        });
        // The unanswered flows, all at the start of a sweep.
        if let (0, Some(table)) = (from, self.unanswered.as_mut()) {
            let capacity = table.capacity();
            let (_, gone) = table.retain_slots(0, capacity, |key, flow| {
                flow.started_ns >= entered_before || live.contains(key)
            });
            dropped += gone;
        }
        if dropped > 0 {
            shard.count(Counter::LostDestroys, dropped);
        }
        next
    }

    /// Takes one event. `received_ns` is the wall-clock receive time of its
    /// batch, used when the kernel did not stamp the event. An event that
    /// touches the table may wait in a queue of [`QUEUE_DEPTH`] until
    /// [`FlowTracker::flush`]; events are always taken in order.
    ///
    /// Only DNAT'd flows to a Service count, every event of them (the Go
    /// original also took the DESTROY of a flow to a Service address that no
    /// rule rewrote; the issue that specified this exporter asks for DNAT'd
    /// flows only).
    #[inline]
    pub fn event(&mut self, ev: &CtEvent, received_ns: u64, shard: &mut ShardWriter<'_>) {
        // Userspace applies the kernel filter's tests again: the safety net.
        let service = self.filter.to_service(ev);
        let ours = self.share.owns(ev.id);
        if !service || !ours {
            if (!service && self.kernel_filtered.non_service)
                || (!ours && self.kernel_filtered.other_shares)
            {
                shard.count(Counter::KernelFilterMisses, 1);
            }
            return;
        }
        if !ServiceFilter::dnat(ev) {
            return;
        }
        let Some(id) = ev.id else {
            return;
        };
        let moment = Moment {
            at: ev.timestamp_event.unwrap_or(received_ns),
            seen_reply: ev.status.is_some_and(|s| s.has(Status::SEEN_REPLY)),
            fin: ev.orig.and_then(|t| t.proto) == Some(TCP)
                && ev.tcp_state.is_some_and(TcpState::is_closing),
            reset: ev.tcp_state == Some(TcpState::CLOSE),
        };
        match ev.kind {
            // The first event that shows the reply inserts the flow. Usually
            // an UPDATE; but when the kernel fails to deliver an event to any
            // listener (another one overran), it re-sends the missed events
            // merged into the flow's next one, to every listener, and a merged
            // NEW goes out as a NEW: a NEW can show the reply too.
            EventKind::New | EventKind::Update if moment.seen_reply => {
                let live = match self.unanswered {
                    Some(_) => LiveStep::Reply(self.service_block(ev, moment.at, false, shard)),
                    None => LiveStep::No,
                };
                self.queue(Step {
                    key: flow_key(id, ev),
                    moment,
                    end: None,
                    live,
                })
            }
            // With --live-latency, the flow's start: its NEW, which also
            // finds its Service's block (a Service whose backends all stopped
            // answering takes a slot, for its flows awaiting a reply).
            EventKind::New if self.unanswered.is_some() => {
                let block = self.service_block(ev, moment.at, false, shard);
                self.queue(Step {
                    key: flow_key(id, ev),
                    moment,
                    end: None,
                    live: LiveStep::New(block),
                })
            }
            // Otherwise nothing to keep before the first reply: the start
            // comes with the DESTROY, and whether the NEW was received is
            // known then from the loss horizon. A FIN counts only after a
            // reply.
            EventKind::New | EventKind::Update => {}
            EventKind::Destroy => {
                let key = flow_key(id, ev);
                let start = ev.timestamp.and_then(|t| t.start).unwrap_or(0);
                if self.recent_destroys.seen_before(key, start) {
                    shard.count(Counter::DuplicateDestroys, 1);
                    return;
                }
                let end = Ended::of(ev, self.service_block(ev, moment.at, true, shard));
                // SEEN_REPLY never clears: a DESTROY without it ends a flow
                // that was never answered, so never in the table.
                if ev.status.is_some_and(|s| !s.has(Status::SEEN_REPLY)) {
                    observe_destroy(&end, &FlowState::default(), shard);
                    if self.unanswered.is_some() {
                        self.queue(Step {
                            key,
                            moment,
                            end: None,
                            live: LiveStep::Forget,
                        });
                    }
                } else {
                    self.queue(Step {
                        key,
                        moment,
                        end: Some(end),
                        live: LiveStep::No,
                    });
                }
            }
        }
        if self.queue.len() == QUEUE_DEPTH {
            self.flush(shard);
        }
    }

    /// The block a Service flow's observations at `at` go to: the node's
    /// without Service labels; else its Service's, or the overflow when
    /// every slot is taken, counted when the event `ends` the flow (its
    /// DESTROY: each flow once, with or without `--live-latency`).
    #[inline]
    fn service_block(
        &mut self,
        ev: &CtEvent,
        at: u64,
        ends: bool,
        shard: &mut ShardWriter<'_>,
    ) -> BlockId {
        let Some(services) = self.services.as_mut() else {
            return BlockId::NODE;
        };
        let orig = ev.orig.unwrap_or_default();
        let key = ServiceKey {
            addr: orig
                .dst
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            port: orig.dst_port.unwrap_or(0),
            proto: orig.proto.unwrap_or(0),
        };
        services.block_for(key, at, shard).unwrap_or_else(|| {
            if ends {
                shard.count(Counter::ServiceBudgetOverflow, 1);
            }
            BlockId::NODE
        })
    }

    /// Queues a table step, with a hint for its index cell.
    #[inline]
    fn queue(&mut self, step: Step) {
        self.table.prefetch_cell(step.key);
        self.queue.push(step);
    }

    /// Takes the queued table steps, in order. The reader calls it after
    /// each batch; [`FlowTracker::event`] when the queue is full.
    #[inline]
    pub fn flush(&mut self, shard: &mut ShardWriter<'_>) {
        let n = self.queue.len();
        for step in &self.queue[..n.min(ENTRY_LOOKAHEAD)] {
            self.table.prefetch_entry(step.key);
        }
        for i in 0..n {
            if let Some(ahead) = self.queue.get(i + ENTRY_LOOKAHEAD) {
                self.table.prefetch_entry(ahead.key);
            }
            let step = self.queue[i];
            self.step(step, shard);
        }
        self.queue.clear();
    }

    /// One NEW or UPDATE that shows a reply, or one DESTROY of an answered
    /// flow.
    #[inline]
    fn step(&mut self, step: Step, shard: &mut ShardWriter<'_>) {
        let Step {
            key,
            moment,
            end,
            live,
        } = step;
        let overruns = self.overruns;
        match live {
            LiveStep::New(block) => return self.enter_unanswered(key, moment.at, block, shard),
            LiveStep::Forget => {
                if let Some(table) = self.unanswered.as_mut() {
                    table.remove(key);
                }
                return;
            }
            LiveStep::No | LiveStep::Reply(_) => {}
        }
        let Some(end) = end else {
            // An event showing SEEN_REPLY: the first inserts the flow, at its
            // seen-reply moment.
            if let Some(flow) = self.table.get_mut(key) {
                if moment.fin {
                    record_fin(flow, moment.at, overruns, moment.reset);
                    if let LiveStep::Reply(block) = live {
                        observe_fin_now(flow, block, shard);
                    }
                }
                return;
            }
            let mut fresh = FlowState {
                seen_reply_ns: Some(moment.at),
                overruns_at_insert: overruns,
                loss_horizon_ns: self.entry_horizon(),
                ..FlowState::default()
            };
            if let LiveStep::Reply(block) = live {
                self.observe_reply_now(key, moment.at, block, &mut fresh, shard);
            }
            let (flow, inserted) = self.table.insert(key, fresh);
            if moment.fin {
                record_fin(flow, moment.at, overruns, moment.reset);
                if let LiveStep::Reply(block) = live {
                    observe_fin_now(flow, block, shard);
                }
            }
            if let Inserted::Evicted { state, .. } = inserted {
                shard.count(Counter::FlowsEvicted, 1);
                // A later event of the evicted flow finds no entry and would
                // be taken for its first reply: the flow started before its
                // seen-reply moment, so the horizon past that keeps it out.
                let at = state.seen_reply_ns.unwrap_or(moment.at);
                self.loss_horizon_ns = self.loss_horizon_ns.max(at);
            }
            return;
        };
        if let Some(table) = self.unanswered.as_mut() {
            // Its reply event never came (or came before its NEW was taken).
            table.remove(key);
        }
        let mut flow = self.table.remove(key).unwrap_or_else(|| {
            // An answered flow with no entry, though it started after every
            // loss this reader knows of: its reply event never came. The
            // original counts a flow without its seen-reply event the same
            // way.
            if end
                .span
                .is_some_and(|(start, _)| start > self.loss_horizon_ns)
            {
                shard.count(Counter::EventsOrderErrors, 1);
            }
            FlowState::default()
        });
        // A DESTROY comes when the entry is removed, which for an expired
        // flow is long after its last packet: it never sets the seen-reply
        // moment. A connection reset after it was answered is closed by its
        // DESTROY alone (state CLOSE, no UPDATE): its FIN moment is the
        // kernel's stop stamp.
        if let (true, true, Some((_, stop))) = (end.reset, moment.fin, end.span) {
            record_fin(&mut flow, stop, overruns, true);
        }
        // An entry that an overrun may have left behind (its DESTROY lost)
        // and that this flow found by the same key: not this flow's.
        let stale = flow.overruns_at_insert != overruns
            && end
                .span
                .is_some_and(|(start, _)| flow.seen_reply_ns.is_some_and(|at| at < start));
        if stale {
            flow = FlowState::default();
        }
        observe_destroy(&end, &flow, shard);
    }
}

impl FlowTracker {
    /// The loss horizon a flow entering a table now takes: past everything
    /// while the kernel may drop events unreported (its first events may
    /// have been among them).
    #[inline]
    fn entry_horizon(&self) -> u64 {
        if self.congested {
            u64::MAX
        } else {
            self.loss_horizon_ns
        }
    }

    /// With `--live-latency`: a NEW without a reply at `at`, to a Service
    /// whose series are in `block`: the flow waits in the unanswered table,
    /// the oldest unanswered flow making room.
    fn enter_unanswered(
        &mut self,
        key: FlowKey,
        at: u64,
        block: BlockId,
        shard: &mut ShardWriter<'_>,
    ) {
        let state = FlowState {
            // Never 0, which marks a free entry.
            started_ns: at.max(1),
            // Blocks number at most --max-services + 1 (100,001).
            block: block.index() as u32,
            overruns_at_insert: self.overruns,
            loss_horizon_ns: self.entry_horizon(),
            ..FlowState::default()
        };
        let Some(table) = self.unanswered.as_mut() else {
            return;
        };
        if let (_, Inserted::Evicted { .. }) = table.insert(key, state) {
            shard.count(Counter::UnansweredDropped, 1);
        }
    }

    /// With `--live-latency`: the first reply of flow `key` at `at`. If its
    /// NEW is in the unanswered table and no event of the flow can have been
    /// lost since (it started after the loss horizon its NEW took, and no
    /// overrun came between), its seen-reply latency is observed now, from
    /// the NEW, and `fresh` (its entry to be) remembers that.
    fn observe_reply_now(
        &mut self,
        key: FlowKey,
        at: u64,
        block: BlockId,
        fresh: &mut FlowState,
        shard: &mut ShardWriter<'_>,
    ) {
        let Some(new) = self.unanswered.as_mut().and_then(|t| t.remove(key)) else {
            // Its NEW was not taken (before the subscription, or the oldest
            // unanswered flow evicted): observed at its DESTROY, as without
            // the flag.
            return;
        };
        if new.started_ns <= new.loss_horizon_ns || new.overruns_at_insert != self.overruns {
            return;
        }
        match at.checked_sub(new.started_ns) {
            Some(l) => shard.observe_in(block, Series::SeenReplyLatency, l),
            None => shard.count(Counter::EventsOrderErrors, 1),
        }
        fresh.started_ns = new.started_ns;
    }
}

/// With `--live-latency`: the FIN latency of a flow whose seen-reply latency
/// was observed live, observed now if its FIN moment is complete and not
/// observed yet.
#[inline]
fn observe_fin_now(flow: &mut FlowState, block: BlockId, shard: &mut ShardWriter<'_>) {
    if !flow.observed_live() || flow.fin_observed || !flow.fin_complete {
        return;
    }
    let Some(fin) = flow.fin_ns() else {
        return;
    };
    flow.fin_observed = true;
    match fin.checked_sub(flow.started_ns) {
        Some(l) => shard.observe_in(block, Series::FinLatency, l),
        None => shard.count(Counter::EventsOrderErrors, 1),
    }
}

/// The conntrack id in the high half, a hash of the original tuple in the
/// low half: the kernel's 32-bit ids collide among many live flows (see
/// [`super::table::FlowKey`]).
#[inline]
fn flow_key(id: u32, ev: &CtEvent) -> FlowKey {
    let t = ev.orig.unwrap_or_default();
    let addr = |a: Option<IpAddr>| match a {
        Some(IpAddr::V4(v4)) => u128::from(u32::from(v4)),
        Some(IpAddr::V6(v6)) => u128::from(v6),
        None => 0,
    };
    let mix = |h: u64, v: u64| (h ^ v).wrapping_mul(0x100_0000_01B3).rotate_left(29);
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for a in [addr(t.src), addr(t.dst)] {
        h = mix(h, a as u64);
        h = mix(h, (a >> 64) as u64);
    }
    let ports =
        u64::from(t.src_port.or(t.icmp_id).unwrap_or(0)) << 16 | u64::from(t.dst_port.unwrap_or(0));
    h = mix(h, ports << 16 | u64::from(t.proto.unwrap_or(0)));
    // Finalize (MurmurHash3's fmix64): the multiply-and-rotate rounds above
    // carry a change in a high input bit only upward, so without this two
    // tuples differing in the source port alone kept all but 3 bits of the
    // upper half equal, and flows sharing a kernel id collided 1 time in 8.
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    u64::from(id) << 32 | (h >> 32)
}

/// What one event shows about its flow.
#[derive(Clone, Copy, Debug)]
struct Moment {
    at: u64,
    seen_reply: bool,
    fin: bool,
    /// The closing state is CLOSE: the flow was reset.
    reset: bool,
}

/// Records `at` as the flow's FIN moment if it has none yet and was answered
/// (a refused connection, SYN then RST, has no FIN latency): complete when no
/// overrun (`overruns` is the count now) came since the flow's insertion.
#[inline]
fn record_fin(flow: &mut FlowState, at: u64, overruns: u32, reset: bool) {
    if flow.fin_ns().is_none() && flow.seen_reply_ns.is_some() {
        // Never 0, which means none.
        flow.fin_at_ns = at.max(1);
        flow.closed_by_reset = reset;
        flow.fin_complete = flow.overruns_at_insert == overruns;
    }
}

/// The observations of a flow at its DESTROY. Its latencies count only if
/// it started after the loss horizon its entry took at insertion: then its
/// NEW and every event up to its first reply were received.
fn observe_destroy(end: &Ended, flow: &FlowState, shard: &mut ShardWriter<'_>) {
    // As the original: only a DESTROY with the kernel's start and stop
    // (timestamps were on when the flow was created) yields observations.
    let Some((start, stop)) = end.span else {
        return;
    };
    match stop.checked_sub(start) {
        Some(d) => shard.observe_in(end.block, Series::Duration, d / 1_000),
        None => shard.count(Counter::EventsOrderErrors, 1),
    }
    // Counted with the duration, so the outcomes add up to the flows
    // counted.
    let outcome = match (end.answered, end.tcp()) {
        (true, true) if flow.closed_by_reset => Outcome::Reset,
        (true, _) => Outcome::Answered,
        (false, true) if end.from.packets.is_some_and(|p| p > 0) => Outcome::Refused,
        (false, _) => Outcome::Unanswered,
    };
    shard.observe_in(end.block, Series::flows(end.proto), outcome as u64);
    // One call per series, each a constant: the bucket search is then
    // unrolled over the family's bounds (a loop over the four kept it a
    // search in memory, a third of this function's time in the UDP storm).
    let (to, from) = (end.to, end.from);
    if let Some(v) = to.bytes {
        shard.observe_in(end.block, Series::BytesToService, v);
    }
    if let Some(v) = to.packets {
        shard.observe_in(end.block, Series::PacketsToService, v);
    }
    if let Some(v) = from.bytes {
        shard.observe_in(end.block, Series::BytesFromService, v);
    }
    if let Some(v) = from.packets {
        shard.observe_in(end.block, Series::PacketsFromService, v);
    }
    let whole = start > flow.loss_horizon_ns;
    // An entry is inserted at its flow's seen-reply moment, so no overrun
    // can come between the two: that moment counts when the flow is whole.
    // A flow observed live (--live-latency) was observed at its reply.
    if let (Some(at), true, false) = (flow.seen_reply_ns, whole, flow.observed_live()) {
        match at.checked_sub(start) {
            Some(l) => shard.observe_in(end.block, Series::SeenReplyLatency, l),
            None => shard.count(Counter::EventsOrderErrors, 1),
        }
    }
    // A live flow's FIN latency runs from its NEW, as observed at the FIN
    // (or here, for a reset that only its DESTROY shows); the throughput
    // takes the same latency.
    let (begin, measured) = if flow.observed_live() {
        (flow.started_ns, true)
    } else {
        (start, whole)
    };
    if let (Some(at), true, true, true) = (flow.fin_ns(), flow.fin_complete, end.tcp(), measured) {
        match at.checked_sub(begin) {
            Some(l) => {
                if !flow.fin_observed {
                    shard.observe_in(end.block, Series::FinLatency, l);
                }
                if l > 0 {
                    for (bytes, series) in [
                        (to.bytes, Series::FinThroughputToService),
                        (from.bytes, Series::FinThroughputFromService),
                    ] {
                        if let Some(b) = bytes {
                            // Thousandths of a byte per second: b * 1e3 / (l / 1e9).
                            let milli = u128::from(b) * 1_000_000_000_000 / u128::from(l);
                            shard.observe_in(
                                end.block,
                                series,
                                u64::try_from(milli).unwrap_or(u64::MAX),
                            );
                        }
                    }
                }
            }
            None if flow.fin_observed => {}
            None => shard.count(Counter::EventsOrderErrors, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Hand-built event sequences, and the kernel captures replayed.
    use super::*;
    use crate::stats::summary::SummaryWindow;
    use crate::stats::{ShardSet, Snapshot};
    use crate::wire::{capture, Counters, Timestamp, Tuple};
    use std::net::IpAddr;

    const VIP: &str = "10.96.1.1";
    const CLIENT: &str = "10.200.1.2";
    const BACKEND: &str = "10.200.2.2";
    const MS: u64 = 1_000_000;
    const T0: u64 = 1_795_000_000_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn filter() -> ServiceFilter {
        ServiceFilter::new(
            vec![
                "10.96.0.0/16".parse().unwrap(),
                "fd00:96::/112".parse().unwrap(),
            ],
            vec!["10.96.0.0/24".parse().unwrap()],
        )
    }

    /// An event of a DNAT'd flow CLIENT -> VIP:80, backend BACKEND:8080.
    fn ev(
        kind: EventKind,
        id: u32,
        proto: u8,
        state: Option<TcpState>,
        status: u32,
        at: u64,
    ) -> CtEvent {
        CtEvent {
            id: Some(id),
            status: Some(Status(status)),
            orig: Some(Tuple {
                src: Some(ip(CLIENT)),
                dst: Some(ip(VIP)),
                proto: Some(proto),
                src_port: Some(40000),
                dst_port: Some(80),
                ..Tuple::default()
            }),
            reply: Some(Tuple {
                src: Some(ip(BACKEND)),
                dst: Some(ip(CLIENT)),
                proto: Some(proto),
                src_port: Some(8080),
                dst_port: Some(40000),
                ..Tuple::default()
            }),
            tcp_state: state,
            timestamp_event: Some(at),
            ..CtEvent::empty(kind, 2)
        }
    }

    const NAT: u32 = Status::CONFIRMED | Status::DST_NAT;
    const REPLIED: u32 = NAT | Status::SEEN_REPLY;

    fn destroy(id: u32, proto: u8, state: Option<TcpState>, start: u64, stop: u64) -> CtEvent {
        CtEvent {
            counters_orig: Some(Counters {
                packets: Some(5),
                bytes: Some(346),
            }),
            counters_reply: Some(Counters {
                packets: Some(5),
                bytes: Some(354),
            }),
            timestamp: Some(Timestamp {
                start: Some(start),
                stop: Some(stop),
            }),
            ..ev(
                EventKind::Destroy,
                id,
                proto,
                state,
                REPLIED | Status::DYING,
                stop + 500 * MS,
            )
        }
    }

    struct Run {
        shards: ShardSet,
    }

    impl Run {
        fn new() -> Run {
            Run {
                shards: ShardSet::new(1, SummaryWindow::from_minutes(10)),
            }
        }

        /// The events in order, then the queue flushed, as the reader does
        /// after a batch.
        fn feed(&self, tracker: &mut FlowTracker, events: &[CtEvent]) {
            let mut w = self.shards.writer(0).unwrap();
            for e in events {
                tracker.event(e, e.timestamp_event.unwrap_or(0) + 7 * MS, &mut w);
            }
            tracker.flush(&mut w);
        }

        /// An overrun reported at `at`.
        fn overrun(&self, tracker: &mut FlowTracker, at: u64) {
            let mut w = self.shards.writer(0).unwrap();
            tracker.overrun(at, &mut w);
        }

        fn drained(&self, tracker: &mut FlowTracker, at: u64) {
            let mut w = self.shards.writer(0).unwrap();
            tracker.drained(at, &mut w);
        }

        /// The flows awaiting a reply at `at`, counted into the shard; the
        /// scrape shows the same count.
        fn awaiting(&self, tracker: &mut FlowTracker, at: u64) -> u64 {
            let n = tracker.count_awaiting(at, &mut self.shards.writer(0).unwrap());
            assert_eq!(self.snap().gauge(BlockGauge::AwaitingReply), n);
            n
        }

        fn snap(&self) -> Snapshot {
            let mut s = Snapshot::default();
            self.shards.merge_into(&mut s);
            s
        }
    }

    fn tcp_flow(id: u32, states: &[TcpState]) -> Vec<CtEvent> {
        tcp_flow_from(T0, id, states)
    }

    /// A TCP flow started at `t0`: NEW 1 ms later, then one UPDATE a
    /// millisecond per state, DESTROY (TIME_WAIT) stopped at `t0` + 100 ms.
    fn tcp_flow_from(t0: u64, id: u32, states: &[TcpState]) -> Vec<CtEvent> {
        let mut v = vec![ev(
            EventKind::New,
            id,
            6,
            Some(TcpState::SYN_SENT),
            NAT,
            t0 + MS,
        )];
        for (i, s) in states.iter().enumerate() {
            let status = if *s == TcpState::SYN_SENT {
                NAT
            } else {
                REPLIED
            };
            v.push(ev(
                EventKind::Update,
                id,
                6,
                Some(*s),
                status,
                t0 + (i as u64 + 2) * MS,
            ));
        }
        v.push(destroy(id, 6, Some(TcpState::TIME_WAIT), t0, t0 + 100 * MS));
        v
    }

    #[test]
    fn a_tcp_flow_yields_every_observation_from_kernel_stamps() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        run.feed(
            &mut t,
            &tcp_flow(
                1,
                &[
                    S::SYN_RECV,
                    S::ESTABLISHED,
                    S::FIN_WAIT,
                    S::LAST_ACK,
                    S::TIME_WAIT,
                ],
            ),
        );
        let s = run.snap();
        // SYN_RECV stamped T0+2ms, FIN_WAIT T0+4ms, flow start T0.
        assert_eq!(
            (
                s.count(Series::SeenReplyLatency),
                s.sum(Series::SeenReplyLatency)
            ),
            (1, (2 * MS) as f64)
        );
        assert_eq!(
            (s.count(Series::FinLatency), s.sum(Series::FinLatency)),
            (1, (4 * MS) as f64)
        );
        assert_eq!(s.sum(Series::Duration), 100_000.0, "100 ms in microseconds");
        assert_eq!(s.sum(Series::BytesToService), 346.0);
        assert_eq!(s.sum(Series::PacketsFromService), 5.0);
        // 346 bytes in 4 ms = 86,500 B/s, in thousandths.
        assert_eq!(s.sum(Series::FinThroughputToService), 86_500_000.0);
        assert_eq!(s.sum(Series::FinThroughputFromService), 88_500_000.0);
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
        assert_eq!(t.flows(), 0, "DESTROY removes the flow");
    }

    #[test]
    fn fin_comes_from_the_first_closing_state_when_fin_wait_is_skipped() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        // Both FINs crossed: no FIN_WAIT update, CLOSE_WAIT first.
        run.feed(
            &mut t,
            &tcp_flow(
                2,
                &[
                    S::SYN_RECV,
                    S::ESTABLISHED,
                    S::CLOSE_WAIT,
                    S::LAST_ACK,
                    S::TIME_WAIT,
                ],
            ),
        );
        // And one that jumps from ESTABLISHED straight to TIME_WAIT.
        run.feed(
            &mut t,
            &tcp_flow(3, &[S::SYN_RECV, S::ESTABLISHED, S::TIME_WAIT]),
        );
        let s = run.snap();
        assert_eq!(s.count(Series::FinLatency), 2);
        assert_eq!(s.sum(Series::FinLatency), (8 * MS) as f64, "4 ms each");
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
    }

    #[test]
    fn udp_yields_seen_reply_and_duration_but_no_fin() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        run.feed(
            &mut t,
            &[
                ev(EventKind::New, 4, 17, None, NAT, T0 + MS),
                ev(EventKind::Update, 4, 17, None, REPLIED, T0 + 3 * MS),
                destroy(4, 17, None, T0, T0 + 30 * MS),
            ],
        );
        let s = run.snap();
        assert_eq!(s.sum(Series::SeenReplyLatency), (3 * MS) as f64);
        assert_eq!(s.count(Series::Duration), 1);
        assert_eq!(s.count(Series::FinLatency), 0);
        assert_eq!(s.count(Series::FinThroughputToService), 0);
    }

    #[test]
    fn a_refused_connection_has_a_duration_and_no_latency() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut d = destroy(5, 6, Some(TcpState::CLOSE), T0, T0 + MS);
        d.status = Some(Status(NAT | Status::DYING));
        run.feed(
            &mut t,
            &[
                ev(EventKind::New, 5, 6, Some(TcpState::SYN_SENT), NAT, T0),
                d,
            ],
        );
        let s = run.snap();
        assert_eq!(s.count(Series::Duration), 1);
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        // CLOSE, but the connection was never answered: no FIN latency.
        assert_eq!(s.count(Series::FinLatency), 0);
        // The backend's side carried its reset: refused.
        assert_eq!(s.buckets(Series::FlowsTcp), [0, 1, 0, 0]);
        // The same with nothing back (a blackholed SYN, counters 0): unanswered.
        let mut d = destroy(6, 6, Some(TcpState::SYN_SENT), T0, T0 + MS);
        d.status = Some(Status(NAT | Status::DYING));
        d.counters_reply = Some(Counters {
            packets: Some(0),
            bytes: Some(0),
        });
        run.feed(&mut t, &[d]);
        assert_eq!(run.snap().buckets(Series::FlowsTcp), [0, 1, 1, 0]);
    }

    #[test]
    fn an_answered_connection_reset_is_closed_at_its_stop_stamp() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut d = destroy(18, 6, Some(TcpState::CLOSE), T0, T0 + 9 * MS);
        d.timestamp_event = Some(T0 + 9 * MS + 5);
        run.feed(
            &mut t,
            &[
                ev(
                    EventKind::New,
                    18,
                    6,
                    Some(TcpState::SYN_SENT),
                    NAT,
                    T0 + MS,
                ),
                ev(
                    EventKind::Update,
                    18,
                    6,
                    Some(TcpState::SYN_RECV),
                    REPLIED,
                    T0 + 2 * MS,
                ),
                ev(
                    EventKind::Update,
                    18,
                    6,
                    Some(TcpState::ESTABLISHED),
                    REPLIED,
                    T0 + 3 * MS,
                ),
                d,
            ],
        );
        let s = run.snap();
        assert_eq!(s.sum(Series::FinLatency), (9 * MS) as f64);
        // Answered, then reset without a FIN.
        assert_eq!(s.buckets(Series::FlowsTcp), [0, 0, 0, 1]);
        // An idle ESTABLISHED flow that expires has no FIN.
        let mut idle = destroy(19, 6, Some(TcpState::ESTABLISHED), T0, T0 + 9 * MS);
        idle.timestamp_event = Some(T0 + 99 * MS);
        run.feed(
            &mut t,
            &[
                ev(
                    EventKind::New,
                    19,
                    6,
                    Some(TcpState::SYN_SENT),
                    NAT,
                    T0 + MS,
                ),
                ev(
                    EventKind::Update,
                    19,
                    6,
                    Some(TcpState::SYN_RECV),
                    REPLIED,
                    T0 + 2 * MS,
                ),
                idle,
            ],
        );
        assert_eq!(run.snap().count(Series::FinLatency), 1);
    }

    #[test]
    fn flows_outside_services_excluded_or_without_dnat_are_not_counted() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut other = tcp_flow(6, &[TcpState::SYN_RECV]);
        for e in &mut other {
            e.orig.as_mut().unwrap().dst = Some(ip("10.97.0.1"));
        }
        let mut excluded = tcp_flow(7, &[TcpState::SYN_RECV]);
        for e in &mut excluded {
            e.orig.as_mut().unwrap().dst = Some(ip("10.96.0.10"));
        }
        for flow in [other, excluded] {
            run.feed(&mut t, &flow);
        }
        let s = run.snap();
        for series in Series::ALL.iter().filter(|s| **s != Series::ReaderBatch) {
            assert_eq!(s.count(*series), 0, "{series:?}");
        }
        assert_eq!(t.flows(), 0);
        // A flow to a Service address that no rule rewrote: not counted,
        // not even its DESTROY (the Go original took that one).
        let mut direct = tcp_flow(8, &[TcpState::SYN_RECV, TcpState::FIN_WAIT]);
        for e in &mut direct {
            e.status = e.status.map(|s| Status(s.0 & !Status::DST_NAT));
            e.reply.as_mut().unwrap().src = Some(ip(VIP));
        }
        run.feed(&mut t, &direct);
        let s = run.snap();
        for series in Series::ALL.iter().filter(|s| **s != Series::ReaderBatch) {
            assert_eq!(s.count(*series), 0, "{series:?}");
        }
        assert_eq!(t.flows(), 0);
    }

    #[test]
    fn ipv6_service_flows_count() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut flow = tcp_flow(9, &[TcpState::SYN_RECV, TcpState::FIN_WAIT]);
        for e in &mut flow {
            e.family = 10;
            e.orig.as_mut().unwrap().dst = Some(ip("fd00:96::a"));
            e.reply.as_mut().unwrap().src = Some(ip("fd00:2::2"));
        }
        run.feed(&mut t, &flow);
        assert_eq!(run.snap().count(Series::SeenReplyLatency), 1);
    }

    #[test]
    fn without_kernel_stamps_the_receive_time_is_the_moment() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut flow = vec![
            ev(EventKind::New, 10, 17, None, NAT, T0),
            ev(EventKind::Update, 10, 17, None, REPLIED, T0 + 2 * MS),
            destroy(10, 17, None, T0, T0 + 10 * MS),
        ];
        for e in &mut flow {
            e.timestamp_event = None;
        }
        let mut w = run.shards.writer(0).unwrap();
        t.event(&flow[0], T0 + MS, &mut w);
        t.event(&flow[1], T0 + 5 * MS, &mut w);
        t.event(&flow[2], T0 + 20 * MS, &mut w);
        // The UPDATE and the DESTROY wait in the queue until the flush.
        assert_eq!(t.flows(), 0);
        t.flush(&mut w);
        drop(w);
        assert_eq!(run.snap().sum(Series::SeenReplyLatency), (5 * MS) as f64);
    }

    #[test]
    fn a_destroy_delivered_again_counts_once() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        let answered = tcp_flow(21, &[S::SYN_RECV, S::FIN_WAIT]);
        let destroy = *answered.last().unwrap();
        assert_eq!(destroy.kind, EventKind::Destroy);
        // Never answered: observed at its DESTROY alone, with no entry.
        let refused = CtEvent {
            status: Some(Status(NAT | Status::DYING)),
            ..self::destroy(22, 6, Some(S::CLOSE), T0, T0 + MS)
        };
        run.feed(&mut t, &answered);
        run.feed(&mut t, &[refused]);
        // The kernel delivers both DESTROYs again, three times each.
        for _ in 0..3 {
            run.feed(&mut t, &[destroy, refused]);
        }
        let s = run.snap();
        assert_eq!(s.count(Series::Duration), 2, "each flow once");
        assert_eq!(s.count(Series::BytesToService), 2);
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
        assert_eq!(s.counter(Counter::DuplicateDestroys), 6);
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
        // The same id and tuple, started later: another flow.
        run.feed(
            &mut t,
            &tcp_flow_from(T0 + 300 * MS, 21, &[S::SYN_RECV, S::FIN_WAIT]),
        );
        assert_eq!(run.snap().count(Series::Duration), 3);
    }

    #[test]
    fn ids_are_reused_and_late_or_lost_events_are_not_measured_wrongly() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        // The same id twice in a row (the second flow started later): two flows.
        run.feed(&mut t, &tcp_flow(11, &[S::SYN_RECV, S::FIN_WAIT]));
        run.feed(
            &mut t,
            &tcp_flow_from(T0 + 200 * MS, 11, &[S::SYN_RECV, S::FIN_WAIT]),
        );
        // A NEW whose DESTROY was lost (never answered: nothing kept), then
        // the id reused: the new flow is measured.
        run.feed(
            &mut t,
            &[ev(EventKind::New, 12, 6, Some(S::SYN_SENT), NAT, T0)],
        );
        run.feed(&mut t, &tcp_flow(12, &[S::SYN_RECV, S::FIN_WAIT]));
        assert_eq!(run.snap().count(Series::SeenReplyLatency), 3);
        // An UPDATE whose NEW was lost: the overrun that lost it is reported
        // after the flow started, so its seen-reply (not its first) and its
        // FIN are not measured; its DESTROY data is.
        run.overrun(&mut t, T0 + 20 * MS);
        run.feed(
            &mut t,
            &[
                ev(
                    EventKind::Update,
                    13,
                    6,
                    Some(S::ESTABLISHED),
                    REPLIED,
                    T0 + 50 * MS,
                ),
                ev(
                    EventKind::Update,
                    13,
                    6,
                    Some(S::FIN_WAIT),
                    REPLIED,
                    T0 + 60 * MS,
                ),
                destroy(13, 6, Some(S::TIME_WAIT), T0, T0 + 100 * MS),
            ],
        );
        run.drained(&mut t, T0 + 25 * MS);
        // A flow that starts after the overrun's report is measured.
        let t1 = T0 + 30 * MS;
        run.feed(&mut t, &tcp_flow_from(t1, 14, &[S::SYN_RECV, S::FIN_WAIT]));
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 4);
        assert_eq!(s.sum(Series::SeenReplyLatency), (4 * 2 * MS) as f64);
        assert_eq!(s.count(Series::FinLatency), 4);
        assert_eq!(s.count(Series::Duration), 5);
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
        assert_eq!(t.flows(), 0);
    }

    #[test]
    fn an_entry_left_by_a_lost_destroy_is_not_taken_for_the_next_flow() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        // Flow 21 answered, then its DESTROY lost in an overrun.
        let first = tcp_flow(21, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &first[..3]);
        run.overrun(&mut t, T0 + 150 * MS);
        run.drained(&mut t, T0 + 160 * MS);
        assert_eq!(t.flows(), 1, "its entry is left behind");
        // The kernel reuses id and tuple for a flow that starts later: it
        // finds the old entry. Not measured (its milestones are the old
        // flow's), no order error; its DESTROY data is taken.
        let t1 = T0 + 200 * MS;
        run.feed(&mut t, &tcp_flow_from(t1, 21, &[S::SYN_RECV, S::FIN_WAIT]));
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        assert_eq!(s.count(Series::FinLatency), 0);
        assert_eq!(s.count(Series::Duration), 1);
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
        assert_eq!(t.flows(), 0, "and the entry is gone");
        // The next flow with that key is measured again.
        let t2 = T0 + 400 * MS;
        run.feed(&mut t, &tcp_flow_from(t2, 21, &[S::SYN_RECV, S::FIN_WAIT]));
        assert_eq!(run.snap().count(Series::SeenReplyLatency), 1);
    }

    #[test]
    fn a_dump_without_the_flow_drops_it_once_its_destroy_is_overdue() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 64);
        use TcpState as S;
        // Flows 31-35 answered; 31 and 32 then lost their DESTROY, 33-35
        // live on. Flow 36 entered just before the dump: too new to judge.
        for id in 31..=35 {
            let flow = tcp_flow(id, &[S::SYN_RECV, S::ESTABLISHED]);
            run.feed(&mut t, &flow[..3]);
        }
        let dump_at = T0 + 5_000 * MS;
        let late = tcp_flow_from(dump_at - 500 * MS, 36, &[S::SYN_RECV]);
        run.feed(&mut t, &late[..2]);
        assert_eq!(t.flows(), 6);
        let keys = |ids: &[u32]| -> Vec<FlowKey> {
            ids.iter()
                .map(|&id| {
                    FlowTracker::key_of(&ev(EventKind::Update, id, 6, None, REPLIED, 0)).unwrap()
                })
                .collect()
        };
        let live = LiveFlows::new(keys(&[33, 34, 35]), dump_at);
        let mut w = run.shards.writer(0).unwrap();
        let (mut from, mut slices) = (Some(0), 0);
        while let Some(at) = from {
            from = t.reconcile(&live, at, 16, &mut w);
            slices += 1;
        }
        drop(w);
        assert_eq!(slices, 4, "64 slots, 16 a slice");
        assert_eq!(t.flows(), 4, "33, 34, 35 and the new 36 stay");
        assert_eq!(run.snap().counter(Counter::LostDestroys), 2);
        // The flows kept end normally and are measured.
        for id in 33..=35 {
            let flow = tcp_flow(id, &[S::SYN_RECV, S::ESTABLISHED]);
            run.feed(&mut t, &flow[3..]);
        }
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 3);
        assert_eq!(s.counter(Counter::DuplicateDestroys), 0);
        // A late DESTROY of a dropped flow finds no entry: counted as
        // ended (its own data), never as a latency.
        run.feed(&mut t, &tcp_flow(31, &[S::SYN_RECV])[2..]);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 3);
        assert_eq!(t.flows(), 1);
    }

    /// A flow answered, ended, and no reply event of it ever came, though no
    /// loss was reported: counted as an order error, as the original counts
    /// a flow without its seen-reply event. Not so for a flow started
    /// before the subscription, whose reply may have come before it.
    #[test]
    fn an_answered_flow_whose_reply_event_never_came_is_an_order_error() {
        let run = Run::new();
        let filtered = KernelFiltered::default();
        let subscribed = T0 + 5 * MS;
        let mut t = FlowTracker::for_reader(filter(), 16, ReaderShare::ALL, filtered, subscribed);
        let ended = |id, t0| destroy(id, 6, Some(TcpState::TIME_WAIT), t0, t0 + 100 * MS);
        run.feed(&mut t, &[ended(30, T0)]);
        assert_eq!(run.snap().counter(Counter::EventsOrderErrors), 0);
        run.feed(&mut t, &[ended(31, T0 + 10 * MS)]);
        let s = run.snap();
        assert_eq!(s.counter(Counter::EventsOrderErrors), 1);
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        assert_eq!(s.count(Series::Duration), 2, "its duration still counts");
    }

    #[test]
    fn flows_started_before_the_subscription_are_not_measured() {
        let run = Run::new();
        let filtered = KernelFiltered::default();
        let subscribed = T0 + 5 * MS;
        let mut t = FlowTracker::for_reader(filter(), 16, ReaderShare::ALL, filtered, subscribed);
        use TcpState as S;
        // Every event given, but the flow started before the socket was
        // subscribed: its NEW could not have been received.
        run.feed(&mut t, &tcp_flow(22, &[S::SYN_RECV, S::FIN_WAIT]));
        run.feed(
            &mut t,
            &tcp_flow_from(T0 + 10 * MS, 23, &[S::SYN_RECV, S::FIN_WAIT]),
        );
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 1, "flow 23 only");
        assert_eq!(s.count(Series::FinLatency), 1, "flow 23 only");
        assert_eq!(s.count(Series::Duration), 2);
    }

    #[test]
    fn a_new_that_carries_the_reply_is_the_first_reply() {
        // Another listener overran: the kernel re-sends the flow's missed NEW
        // merged into its reply event, as a NEW with SEEN_REPLY.
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        run.feed(
            &mut t,
            &[
                ev(EventKind::New, 24, 17, None, REPLIED, T0 + 3 * MS),
                destroy(24, 17, None, T0, T0 + 30 * MS),
            ],
        );
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
        assert_eq!(s.sum(Series::SeenReplyLatency), (3 * MS) as f64);
    }

    #[test]
    fn unanswered_flows_take_no_room_in_the_table() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 4);
        // 100 unanswered UDP flows open at once, in a table for 4.
        let news: Vec<CtEvent> = (100..200)
            .map(|id| ev(EventKind::New, id, 17, None, NAT, T0 + MS))
            .collect();
        run.feed(&mut t, &news);
        assert_eq!(t.flows(), 0);
        let destroys: Vec<CtEvent> = (100..200)
            .map(|id| {
                let mut d = destroy(id, 17, None, T0, T0 + 30 * MS);
                d.status = Some(Status(NAT | Status::DYING));
                d
            })
            .collect();
        run.feed(&mut t, &destroys);
        let s = run.snap();
        assert_eq!(s.count(Series::Duration), 100);
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        assert_eq!(s.counter(Counter::FlowsEvicted), 0);
        assert_eq!(t.flows(), 0);
    }

    #[test]
    fn flows_that_differ_only_in_a_port_get_different_keys() {
        // The kernel's ids collide about once among 100,000 live flows; the
        // tuple half of the key must then tell the two apart. Flows from one
        // client to one Service differ only in their source port.
        use std::collections::HashSet;
        for proto in [6, 17] {
            let halves: HashSet<u64> = (1..=65535u16)
                .map(|port| {
                    let mut e = ev(EventKind::New, 7, proto, None, NAT, T0);
                    e.orig.as_mut().unwrap().src_port = Some(port);
                    flow_key(7, &e) & 0xFFFF_FFFF
                })
                .collect();
            // 65,535 values among 2^32: about 0.5 collisions are expected of
            // a uniform hash (this one has 1); the weak one before had 8
            // distinct values in all.
            assert!(halves.len() >= 65_530, "proto {proto}: {}", halves.len());
        }
    }

    #[test]
    fn two_live_flows_with_the_same_kernel_id_are_two_flows() {
        // The kernel's 32-bit ids are hashes: among 100,000 live flows two
        // share one about once.
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        let a = tcp_flow(20, &[S::SYN_RECV, S::FIN_WAIT]);
        let mut b = tcp_flow(20, &[S::SYN_RECV, S::FIN_WAIT]);
        for e in &mut b {
            e.orig.as_mut().unwrap().src_port = Some(40001);
            e.reply.as_mut().unwrap().dst_port = Some(40001);
        }
        // Interleaved: both NEWs before either flow goes on.
        let events = [&a[0], &b[0], &a[1], &b[1], &a[2], &b[2], &a[3], &b[3]];
        let events: Vec<CtEvent> = events.into_iter().copied().collect();
        run.feed(&mut t, &events);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 2);
        assert_eq!(s.count(Series::FinLatency), 2);
        assert_eq!(t.flows(), 0);
    }

    #[test]
    fn an_overrun_leaves_open_flows_unmeasured_but_not_later_ones() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        // Started before the overrun's report, which came after its NEW.
        let flow = tcp_flow(14, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &flow[..1]);
        run.overrun(&mut t, T0 + 3 * MS / 2);
        run.feed(&mut t, &flow[1..]);
        run.drained(&mut t, T0 + 2 * MS);
        // Started after it; seen-reply before the next overrun, FIN after it.
        let flow2 = tcp_flow_from(T0 + 10 * MS, 15, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &flow2[..2]);
        run.overrun(&mut t, T0 + 27 * MS / 2);
        run.feed(&mut t, &flow2[2..]);
        run.drained(&mut t, T0 + 14 * MS);
        let flow3 = tcp_flow_from(T0 + 20 * MS, 16, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &flow3);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 2, "flows 15 and 16");
        assert_eq!(s.count(Series::FinLatency), 1, "flow 16");
        assert_eq!(s.count(Series::Duration), 3, "DESTROY data is always whole");
    }

    /// After an overrun's report the kernel drops events without another
    /// report until the socket is drained: a flow that starts then and loses
    /// its reply UPDATE must not be measured from its FIN_WAIT.
    #[test]
    fn events_dropped_unreported_after_an_overrun_are_not_taken_for_a_milestone() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        use TcpState as S;
        // The report; then a flow starts; its SYN_RECV (the reply) is
        // dropped unreported; its FIN_WAIT, which shows the reply too,
        // arrives; then the reader finds the socket drained.
        run.overrun(&mut t, T0);
        let flow = tcp_flow_from(T0 + 10 * MS, 30, &[S::SYN_RECV, S::FIN_WAIT]);
        assert_eq!(flow[1].tcp_state, Some(S::SYN_RECV));
        run.feed(&mut t, &flow[..1]);
        run.feed(&mut t, &flow[2..3]);
        run.drained(&mut t, T0 + 20 * MS);
        run.feed(&mut t, &flow[3..]);
        let s = run.snap();
        assert_eq!(
            s.count(Series::SeenReplyLatency),
            0,
            "taken from its FIN_WAIT"
        );
        assert_eq!(s.count(Series::FinLatency), 0);
        assert_eq!(s.count(Series::Duration), 1, "DESTROY data is whole");
        // A flow that starts after the drain is measured again.
        let later = tcp_flow_from(T0 + 30 * MS, 31, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &later);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
        assert_eq!(s.count(Series::FinLatency), 1);
        // A malformed or truncated message is a loss too: a flow started
        // before it is not measured from later events.
        let flow = tcp_flow_from(T0 + 40 * MS, 32, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &flow[..1]);
        {
            let mut w = run.shards.writer(0).unwrap();
            t.lost(T0 + 41 * MS, &mut w);
        }
        run.feed(&mut t, &flow[2..]);
        assert_eq!(
            run.snap().count(Series::SeenReplyLatency),
            1,
            "flow 32 not measured"
        );
    }

    #[test]
    fn a_full_table_evicts_the_oldest_and_counts_it() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 4);
        use TcpState as S;
        // Ten flows answered, none ended yet, in a table for 4.
        for id in 0..10u32 {
            let start = T0 + u64::from(id) * 10 * MS;
            run.feed(&mut t, &tcp_flow_from(start, id, &[S::SYN_RECV])[..2]);
        }
        assert_eq!(t.flows(), 4);
        assert_eq!(t.capacity(), 4);
        assert_eq!(run.snap().counter(Counter::FlowsEvicted), 6);
        // An evicted flow goes on: its next UPDATE finds no entry and would
        // be taken for its first reply. It is not measured.
        let evicted = tcp_flow_from(T0, 0, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &evicted[2..]);
        // A flow still in the table is.
        let kept = tcp_flow_from(T0 + 90 * MS, 9, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &kept[2..]);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
        assert_eq!(s.sum(Series::SeenReplyLatency), (2 * MS) as f64);
        assert_eq!(s.count(Series::FinLatency), 1);
        assert_eq!(s.count(Series::Duration), 2);
    }

    #[test]
    fn milestones_before_the_start_are_order_errors() {
        let run = Run::new();
        let mut t = FlowTracker::new(filter(), 16);
        let mut flow = tcp_flow(17, &[TcpState::SYN_RECV, TcpState::FIN_WAIT]);
        // A start stamped after the reply (clock stepped between events).
        let last = flow.len() - 1;
        flow[last].timestamp = Some(Timestamp {
            start: Some(T0 + 10 * MS),
            stop: Some(T0 + 20 * MS),
        });
        run.feed(&mut t, &flow);
        let s = run.snap();
        assert_eq!(s.counter(Counter::EventsOrderErrors), 2);
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        assert_eq!(s.count(Series::Duration), 1);
    }

    /// The kernel captures, replayed: every complete flow is measured once.
    #[test]
    fn captures_replayed_give_one_observation_per_flow() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let cases = [
            // (capture, flows with seen-reply, with FIN, durations, outcome
            // series and its counts: answered, refused, unanswered, reset)
            (
                "tcp_dnat_ab.bin",
                61,
                61,
                61,
                Series::FlowsTcp,
                [61, 0, 0, 0],
            ),
            (
                "udp_dnat_vip53.bin",
                99,
                0,
                99,
                Series::FlowsUdp,
                [99, 0, 0, 0],
            ),
            (
                "tcp_dnat_refused.bin",
                0,
                0,
                20,
                Series::FlowsTcp,
                [0, 20, 0, 0],
            ),
            (
                "udp_unreplied_sink.bin",
                0,
                0,
                0,
                Series::FlowsUdp,
                [0, 0, 0, 0],
            ),
        ];
        // With --live-latency too: observed at other events, as often.
        for ((file, seen_reply, fin, durations, outcomes, counts), live) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let run = Run::new();
            let services = ServiceFilter::new(vec!["10.96.0.0/16".parse().unwrap()], vec![]);
            let mut t = FlowTracker::new(services, 1024);
            if live {
                t = t.with_live_latency(1024);
            }
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let events: Vec<CtEvent> = capture::records(&bytes)
                .map(|r| CtEvent::parse(r.unwrap()).unwrap())
                .collect();
            run.feed(&mut t, &events);
            let s = run.snap();
            assert_eq!(s.count(Series::SeenReplyLatency), seen_reply, "{file}");
            assert_eq!(s.count(Series::FinLatency), fin, "{file}");
            assert_eq!(s.count(Series::Duration), durations, "{file}");
            assert_eq!(s.count(Series::BytesToService), durations, "{file}");
            assert_eq!(s.buckets(outcomes), counts, "{file}: outcomes");
            assert_eq!(s.count(outcomes), durations, "{file}: one outcome a flow");
            assert_eq!(s.counter(Counter::EventsOrderErrors), 0, "{file}");
            assert_eq!(t.flows(), 0, "{file}: every flow ended");
            assert_eq!(t.unanswered(), 0, "{file}: every flow ended");
        }
    }

    /// Every kernel capture replayed twice, with all its events and with
    /// only those [`tracker_may_use`] keeps (what the socket filter passes by
    /// default): the same observations, value for value.
    #[test]
    fn the_events_the_filter_drops_change_no_observation() {
        for live in [false, true] {
            filtered_and_unfiltered_agree(live);
        }
    }

    /// [`the_events_the_filter_drops_change_no_observation`], with or
    /// without `--live-latency` (whose filter also passes every NEW).
    fn filtered_and_unfiltered_agree(live: bool) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut dropped = 0;
        for file in [
            "tcp_dnat_ab.bin",
            "tcp_dnat_ab_load_midstream.bin",
            "tcp_dnat_refused.bin",
            "udp_dnat_dns_load_midstream.bin",
            "udp_dnat_vip53.bin",
            "udp_unreplied_sink.bin",
        ] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let events: Vec<CtEvent> = capture::records(&bytes)
                .map(|r| CtEvent::parse(r.unwrap()).unwrap())
                .collect();
            let used: Vec<CtEvent> = events
                .iter()
                .copied()
                .filter(|e| tracker_may_use_with(e, live))
                .collect();
            dropped += events.len() - used.len();
            // A capture that starts mid-traffic: flows started before its
            // first event are not whole, as after a late subscription.
            let first = events.iter().find_map(|e| e.timestamp_event).unwrap();
            let snaps = [&events, &used].map(|events| {
                let run = Run::new();
                let services = ServiceFilter::new(vec!["10.96.0.0/16".parse().unwrap()], vec![]);
                let mut t = FlowTracker::for_reader(
                    services,
                    1 << 16,
                    ReaderShare::ALL,
                    KernelFiltered::default(),
                    first,
                );
                if live {
                    t = t.with_live_latency(1 << 14);
                }
                run.feed(&mut t, events);
                (run.snap(), t.flows())
            });
            let [(a, a_flows), (b, b_flows)] = &snaps;
            for series in Series::ALL {
                assert_eq!(a.buckets(series), b.buckets(series), "{file} {series:?}");
                assert_eq!(a.sum(series), b.sum(series), "{file} {series:?}");
            }
            for counter in Counter::ALL {
                assert_eq!(a.counter(counter), b.counter(counter), "{file} {counter:?}");
            }
            assert_eq!(a_flows, b_flows, "{file}");
        }
        // The NEWs before the reply (not with live), and the UPDATEs after
        // ASSURED in an open state (ESTABLISHED).
        assert!(dropped > if live { 100 } else { 600 }, "{live}: {dropped}");
    }

    fn live_tracker(flows: usize, unanswered: usize) -> FlowTracker {
        FlowTracker::new(filter(), flows).with_live_latency(unanswered)
    }

    #[test]
    fn live_latencies_are_observed_at_the_reply_and_the_fin_and_once() {
        use TcpState as S;
        let run = Run::new();
        let mut t = live_tracker(16, 16);
        let events = tcp_flow(1, &[S::SYN_RECV, S::ESTABLISHED, S::FIN_WAIT, S::TIME_WAIT]);
        // NEW at T0+1ms, SYN_RECV at T0+2ms: 1 ms from the NEW, at once.
        run.feed(&mut t, &events[..2]);
        let s = run.snap();
        assert_eq!(
            (
                s.count(Series::SeenReplyLatency),
                s.sum(Series::SeenReplyLatency)
            ),
            (1, MS as f64)
        );
        assert_eq!(
            (s.count(Series::FinLatency), s.count(Series::Duration)),
            (0, 0)
        );
        assert_eq!((t.flows(), t.unanswered()), (1, 0));
        // FIN_WAIT at T0+4ms: 3 ms from the NEW, at once.
        run.feed(&mut t, &events[2..4]);
        let s = run.snap();
        assert_eq!(
            (s.count(Series::FinLatency), s.sum(Series::FinLatency)),
            (1, (3 * MS) as f64)
        );
        // The DESTROY: duration, bytes, throughput (over the same 3 ms), and
        // no latency again.
        run.feed(&mut t, &events[4..]);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
        assert_eq!(s.count(Series::FinLatency), 1);
        assert_eq!(s.count(Series::Duration), 1);
        // 346 bytes in 3 ms, in thousandths of a byte per second.
        assert_eq!(s.sum(Series::FinThroughputToService), 115_333_333.0);
        assert_eq!(s.counter(Counter::EventsOrderErrors), 0);
        assert_eq!((t.flows(), t.unanswered()), (0, 0));
    }

    #[test]
    fn a_flow_whose_new_was_not_taken_is_observed_at_its_destroy() {
        use TcpState as S;
        let run = Run::new();
        let mut t = live_tracker(16, 16);
        let events = tcp_flow(1, &[S::SYN_RECV, S::ESTABLISHED, S::FIN_WAIT]);
        run.feed(&mut t, &events[1..]);
        let s = run.snap();
        // As without the flag: from the kernel's start stamp, T0.
        assert_eq!(s.sum(Series::SeenReplyLatency), (2 * MS) as f64);
        assert_eq!(s.sum(Series::FinLatency), (4 * MS) as f64);
        assert_eq!(s.count(Series::SeenReplyLatency), 1);
    }

    #[test]
    fn an_overrun_between_the_new_and_the_reply_leaves_the_flow_unmeasured() {
        use TcpState as S;
        let run = Run::new();
        let mut t = live_tracker(16, 16);
        let events = tcp_flow(1, &[S::SYN_RECV, S::FIN_WAIT]);
        run.feed(&mut t, &events[..1]);
        run.overrun(&mut t, T0 + MS + MS / 2);
        run.drained(&mut t, T0 + MS + MS / 2);
        run.feed(&mut t, &events[1..]);
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 0);
        assert_eq!(s.count(Series::FinLatency), 0);
        assert_eq!(s.count(Series::Duration), 1);
    }

    #[test]
    fn unanswered_flows_evict_only_their_own_kind_and_are_counted_awaiting() {
        use TcpState as S;
        let run = Run::new();
        let mut t = live_tracker(16, 4);
        // Three answered flows, open.
        let answered: Vec<Vec<CtEvent>> = (1..=3)
            .map(|id| tcp_flow(id, &[S::SYN_RECV, S::ESTABLISHED]))
            .collect();
        for flow in &answered {
            run.feed(&mut t, &flow[..3]);
        }
        assert_eq!((t.flows(), t.unanswered()), (3, 0));
        // A flood of 100 SYNs never answered, from T0 + 10 ms on, 1 ms apart.
        let syns: Vec<CtEvent> = (0..100)
            .map(|i| {
                let mut e = ev(
                    EventKind::New,
                    1000 + i,
                    6,
                    Some(S::SYN_SENT),
                    NAT,
                    T0 + (10 + u64::from(i)) * MS,
                );
                e.orig.as_mut().unwrap().src_port = Some(50_000 + i as u16);
                e
            })
            .collect();
        run.feed(&mut t, &syns);
        let s = run.snap();
        assert_eq!(s.counter(Counter::UnansweredDropped), 96);
        assert_eq!((t.flows(), t.unanswered()), (3, 4));
        // The newest four are kept; none is a second old until T0 + 1.106 s.
        assert_eq!(run.awaiting(&mut t, T0 + 1_105 * MS), 0);
        assert_eq!(run.awaiting(&mut t, T0 + 1_107 * MS), 2);
        assert_eq!(run.awaiting(&mut t, T0 + 5_000 * MS), 4);
        // The answered flows end measured: their latencies were observed at
        // their replies, and nothing was evicted from their table.
        for flow in &answered {
            run.feed(&mut t, &flow[3..]);
        }
        let s = run.snap();
        assert_eq!(s.count(Series::SeenReplyLatency), 3);
        assert_eq!(s.count(Series::Duration), 3);
        assert_eq!(s.counter(Counter::FlowsEvicted), 0);
        // A DESTROY of an unanswered flow takes it out of the count.
        let mut gone = syns[99];
        gone.kind = EventKind::Destroy;
        gone.timestamp = Some(Timestamp {
            start: Some(T0 + 109 * MS),
            stop: Some(T0 + 2_000 * MS),
        });
        run.feed(&mut t, &[gone]);
        assert_eq!(t.unanswered(), 3);
        assert_eq!(run.awaiting(&mut t, T0 + 5_000 * MS), 3);
    }

    /// An unanswered NEW to Service `vip`:80 from source port `port`, at `at`.
    fn syn_to(vip: &str, id: u32, port: u16, at: u64) -> CtEvent {
        let mut e = ev(EventKind::New, id, 6, Some(TcpState::SYN_SENT), NAT, at);
        let orig = e.orig.as_mut().unwrap();
        orig.dst = Some(ip(vip));
        orig.src_port = Some(port);
        e
    }

    #[test]
    fn with_service_labels_flows_awaiting_a_reply_are_counted_per_service() {
        use crate::flow::services::{label_overflow_blocks, OVERFLOW};
        use crate::stats::BlockLabels;
        const MIN: u64 = 60_000 * MS;
        let (a, b, c) = ("10.96.1.1", "10.96.1.2", "10.96.1.3");
        let key = |vip: &str| {
            BlockLabels::Key(
                ServiceKey {
                    addr: ip(vip),
                    port: 80,
                    proto: TCP,
                }
                .series_key(),
            )
        };
        // Two Services get slots; the third's flows go to the overflow.
        let mut t = live_tracker(64, 64).with_services(ServiceBudget {
            max_services: 2,
            idle_ns: MIN,
        });
        let run = Run {
            shards: ShardSet::with_blocks(1, SummaryWindow::from_minutes(10), t.blocks()),
        };
        label_overflow_blocks(&run.shards);
        let gauges = |run: &Run| -> Vec<(BlockLabels, u64)> {
            let snap = run.snap();
            snap.blocks()
                .iter()
                .map(|blk| (blk.labels(), blk.gauge(BlockGauge::AwaitingReply)))
                .collect()
        };
        // A 3 flows, B 1, C 2, all at T0; and a flow to A answered.
        let mut syns = Vec::new();
        for (i, vip) in [a, a, a, b, c, c].into_iter().enumerate() {
            syns.push(syn_to(vip, 100 + i as u32, 50_000 + i as u16, T0));
        }
        run.feed(&mut t, &syns);
        let answered = tcp_flow(1, &[TcpState::SYN_RECV, TcpState::ESTABLISHED]);
        run.feed(&mut t, &answered[..3]);
        assert_eq!(run.awaiting(&mut t, T0 + 500 * MS), 0, "none a second old");
        assert_eq!(run.awaiting(&mut t, T0 + 2_000 * MS), 6);
        let mut want = vec![(BlockLabels::Key(OVERFLOW), 2), (key(a), 3), (key(b), 1)];
        want.sort();
        assert_eq!(gauges(&run), want);
        // The NEWs' overflow is not counted: only a DESTROY counts a flow
        // over the budget, once.
        assert_eq!(run.snap().counter(Counter::ServiceBudgetOverflow), 0);
        // Minutes pass with the flows still waiting (the reader drains its
        // socket now and then): B and A are not idle, they keep their slots.
        for minute in 1..=3 {
            run.drained(&mut t, T0 + minute * MIN);
        }
        assert_eq!(gauges(&run), want, "the slots were kept");
        // B's flow ends unanswered; A's answered flow too. B's gauge falls
        // to 0 at the next count, and its slot goes a minute after.
        let mut gone = syns[3];
        gone.kind = EventKind::Destroy;
        gone.timestamp = Some(Timestamp {
            start: Some(T0),
            stop: Some(T0 + 3 * MIN),
        });
        run.feed(&mut t, &[gone]);
        run.feed(&mut t, &answered[3..]);
        run.drained(&mut t, T0 + 3 * MIN + 500 * MS);
        want = vec![(BlockLabels::Key(OVERFLOW), 2), (key(a), 3), (key(b), 0)];
        want.sort();
        assert_eq!(gauges(&run), want);
        run.drained(&mut t, T0 + 4 * MIN + MS);
        want.retain(|(labels, _)| *labels != key(b));
        assert_eq!(gauges(&run), want, "B idle: its slot given back");
        // A's flows are answered at last: A's gauge falls to 0, and the
        // latencies go to A's block.
        let replies: Vec<CtEvent> = syns[..3]
            .iter()
            .map(|syn| {
                let mut e = *syn;
                e.kind = EventKind::Update;
                e.status = Some(Status(REPLIED));
                e.tcp_state = Some(TcpState::SYN_RECV);
                e.timestamp_event = Some(T0 + 4 * MIN + 2 * MS);
                e
            })
            .collect();
        run.feed(&mut t, &replies);
        run.drained(&mut t, T0 + 4 * MIN + 500 * MS);
        want = vec![(BlockLabels::Key(OVERFLOW), 2), (key(a), 0)];
        want.sort();
        assert_eq!(gauges(&run), want);
        let snap = run.snap();
        let a_block = snap.blocks().iter().find(|blk| blk.labels() == key(a));
        assert_eq!(a_block.unwrap().count(Series::SeenReplyLatency), 4);
    }

    #[test]
    fn readers_split_flows_by_id_and_count_what_the_kernel_should_have_dropped() {
        use TcpState as S;
        let flows: Vec<Vec<CtEvent>> = (20..30)
            .map(|id| {
                tcp_flow(
                    id,
                    &[S::SYN_RECV, S::ESTABLISHED, S::FIN_WAIT, S::TIME_WAIT],
                )
            })
            .collect();
        let all: Vec<CtEvent> = flows.concat();
        let shares = [0, 1].map(|index| ReaderShare::new(index, 2).unwrap());
        let filtered = KernelFiltered {
            non_service: true,
            other_shares: true,
        };
        // Each reader given only its share (as its kernel filter would):
        // together they measure what one reader measures, with no misses.
        let one = Run::new();
        one.feed(&mut FlowTracker::new(filter(), 64), &all);
        let (a, b) = (Run::new(), Run::new());
        for (share, run) in shares.iter().zip([&a, &b]) {
            let mine: Vec<CtEvent> = all.iter().filter(|e| share.owns(e.id)).copied().collect();
            assert_eq!(mine.len(), all.len() / 2, "ids 20..30 split evenly");
            run.feed(
                &mut FlowTracker::for_reader(filter(), 64, *share, filtered, 0),
                &mine,
            );
        }
        let (s1, sa, sb) = (one.snap(), a.snap(), b.snap());
        for series in [
            Series::SeenReplyLatency,
            Series::FinLatency,
            Series::Duration,
        ] {
            assert_eq!(s1.count(series), 10);
            assert_eq!(sa.count(series) + sb.count(series), 10, "{series:?}");
            assert_eq!(
                sa.sum(series) + sb.sum(series),
                s1.sum(series),
                "{series:?}"
            );
        }
        assert_eq!(sa.counter(Counter::KernelFilterMisses), 0);

        // A reader given everything measures only its share and counts the
        // other share's events as misses (its kernel filter let them pass).
        let c = Run::new();
        c.feed(
            &mut FlowTracker::for_reader(filter(), 64, shares[0], filtered, 0),
            &all,
        );
        let sc = c.snap();
        assert_eq!(sc.count(Series::Duration), 5);
        assert_eq!(
            sc.counter(Counter::KernelFilterMisses),
            (all.len() / 2) as u64
        );

        // A non-Service event is a miss only behind a Service filter.
        let mut outside = tcp_flow(40, &[S::SYN_RECV]);
        for e in &mut outside {
            if let Some(t) = e.orig.as_mut() {
                t.dst = Some("10.96.0.5".parse().unwrap()); // excluded /24
            }
        }
        let d = Run::new();
        d.feed(
            &mut FlowTracker::for_reader(filter(), 64, ReaderShare::ALL, filtered, 0),
            &outside,
        );
        assert_eq!(
            d.snap().counter(Counter::KernelFilterMisses),
            outside.len() as u64
        );
        let e = Run::new();
        e.feed(&mut FlowTracker::new(filter(), 64), &outside);
        assert_eq!(e.snap().counter(Counter::KernelFilterMisses), 0);
        assert_eq!(e.snap().count(Series::Duration), 0);
    }
}
