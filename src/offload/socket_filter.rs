//! Which classic-BPF program each reader's socket gets, and attaching it.
//!
//! Owns: the choice between the Service filter (on by default: only Service
//! flows, and of their events only those the tracker may use), the share
//! filter alone (`--no-socket-filter` with several readers: every flow of
//! the reader's share), and none; and what the tracker is told the kernel
//! already dropped ([`KernelFiltered`]), so that it counts misses.
//! Never: decides a rule of its own (the program is `bpf`'s, its rules the
//! flow layer's), or leaves a reader believing a filter is attached that is
//! not.

use std::io;

use super::bpf::{service_event_filter, FlowEvents};
use crate::flow::{KernelFiltered, ReaderShare, Subnet};
use crate::sys::ConntrackSocket;

/// The socket filters of one exporter's readers.
#[derive(Clone, Debug)]
pub struct SocketFilters {
    services: Vec<Subnet>,
    excluded: Vec<Subnet>,
    readers: u32,
    /// Drop every event of a flow not to a Service.
    by_service: bool,
    /// Which events of the flows kept pass.
    events: FlowEvents,
}

impl SocketFilters {
    /// The filters for `readers` readers of flows to `services` and none of
    /// `excluded`; `by_service` is false with `--no-socket-filter`, and
    /// `print_events` passes every event of the flows kept (it shows them
    /// all); `live` (`--live-latency`) passes every NEW of them too.
    pub fn new(
        services: &[Subnet],
        excluded: &[Subnet],
        readers: u32,
        by_service: bool,
        print_events: bool,
        live: bool,
    ) -> SocketFilters {
        SocketFilters {
            services: services.to_vec(),
            excluded: excluded.to_vec(),
            readers: readers.max(1),
            by_service,
            events: match (by_service && !print_events, live) {
                (true, false) => FlowEvents::Used,
                (true, true) => FlowEvents::UsedLive,
                (false, _) => FlowEvents::All,
            },
        }
    }

    /// What the kernel drops before the tracker sees it.
    pub fn kernel_filtered(&self) -> KernelFiltered {
        KernelFiltered {
            non_service: self.by_service,
            other_shares: self.readers > 1,
        }
    }

    /// Attaches `share`'s program to `socket`, if it needs one. On an error
    /// nothing is attached.
    pub fn attach(&self, socket: &ConntrackSocket, share: ReaderShare) -> io::Result<()> {
        let everything = [Subnet::ALL_V4, Subnet::ALL_V6];
        let (services, excluded): (&[Subnet], &[Subnet]) = match self.kernel_filtered() {
            KernelFiltered {
                non_service: false,
                other_shares: false,
            } => return Ok(()),
            KernelFiltered {
                non_service: true, ..
            } => (&self.services, &self.excluded),
            // Every flow, split by share.
            _ => (&everything, &[]),
        };
        let program = service_event_filter(services, excluded, Some(share), self.events)
            .map_err(|e| io::Error::other(e.to_string()))?;
        socket.attach_filter(&program)
    }

    /// The same filters without the Service test: with one reader, when the
    /// Service filter cannot be attached, userspace applies the same rules
    /// at a higher cost.
    pub fn without_services(&mut self) {
        self.by_service = false;
        self.events = FlowEvents::All;
    }

    /// What the filters keep out, for the log.
    pub fn describe(&self) -> String {
        let readers = self.readers;
        match (self.by_service, readers > 1) {
            (true, false) => "service flows".to_string(),
            (true, true) => format!("service flows, 1/{readers} of them per reader"),
            (false, true) => format!("1/{readers} of all flows per reader"),
            (false, false) => "none (--no-socket-filter)".to_string(),
        }
    }
}
