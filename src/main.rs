//! conntrack-metrics binary: flags -> [`Config`] -> the reader loop.
//!
//! Today the binary subscribes to the kernel's conntrack events, parses each
//! one and either prints it (`--print-events`) or counts events by type and
//! reports the counts on stderr every 10 seconds. Flow tracking, histograms
//! and the `/metrics` endpoint are the next stages (see README).

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use conntrack_metrics::config::Config;
use conntrack_metrics::sys::{ConntrackSocket, EventGroups, RecvBatch, RecvError};
use conntrack_metrics::wire::{CtEvent, Datagram, EventKind, Message};

/// Bytes per receive slot: one page, as the kernel never sends a conntrack
/// event larger than that.
const SLOT_BYTES: usize = 4096;
const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Default, Debug)]
struct Tally {
    new: u64,
    update: u64,
    destroy: u64,
    malformed: u64,
    truncated: u64,
    overruns: u64,
    other: u64,
}

fn main() -> ExitCode {
    let config = Config::parse();
    let socket = match ConntrackSocket::open(EventGroups::ALL, config.rcvbuf_bytes) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "conntrack-metrics: cannot subscribe to conntrack events: {e} \
                 (needs root or CAP_NET_ADMIN in this network namespace)"
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "conntrack-metrics: subscribed to conntrack NEW/UPDATE/DESTROY, receive buffer {} bytes",
        socket.granted_rcvbuf()
    );
    match run(&socket, &config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("conntrack-metrics: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(socket: &ConntrackSocket, config: &Config) -> io::Result<()> {
    let mut batch = RecvBatch::new(config.recv_batch, SLOT_BYTES);
    let mut tally = Tally::default();
    let mut event = CtEvent::empty(EventKind::New, 0);
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut last_report = Instant::now();
    loop {
        match batch.recv(socket) {
            Ok(_) => {}
            Err(RecvError::Overrun) => {
                tally.overruns += 1;
                eprintln!("conntrack-metrics: ENOBUFS, the kernel dropped events");
                continue;
            }
            Err(RecvError::WouldBlock) => continue,
            Err(RecvError::Io(e)) => return Err(e),
        }
        for received in batch.datagrams() {
            if received.truncated {
                tally.truncated += 1;
                continue;
            }
            let mut walk = Datagram::new(received.bytes);
            while let Some(message) = walk.next_into(&mut event) {
                match message {
                    Ok(Message::Event(())) => {
                        match event.kind {
                            EventKind::New => tally.new += 1,
                            EventKind::Update => tally.update += 1,
                            EventKind::Destroy => tally.destroy += 1,
                        }
                        if config.print_events {
                            writeln!(out, "{event}")?;
                        }
                    }
                    Ok(Message::Overrun) => tally.overruns += 1,
                    Ok(_) => tally.other += 1,
                    Err(e) => {
                        tally.malformed += 1;
                        if config.print_events {
                            writeln!(out, "[MALFORMED] {e}")?;
                        }
                    }
                }
            }
        }
        out.flush()?;
        if last_report.elapsed() >= REPORT_EVERY {
            eprintln!("conntrack-metrics: {tally:?}");
            last_report = Instant::now();
        }
    }
}
