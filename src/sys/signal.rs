//! Signals, taken by a thread of their own: SIGTERM, SIGINT and SIGHUP are
//! blocked in every thread and waited for with `sigwait`, so the exporter
//! stops in an orderly way on the first two (the reader and the endpoint are
//! woken, not killed mid-write) and no code runs in a signal handler.

use std::io;

/// The signals taken by the signal thread.
const STOP: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: `sigset_t` is a plain C struct for which all-zero bytes are a
    // valid value; `sigemptyset` then initialises it as the API requires.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t;
    // `sigemptyset` only writes inside it.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in STOP {
        // SAFETY: as above, and `sig` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks the stop signals in the calling thread, and so in every thread it
/// starts afterwards. Call first thing in `main`.
pub fn block_stop_signals() -> io::Result<()> {
    let set = stop_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// A signal the signal thread took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: stop.
    Term,
    /// SIGINT: stop.
    Int,
    /// SIGHUP: reload what can be reloaded; never a stop.
    Hup,
}

impl Signal {
    /// Its name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
            Signal::Hup => "SIGHUP",
        }
    }
}

/// Waits for one of the signals blocked by [`block_stop_signals`].
pub fn wait_for_signal() -> io::Result<Signal> {
    let set = stop_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid place for the result.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(match sig {
        libc::SIGTERM => Signal::Term,
        libc::SIGINT => Signal::Int,
        _ => Signal::Hup,
    })
}
