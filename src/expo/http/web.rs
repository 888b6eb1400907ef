//! The web configuration in force, and its reloads: on SIGHUP (through
//! [`StopHandle::reload`](super::StopHandle::reload)) and when the file, or a file it names, changes
//! (looked at every [`WATCH_EVERY`]: a cert-manager rotation swaps a
//! Secret volume's files without any signal).
//!
//! Owns: the path, the fingerprint of what is in force, the watch deadline,
//! logging each reload and each broken file (once per distinct content),
//! and the reload counters.
//!
//! Never: gives up a working configuration for a broken one (the old one is
//! kept, and the new one tried again when it changes), or switches between
//! TLS and plain HTTP on a reload (that is a broken file too: a
//! configuration error must never expose the endpoint in plain text).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge};

use crate::expo::web_config::{Fingerprint, WebConfig};
use crate::stats::self_metrics::{WEB_CONFIG_RELOADS, WEB_CONFIG_RELOAD_OK};

/// How often the files are read to see whether they changed.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// The web configuration in force and where it came from.
pub(super) struct Watch {
    path: PathBuf,
    pub(super) current: WebConfig,
    /// While the files fail to load: their fingerprint when they last
    /// failed (`None` inside: one could not be read), so each broken
    /// content is logged and counted once.
    failed: Option<Option<Fingerprint>>,
    pub(super) next_look: Instant,
    asked: Arc<AtomicBool>,
    ok: Counter,
    broken: Counter,
    in_force: Gauge,
}

impl Watch {
    pub(super) fn new(path: PathBuf, current: WebConfig, asked: Arc<AtomicBool>) -> Watch {
        let in_force = metrics::gauge!(WEB_CONFIG_RELOAD_OK);
        in_force.set(1.0);
        Watch {
            path,
            current,
            failed: None,
            next_look: Instant::now() + WATCH_EVERY,
            asked,
            ok: metrics::counter!(WEB_CONFIG_RELOADS, "outcome" => "success"),
            broken: metrics::counter!(WEB_CONFIG_RELOADS, "outcome" => "failure"),
            in_force,
        }
    }

    /// Reads the file again when that was asked for (SIGHUP) or the files
    /// changed; true when a new configuration is in force (`current`),
    /// false otherwise (nothing to do, or a broken file, which is logged
    /// and counted).
    pub(super) fn look(&mut self, now: Instant) -> bool {
        // Acquire pairs with the Release store in `StopHandle::reload`.
        let asked = self.asked.swap(false, Ordering::Acquire);
        if !asked && now < self.next_look {
            return false;
        }
        self.next_look = now + WATCH_EVERY;
        if !asked {
            match Fingerprint::of(&self.current.files) {
                Some(f) if f == self.current.fingerprint => return false,
                // Changed, or gone: a rotation may be half done; load says.
                _ => {}
            }
        }
        let why = if asked { "SIGHUP" } else { "file changed" };
        match WebConfig::load(&self.path).and_then(|new| self.compatible(new)) {
            Ok(new) => {
                for w in &new.warnings {
                    log!("warning: --web.config.file: {w}");
                }
                log!(
                    "{why}: web configuration {} reloaded ({} user(s), TLS {})",
                    self.path.display(),
                    new.users.len(),
                    if new.tls.is_some() { "on" } else { "off" }
                );
                self.failed = None;
                self.ok.increment(1);
                self.in_force.set(1.0);
                self.current = new;
                true
            }
            Err(e) => {
                // What the files in force hold now: a broken content is
                // logged once, until it changes again.
                let fresh = Fingerprint::of(&self.current.files);
                if asked || self.failed != Some(fresh) {
                    log!(
                        "{why}: web configuration {} not reloaded, the one in force is kept: {e}",
                        self.path.display()
                    );
                    self.broken.increment(1);
                    self.in_force.set(0.0);
                }
                self.failed = Some(fresh);
                false
            }
        }
    }

    fn compatible(&self, new: WebConfig) -> Result<WebConfig, String> {
        match (self.current.tls.is_some(), new.tls.is_some()) {
            (true, false) => Err("it turns TLS off; that takes a restart".into()),
            (false, true) => Err("it turns TLS on; that takes a restart".into()),
            _ => Ok(new),
        }
    }
}
