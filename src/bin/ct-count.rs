//! ct-count: the floor reader of the overhead benchmark (`loadtest/overhead`).
//!
//! It subscribes to the conntrack NEW/UPDATE/DESTROY groups exactly as the
//! exporter does (same [`ConntrackSocket`], same default receive-buffer
//! request, same `recvmmsg` batch of 64 one-page slots, same non-blocking
//! drain-until-`WouldBlock` loop woken by mio) but parses nothing: it only
//! counts the datagrams received and the ENOBUFS overruns. Its CPU time per
//! event is the floor no exporter on this socket setup can beat, and with zero
//! overruns its count is the ground truth for the event count.
//!
//! Usage: `ct-count [DRAIN_DELAY_US] [--service-filter SUBNETS]`. Like the
//! exporter's `--drain-delay-us` (and with the same default), it waits that
//! long after the socket becomes readable before draining it; 0 reads at
//! once. (It parses nothing, so it cannot check for kernel event stamps as
//! the exporter does: it always waits.)
//!
//! With `--service-filter` (comma-separated prefixes, as `--svc-subnet`) it
//! attaches the exporter's default socket filter for those subnets: only the
//! Service flows' events the tracker may use arrive. That is the floor for
//! the exporter's userspace work on the very events it receives; without
//! the flag, the floor reads every event, the ground truth for the count.
//!
//! On SIGTERM or SIGINT it prints one line `datagrams=N overruns=M` on stdout
//! and exits 0. Needs root or `CAP_NET_ADMIN` in the network namespace.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use conntrack_metrics::config::{DEFAULT_DRAIN_DELAY_US, DEFAULT_RCVBUF_BYTES};
use conntrack_metrics::flow::Subnet;
use conntrack_metrics::offload::bpf::{service_event_filter, FlowEvents};
use conntrack_metrics::reader::SLOT_BYTES;
use conntrack_metrics::sys::signal;
use conntrack_metrics::sys::{ConntrackSocket, EventGroups, RecvBatch, RecvError};

/// Datagrams per `recvmmsg` call: the exporter's default `--recv-batch`.
const BATCH: usize = 64;
const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);

fn main() -> ExitCode {
    // Before any thread starts, so only the signal thread takes the signals.
    if let Err(e) = signal::block_stop_signals() {
        let _ = writeln!(io::stderr(), "ct-count: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    let (delay_us, services) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(why) => {
            let _ = writeln!(
                io::stderr(),
                "ct-count: {why}\nusage: ct-count [DRAIN_DELAY_US (0..=100000)] \
                 [--service-filter PREFIX[,PREFIX...]]"
            );
            return ExitCode::from(2);
        }
    };
    match run(std::time::Duration::from_micros(delay_us), &services) {
        Ok((datagrams, overruns)) => {
            let _ = writeln!(io::stdout(), "datagrams={datagrams} overruns={overruns}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(io::stderr(), "ct-count: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The drain delay and the `--service-filter` subnets (none: no filter).
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(u64, Vec<Subnet>), String> {
    let (mut delay_us, mut services) = (None, Vec::new());
    while let Some(arg) = args.next() {
        if arg == "--service-filter" {
            let list = args.next().ok_or("--service-filter needs a value")?;
            for prefix in list.split(',') {
                services.push(
                    prefix
                        .parse::<Subnet>()
                        .map_err(|e| format!("--service-filter: {e}"))?,
                );
            }
        } else if delay_us.is_none() {
            let us = arg
                .parse::<u64>()
                .ok()
                .filter(|&us| us <= 100_000)
                .ok_or_else(|| format!("not a drain delay of 0 to 100000 µs: '{arg}'"))?;
            delay_us = Some(us);
        } else {
            return Err(format!("unexpected argument '{arg}'"));
        }
    }
    Ok((delay_us.unwrap_or(DEFAULT_DRAIN_DELAY_US), services))
}

/// Counts until a stop signal; returns (datagrams, overruns).
fn run(drain_delay: std::time::Duration, services: &[Subnet]) -> io::Result<(u64, u64)> {
    let socket = ConntrackSocket::open(EventGroups::ALL, DEFAULT_RCVBUF_BYTES)?;
    if !services.is_empty() {
        let program = service_event_filter(services, &[], None, FlowEvents::Used)
            .map_err(|e| io::Error::other(e.to_string()))?;
        socket.attach_filter(&program)?;
    }
    let _ = writeln!(
        io::stderr(),
        "ct-count: subscribed, receive buffer {} bytes",
        socket.granted_rcvbuf()
    );
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (waker, stopping) = (Arc::clone(&waker), Arc::clone(&stopping));
        std::thread::Builder::new()
            .name("ct-signals".into())
            .spawn(move || {
                let _ = signal::wait_for_signal();
                stopping.store(true, Ordering::Release);
                let _ = waker.wake();
            })?;
    }
    let fd = socket.as_raw_fd();
    poll.registry()
        .register(&mut SourceFd(&fd), SOCKET, Interest::READABLE)?;
    let mut events = Events::with_capacity(4);
    let mut batch = RecvBatch::new(BATCH, SLOT_BYTES);
    let (mut datagrams, mut overruns) = (0u64, 0u64);
    loop {
        match batch.recv(&socket) {
            Ok(n) => datagrams += n as u64,
            Err(RecvError::Overrun) => overruns += 1,
            Err(RecvError::WouldBlock) => loop {
                // Drained: wait until readable or stopped.
                if stopping.load(Ordering::Acquire) {
                    return Ok((datagrams, overruns));
                }
                match poll.poll(&mut events, None) {
                    Ok(()) => {
                        if !drain_delay.is_zero() {
                            std::thread::sleep(drain_delay);
                        }
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            },
            Err(RecvError::Io(e)) => return Err(e),
        }
    }
}
