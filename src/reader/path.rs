//! The per-event path: what a reader does with each datagram it received,
//! and once per batch around them.
//!
//! Owns: the reused event slot, the reader's flow tracker and statistics
//! shard, and its self-metric handles (made once, here).
//! Never: allocates, locks, logs or makes a syscall per event or per batch
//! (a clock read is a vDSO call). `--print-events` is the exception: a
//! debugging mode that writes each event to stdout.

use std::io::{self, Write};
use std::time::Instant;

pub use crate::flow::wall_clock_ns;
use crate::flow::{FlowTracker, LiveFlows};
use crate::stats::self_metrics::{FLOW_TABLE_CAPACITY, FLOW_TABLE_FLOWS, READER_DATAGRAMS};
use crate::stats::{Counter, Series, ShardWriter};
use crate::wire::{CtEvent, Datagram, EventKind, Message};

/// One reader's per-event state; [`Self::datagram`] is the function the
/// reader thread calls for every datagram, between [`Self::begin_batch`]
/// and [`Self::end_batch`].
pub struct EventPath<'a> {
    event: CtEvent,
    shard: ShardWriter<'a>,
    tracker: FlowTracker,
    datagrams: metrics::Counter,
    flows: metrics::Gauge,
    print: Option<io::Stdout>,
    #[cfg(debug_assertions)]
    ignore_stamps: bool,
}

/// Whether the readers drop the kernel's event stamps (`CTA_TIMESTAMP_EVENT`),
/// as on kernels before 6.14, so that the receive-time path runs end to end
/// on a newer kernel too: `CONNTRACK_METRICS_IGNORE_EVENT_STAMPS=1`, in test
/// (debug) builds only. Always false in a release build.
pub fn ignores_event_stamps() -> bool {
    cfg!(debug_assertions)
        && std::env::var("CONNTRACK_METRICS_IGNORE_EVENT_STAMPS").as_deref() == Ok("1")
}

impl<'a> EventPath<'a> {
    /// The path of reader `index`, recording into `shard` and tracking flows
    /// with `tracker`; `print_events` writes every event to stdout. Makes
    /// the reader's self-metric handles through the `metrics` facade.
    pub fn new(
        index: usize,
        shard: ShardWriter<'a>,
        tracker: FlowTracker,
        print_events: bool,
    ) -> EventPath<'a> {
        let reader = index.to_string();
        metrics::gauge!(FLOW_TABLE_CAPACITY, "reader" => reader.clone())
            .set(tracker.capacity() as f64);
        EventPath {
            event: CtEvent::empty(EventKind::New, 0),
            shard,
            tracker,
            datagrams: metrics::counter!(READER_DATAGRAMS, "reader" => reader.clone()),
            flows: metrics::gauge!(FLOW_TABLE_FLOWS, "reader" => reader),
            print: print_events.then(io::stdout),
            #[cfg(debug_assertions)]
            ignore_stamps: ignores_event_stamps(),
        }
    }

    /// Once per received batch of `datagrams`: one clock read each (vDSO, no
    /// syscall) for the summaries' window and for events the kernel did not
    /// stamp, the batch size, the datagram count. Returns the wall-clock
    /// receive time in nanoseconds.
    #[inline]
    pub fn begin_batch(&mut self, datagrams: usize) -> u64 {
        self.shard.set_time(Instant::now());
        self.shard.observe(Series::ReaderBatch, datagrams as u64);
        self.datagrams.increment(datagrams as u64);
        wall_clock_ns()
    }

    /// One received datagram: every message parsed into the reused slot,
    /// counted, and given to the flow tracker; malformed ones counted and
    /// skipped. A datagram cut short by its slot is counted, not parsed.
    /// The tracker may queue table steps: [`Self::end_batch`] takes the
    /// rest. Fails only when `--print-events` cannot write.
    #[inline]
    pub fn datagram(&mut self, bytes: &[u8], truncated: bool, received_ns: u64) -> io::Result<()> {
        if truncated {
            // Its events are lost, of flows unknown.
            self.shard.count(Counter::TruncatedDatagrams, 1);
            self.tracker.lost(received_ns, &mut self.shard);
            return Ok(());
        }
        let mut walk = Datagram::new(bytes);
        while let Some(message) = walk.next_into(&mut self.event) {
            match message {
                Ok(Message::Event(())) => {
                    #[cfg(debug_assertions)]
                    if self.ignore_stamps {
                        self.event.timestamp_event = None;
                    }
                    let counter = match self.event.kind {
                        EventKind::New => Counter::EventsNew,
                        EventKind::Update => Counter::EventsUpdate,
                        EventKind::Destroy => Counter::EventsDestroy,
                    };
                    self.shard.count(counter, 1);
                    self.tracker
                        .event(&self.event, received_ns, &mut self.shard);
                    if let Some(out) = self.print.as_mut() {
                        writeln!(out, "{}", self.event)?;
                    }
                }
                Ok(Message::Overrun) => self.overrun(),
                Ok(_) => {}
                Err(e) => {
                    self.shard.count(Counter::MalformedMessages, 1);
                    self.tracker.lost(received_ns, &mut self.shard);
                    if let Some(out) = self.print.as_mut() {
                        writeln!(out, "[MALFORMED] {e}")?;
                    }
                }
            }
        }
        Ok(())
    }

    /// After each batch: the table steps still queued, then the flow-table
    /// gauge (an atomic store through the handle made in [`Self::new`]).
    #[inline]
    pub fn end_batch(&mut self) -> io::Result<()> {
        self.tracker.flush(&mut self.shard);
        self.flows.set(self.tracker.flows() as f64);
        match self.print.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }

    /// The kernel dropped events for this reader (`ENOBUFS`, or an overrun
    /// message): counted, and no flow open before now is measured.
    pub fn overrun(&mut self) {
        self.shard.count(Counter::NetlinkOverruns, 1);
        self.tracker.overrun(wall_clock_ns(), &mut self.shard);
    }

    /// The reader found its socket drained: after an overrun, the kernel
    /// stops dropping events unreported only now. With `--live-latency`, the
    /// flows awaiting a reply are counted into the shard's blocks here (at
    /// most four times a second).
    pub fn drained(&mut self) {
        self.tracker.drained(wall_clock_ns(), &mut self.shard);
    }

    /// Reconciles up to `slots` flow-table slots from `from` with `live`
    /// (see [`FlowTracker::reconcile`]); the slot to go on from, if any.
    /// Between batches, never per event.
    pub fn reconcile(&mut self, live: &LiveFlows, from: usize, slots: usize) -> Option<usize> {
        let next = self.tracker.reconcile(live, from, slots, &mut self.shard);
        self.flows.set(self.tracker.flows() as f64);
        next
    }

    /// Whether the last event carried the kernel's stamp
    /// (`CTA_TIMESTAMP_EVENT`): then waiting before a drain adds nothing to
    /// any latency.
    pub fn stamped(&self) -> bool {
        self.event.timestamp_event.is_some()
    }

    /// The flow tracker.
    pub fn tracker(&self) -> &FlowTracker {
        &self.tracker
    }
}
