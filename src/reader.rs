//! The reader thread's loop: one batched receive, then every event of the
//! batch through parse, flow tracking and record.
//!
//! Owns: the per-event path. Each event is parsed into one reused slot,
//! counted in the reader's own stats shard, and given to the flow tracker.
//! Never: allocates, locks, logs or makes a syscall per event; the one
//! syscall is the batched receive. (`--print-events` is the exception, a
//! debugging mode that writes each event to stdout.)

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::Gauge;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::flow::FlowTracker;

use crate::stats::{Counter, Series, ShardWriter};
use crate::sys::{ConntrackSocket, RecvBatch, RecvError};
use crate::wire::{CtEvent, Datagram, EventKind, Message};

/// Gauge of the flows in each reader's flow table (the `metrics` facade,
/// label `reader`).
pub const FLOW_TABLE_FLOWS: &str = "conntrack_monitoring_flow_table_flows";
/// Gauge of each reader's flow-table capacity (`--max-flows` / `--readers`).
pub const FLOW_TABLE_CAPACITY: &str = "conntrack_monitoring_flow_table_capacity";
/// Counter of the datagrams each reader received (label `reader`).
pub const READER_DATAGRAMS: &str = "conntrack_monitoring_reader_datagrams_total";

/// Bytes per receive slot: one page; the kernel never sends a conntrack
/// event larger than that, and a longer datagram is counted as truncated.
pub const SLOT_BYTES: usize = 4096;

/// The poll token of the netlink socket.
pub const SOCKET: Token = Token(0);
/// The poll token of the waker that stops the reader.
pub const WAKE: Token = Token(1);

/// What distinguishes one reader from another.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReaderOptions {
    /// The reader's number (its `reader` label).
    pub index: usize,
    /// `--drain-delay-us`: once the socket is readable, wait this long before
    /// draining it, so events gather into full batches and the reader wakes
    /// less often. Applied only while the kernel stamps its events
    /// (`CTA_TIMESTAMP_EVENT`): without stamps the receive time is the
    /// event's time, and waiting would add to every latency.
    pub drain_delay: Duration,
}

/// At most one log line about overruns per this interval.
const OVERRUN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Reads events until `stop` is set (and `poll`'s waker, token [`WAKE`],
/// woken) or an unrecoverable socket error. The socket is drained with
/// non-blocking batched receives until empty, then `poll` waits for it to be
/// readable. `ready` is set once the loop runs; `print` writes every event
/// to `print` when given.
#[allow(clippy::too_many_arguments)]
pub fn run(
    options: ReaderOptions,
    socket: &ConntrackSocket,
    poll: &mut Poll,
    stop: &AtomicBool,
    batch: &mut RecvBatch,
    shard: &mut ShardWriter<'_>,
    flows: &mut FlowTracker,
    ready: &AtomicBool,
    mut print: Option<&mut dyn Write>,
) -> io::Result<()> {
    let index = options.index;
    let mut event = CtEvent::empty(EventKind::New, 0);
    let mut events = Events::with_capacity(4);
    let flows_gauge = metrics::gauge!(FLOW_TABLE_FLOWS, "reader" => index.to_string());
    let datagrams = metrics::counter!(READER_DATAGRAMS, "reader" => index.to_string());
    let fd = socket.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), SOCKET, Interest::READABLE)?;
    let mut overruns_unlogged = 0u64;
    let mut last_overrun_log: Option<Instant> = None;
    ready.store(true, Ordering::Release);
    loop {
        let received = match batch.recv(socket) {
            Ok(n) => n,
            Err(RecvError::Overrun) => {
                // The kernel dropped events for us; reading goes on at once,
                // and no flow that started before now is measured.
                shard.count(Counter::NetlinkOverruns, 1);
                flows.overrun(wall_clock_ns(), shard);
                overruns_unlogged += 1;
                if last_overrun_log.is_none_or(|t| t.elapsed() >= OVERRUN_LOG_EVERY) {
                    let _ = writeln!(
                        io::stderr(),
                        "conntrack-metrics: netlink overrun (ENOBUFS): the kernel dropped \
                         events; {overruns_unlogged} overrun(s) since the last report \
                         (a larger --rcvbuf-bytes, or a pinned --reader-cpu, helps)"
                    );
                    overruns_unlogged = 0;
                    last_overrun_log = Some(Instant::now());
                }
                continue;
            }
            Err(RecvError::WouldBlock) => {
                // Drained: wait until the socket is readable or we are stopped.
                loop {
                    if stop.load(Ordering::Acquire) {
                        ready.store(false, Ordering::Release);
                        return Ok(());
                    }
                    match poll.poll(&mut events, None) {
                        Ok(()) => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                // Readable: let more events gather first (one sleep per
                // wake-up, never per event), if their stamps make it harmless.
                if !options.drain_delay.is_zero()
                    && event.timestamp_event.is_some()
                    && !stop.load(Ordering::Acquire)
                {
                    std::thread::sleep(options.drain_delay);
                }
                continue;
            }
            Err(RecvError::Io(e)) => {
                ready.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let received_ns = begin_batch(shard, received);
        // Atomic adds through handles made once, per batch.
        datagrams.increment(received as u64);
        for datagram in batch.datagrams() {
            handle_datagram(
                datagram.bytes,
                datagram.truncated,
                received_ns,
                &mut event,
                shard,
                flows,
                &mut print,
            )?;
        }
        end_batch(shard, flows, &flows_gauge);
        if let Some(out) = print.as_mut() {
            out.flush()?;
        }
    }
}

/// What the reader does once per received batch of `datagrams`: one clock
/// read each (vDSO, no syscall) for the summaries' window and for events the
/// kernel did not stamp, and the batch size. Returns the wall-clock receive
/// time in nanoseconds.
#[inline]
pub fn begin_batch(shard: &mut ShardWriter<'_>, datagrams: usize) -> u64 {
    shard.set_time(Instant::now());
    shard.observe(Series::ReaderBatch, datagrams as u64);
    wall_clock_ns()
}

/// What the reader does after each batch: the table steps still queued, then
/// the flow-table gauge (an atomic store through a handle made once: no
/// lookup, no allocation).
#[inline]
pub fn end_batch(shard: &mut ShardWriter<'_>, flows: &mut FlowTracker, flows_gauge: &Gauge) {
    flows.flush(shard);
    flows_gauge.set(flows.flows() as f64);
}

/// The wall clock (`CLOCK_REALTIME`, the clock of the kernel's conntrack
/// stamps) in nanoseconds since the epoch; a vDSO read, no syscall.
#[inline]
pub fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What the reader does with one received datagram: every message parsed
/// into `event`, counted, and given to the flow tracker; malformed ones
/// counted and skipped. `print` is the `--print-events` output, if any.
/// The tracker may queue table steps: [`FlowTracker::flush`] after the
/// batch takes the rest.
#[inline]
pub fn handle_datagram(
    bytes: &[u8],
    truncated: bool,
    received_ns: u64,
    event: &mut CtEvent,
    shard: &mut ShardWriter<'_>,
    flows: &mut FlowTracker,
    print: &mut Option<&mut dyn Write>,
) -> io::Result<()> {
    if truncated {
        shard.count(Counter::TruncatedDatagrams, 1);
        return Ok(());
    }
    let mut walk = Datagram::new(bytes);
    while let Some(message) = walk.next_into(event) {
        match message {
            Ok(Message::Event(())) => {
                let counter = match event.kind {
                    EventKind::New => Counter::EventsNew,
                    EventKind::Update => Counter::EventsUpdate,
                    EventKind::Destroy => Counter::EventsDestroy,
                };
                shard.count(counter, 1);
                flows.event(event, received_ns, shard);
                if let Some(out) = print.as_mut() {
                    writeln!(out, "{event}")?;
                }
            }
            Ok(Message::Overrun) => {
                shard.count(Counter::NetlinkOverruns, 1);
                flows.overrun(wall_clock_ns(), shard);
            }
            Ok(_) => {}
            Err(e) => {
                shard.count(Counter::MalformedMessages, 1);
                if let Some(out) = print.as_mut() {
                    writeln!(out, "[MALFORMED] {e}")?;
                }
            }
        }
    }
    Ok(())
}
