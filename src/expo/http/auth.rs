//! Basic authentication against the web configuration's `basic_auth_users`,
//! with bcrypt kept off the poll loop and within a fixed share of one CPU.
//!
//! Owns: reading the `Authorization: Basic` header, the caches of
//! credentials already checked (by SHA-256 of user, hash and password: no
//! password is kept), the one password-check thread and its queue, the
//! per-peer and global limits on checks, and the request rate limit of the
//! file's `rate_limit`.
//!
//! A request's credentials are, in order: accepted at once if they were
//! accepted before (under the same hash); refused at once if they were
//! refused before; otherwise checked by bcrypt on the `ct-web-auth` thread
//! while the connection waits ([`Verdict::Pending`]). A peer may have one
//! check queued or running, and the queue holds [`QUEUE`] checks; beyond
//! either the request gets 429. The thread spends at most
//! [`CHECK_CPU_SHARE`] of each second on bcrypt: a flood of wrong passwords
//! from any number of peers costs at most that much of one CPU, and the
//! checks it cannot afford are refused, not queued. An unknown user is
//! checked against a fixed hash, so the answer takes as long as for a known
//! one. Accepted credentials are cached apart from refused ones, so a flood
//! can never push Prometheus's out.
//!
//! Never: runs bcrypt on the poll loop or on a reader thread, keeps a
//! password after its check, or lets a check's answer from an older
//! configuration decide under a newer one whose hash for that user differs.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use metrics::Counter;
use mio::Waker;

use crate::stats::self_metrics::HTTP_AUTH;

/// Checks waiting for or on the password-check thread, at most.
pub(super) const QUEUE: usize = 8;
/// Checks one peer may have waiting or running.
const PER_PEER: u8 = 1;
/// Share of each second the password-check thread may spend in bcrypt.
pub const CHECK_CPU_SHARE: f64 = 0.25;
/// The budget the thread may run ahead by (one slow check at a high cost).
const CHECK_BURST: Duration = Duration::from_millis(500);
/// Accepted credentials remembered (per configuration); only a correct
/// password can add one.
const ACCEPTED_MAX: usize = 64;
/// Refused credentials remembered; cleared when full.
const REFUSED_MAX: usize = 4096;
/// bcrypt of "fakepassword" at cost 10, the toolkit's: what an unknown user
/// is checked against, so that unknown and known users take as long.
const UNKNOWN_USER_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// What becomes of a request's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Pass,
    /// No, unreadable or wrong credentials: 401.
    Unauthorized,
    /// Too many checks (this peer's or all): 429.
    Limited,
    /// Being checked; the answer comes through [`Gate::answers`].
    Pending,
}

/// What a check is about, sent to the password-check thread and back.
struct Asked {
    /// Who asks: the connection's slot and serial.
    conn: (usize, u64),
    peer: IpAddr,
    /// The cache key of user, hash and password.
    key: [u8; 32],
    user: String,
    /// The hash checked against (the unknown user's for an unknown user).
    hash: String,
}

/// A check for the password-check thread.
struct Check {
    asked: Asked,
    password: Vec<u8>,
}

/// Its answer.
struct Answer {
    asked: Asked,
    /// `None`: not checked, the budget was spent.
    ok: Option<bool>,
}

/// The users and the caches of one configuration, the queue to the
/// password-check thread and its answers.
pub(super) struct Gate {
    users: Arc<std::collections::BTreeMap<String, String>>,
    accepted: HashSet<[u8; 32]>,
    refused: HashSet<[u8; 32]>,
    pending: HashMap<IpAddr, u8>,
    checks: Sender<Check>,
    answers: Receiver<Answer>,
    rate: Option<Bucket>,
    counted: Outcomes,
}

struct Outcomes {
    cached: Counter,
    checked_ok: Counter,
    refused: Counter,
    missing: Counter,
    limited: Counter,
}

impl Gate {
    /// Starts the password-check thread, which wakes `waker` when it has an
    /// answer, and ends when the gate is dropped.
    pub(super) fn start(
        users: Arc<std::collections::BTreeMap<String, String>>,
        rate_limit: Option<crate::expo::web_config::RateLimit>,
        waker: Arc<Waker>,
    ) -> std::io::Result<Gate> {
        let (checks, queue) = crossbeam_channel::bounded::<Check>(QUEUE);
        let (answer, answers) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("ct-web-auth".into())
            .spawn(move || check_passwords(queue, answer, waker))?;
        let outcome = |o: &'static str| metrics::counter!(HTTP_AUTH, "outcome" => o);
        Ok(Gate {
            users,
            accepted: HashSet::new(),
            refused: HashSet::new(),
            pending: HashMap::new(),
            checks,
            answers,
            rate: rate_limit.map(Bucket::new),
            counted: Outcomes {
                cached: outcome("accepted cached"),
                checked_ok: outcome("accepted"),
                refused: outcome("refused"),
                missing: outcome("no credentials"),
                limited: outcome("limited"),
            },
        })
    }

    /// A new configuration: its users, and caches that forget the old.
    pub(super) fn reconfigure(
        &mut self,
        users: Arc<std::collections::BTreeMap<String, String>>,
        rate_limit: Option<crate::expo::web_config::RateLimit>,
    ) {
        self.users = users;
        self.accepted.clear();
        self.refused.clear();
        self.rate = rate_limit.map(Bucket::new);
    }

    /// The file's `rate_limit`: whether one more request may be served now.
    pub(super) fn admit_request(&mut self, now: Instant) -> bool {
        self.rate.as_mut().is_none_or(|b| b.take(now))
    }

    /// Whether requests need credentials at all.
    pub(super) fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// Decides on the `Authorization` header (`None`: absent) of a request
    /// from `peer` on connection `conn`.
    pub(super) fn decide(
        &mut self,
        conn: (usize, u64),
        peer: IpAddr,
        header: Option<&[u8]>,
    ) -> Verdict {
        if !self.enabled() {
            return Verdict::Pass;
        }
        let Some((user, password)) = header.and_then(basic_credentials) else {
            self.counted.missing.increment(1);
            return Verdict::Unauthorized;
        };
        let hash = match self.users.get(&user) {
            Some(h) => h.clone(),
            None => UNKNOWN_USER_HASH.to_string(),
        };
        let key = cache_key(&user, &hash, &password);
        if self.accepted.contains(&key) {
            self.counted.cached.increment(1);
            return Verdict::Pass;
        }
        if self.refused.contains(&key) {
            self.counted.refused.increment(1);
            return Verdict::Unauthorized;
        }
        let waiting = self.pending.entry(peer).or_insert(0);
        if *waiting >= PER_PEER {
            self.counted.limited.increment(1);
            return Verdict::Limited;
        }
        let check = Check {
            asked: Asked {
                conn,
                peer,
                key,
                user,
                hash,
            },
            password,
        };
        match self.checks.try_send(check) {
            Ok(()) => {
                *waiting += 1;
                Verdict::Pending
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counted.limited.increment(1);
                Verdict::Limited
            }
        }
    }

    /// The answers of the password-check thread since the last call, as the
    /// connection each is for and its verdict.
    pub(super) fn answers(&mut self, out: &mut Vec<((usize, u64), Verdict)>) {
        while let Ok(Answer { asked: a, ok }) = self.answers.try_recv() {
            if let Some(n) = self.pending.get_mut(&a.peer) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.pending.remove(&a.peer);
                }
            }
            // The hash this user has now (the unknown user's if none): an
            // answer about another hash is from an older configuration.
            let current = self
                .users
                .get(&a.user)
                .map_or(UNKNOWN_USER_HASH, String::as_str);
            let known = self.users.contains_key(&a.user);
            let verdict = match ok {
                None => {
                    self.counted.limited.increment(1);
                    Verdict::Limited
                }
                Some(_) if current != a.hash => {
                    self.counted.refused.increment(1);
                    Verdict::Unauthorized
                }
                Some(true) if known => {
                    if self.accepted.len() >= ACCEPTED_MAX {
                        self.accepted.clear();
                    }
                    self.accepted.insert(a.key);
                    self.counted.checked_ok.increment(1);
                    Verdict::Pass
                }
                Some(_) => {
                    if self.refused.len() >= REFUSED_MAX {
                        self.refused.clear();
                    }
                    self.refused.insert(a.key);
                    self.counted.refused.increment(1);
                    Verdict::Unauthorized
                }
            };
            out.push((a.conn, verdict));
        }
    }
}

/// The user and password of an `Authorization: Basic` header value.
fn basic_credentials(value: &[u8]) -> Option<(String, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

fn cache_key(user: &str, hash: &str, password: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user.as_bytes(), hash.as_bytes(), password] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    let mut key = [0; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The password-check thread: bcrypt for each check, within
/// [`CHECK_CPU_SHARE`] of each second; a check that comes when the budget
/// is spent is answered "not checked" at once.
fn check_passwords(queue: Receiver<Check>, answer: Sender<Answer>, waker: Arc<Waker>) {
    // Seconds of bcrypt the thread may still spend; a check may overdraw
    // it, and the debt is paid back (at CHECK_CPU_SHARE) before the next.
    let burst = CHECK_BURST.as_secs_f64();
    let mut budget = burst;
    let mut refilled = Instant::now();
    while let Ok(mut check) = queue.recv() {
        let now = Instant::now();
        let earned = now.duration_since(refilled).as_secs_f64() * CHECK_CPU_SHARE;
        budget = (budget + earned).min(burst);
        refilled = now;
        let ok = if budget <= 0.0 {
            None
        } else {
            let started = Instant::now();
            let ok = bcrypt::verify(&check.password, &check.asked.hash).unwrap_or(false);
            budget -= started.elapsed().as_secs_f64();
            Some(ok)
        };
        // The password is not kept past its check.
        check.password.fill(0);
        let sent = answer.send(Answer {
            asked: check.asked,
            ok,
        });
        if sent.is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

/// A token bucket: `burst` requests, one more per `interval`.
struct Bucket {
    limit: crate::expo::web_config::RateLimit,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limit: crate::expo::web_config::RateLimit) -> Bucket {
        Bucket {
            limit,
            tokens: f64::from(limit.burst),
            at: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.at).as_secs_f64()
            / self.limit.interval.as_secs_f64();
        self.tokens = (self.tokens + earned).min(f64::from(self.limit.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_strictly() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let h = format!("Basic {}", enc("prometheus:pa:ss"));
        assert_eq!(
            basic_credentials(h.as_bytes()),
            Some(("prometheus".into(), b"pa:ss".to_vec()))
        );
        let lower = format!("basic  {}", enc("a:"));
        assert_eq!(
            basic_credentials(lower.as_bytes()),
            Some(("a".into(), Vec::new()))
        );
        for bad in [
            format!("Bearer {}", enc("a:b")),
            format!("Basic {}", enc("no colon")),
            "Basic !!!".to_string(),
            "Basic".to_string(),
        ] {
            assert_eq!(basic_credentials(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_one_per_interval() {
        let limit = crate::expo::web_config::RateLimit {
            burst: 2,
            interval: Duration::from_millis(100),
        };
        let mut b = Bucket::new(limit);
        let t0 = b.at;
        assert!(b.take(t0) && b.take(t0) && !b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(101)));
        assert!(!b.take(t0 + Duration::from_millis(101)));
    }

    #[test]
    fn the_unknown_user_hash_is_bcrypt_of_fakepassword() {
        assert!(bcrypt::verify("fakepassword", UNKNOWN_USER_HASH).unwrap());
    }
}
