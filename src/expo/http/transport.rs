//! A client connection's byte stream: the TCP socket itself, or TLS over it
//! (rustls, driven by hand over the non-blocking socket).
//!
//! Owns: moving TLS records between the socket and the rustls connection
//! (handshake, alerts, `close_notify`), and what "would block" means for
//! each: a TLS read blocks when no plaintext is buffered and the socket has
//! nothing; a write is taken into rustls only once everything it encrypted
//! before is on the socket, so at most one response's worth is buffered;
//! [`Transport::flush`] blocks until the last byte is on the socket.
//!
//! Never: blocks, buffers more than one write's ciphertext, or hides a TLS
//! error (it is `InvalidData`, and the connection is closed by its owner).

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

/// Plaintext taken into rustls per write: a few TLS records.
const TLS_WRITE_CHUNK: usize = 64 * 1024;

pub(super) enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

pub(super) struct TlsStream {
    sock: TcpStream,
    tls: rustls::ServerConnection,
    /// rustls refused what the peer sent (a plain HTTP request, an old
    /// version, a bad certificate): the connection is over.
    failed: bool,
}

impl Transport {
    pub(super) fn tls(sock: TcpStream, tls: rustls::ServerConnection) -> Transport {
        Transport::Tls(Box::new(TlsStream {
            sock,
            tls,
            failed: false,
        }))
    }

    /// Whether TLS failed on this connection (a handshake refused, a bad
    /// record).
    pub(super) fn tls_failed(&self) -> bool {
        matches!(self, Transport::Tls(t) if t.failed)
    }

    /// The socket, to register with the poll and to read and discard from
    /// while lingering.
    pub(super) fn socket(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &mut t.sock,
        }
    }

    /// Reads plaintext: `Ok(0)` at the end of the stream.
    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }

    /// Writes plaintext; for TLS, takes at most [`TLS_WRITE_CHUNK`] and only
    /// when what was taken before is on the socket.
    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(t) => t.write(buf),
        }
    }

    /// `Ok` once everything written is on the socket; `WouldBlock` while
    /// TLS records wait for room.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.send_records(),
        }
    }

    /// Ends the write side: a TLS `close_notify` (best effort), then FIN.
    pub(super) fn shutdown_write(&mut self) {
        if let Transport::Tls(t) = self {
            t.tls.send_close_notify();
            let _ = t.send_records();
        }
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

impl TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buf) {
                // Ok(0) is the peer's close_notify; UnexpectedEof a close
                // without one: both end the stream.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // No plaintext buffered: take records from the socket.
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    // The socket's end: rustls now answers the read above
                    // with Ok(0) or UnexpectedEof.
                    if let Err(e) = self.tls.process_new_packets() {
                        self.failed = true;
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // Send the alert rustls queued, then give up.
                        self.failed = true;
                        let _ = self.send_records();
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Handshake messages may wait to go out; a full socket
                    // is reported by the writable edge, which drives the
                    // connection again.
                    return match self.send_records() {
                        Ok(()) => Err(e),
                        Err(w) if w.kind() == io::ErrorKind::WouldBlock => Err(e),
                        Err(w) => Err(w),
                    };
                }
                Err(e) => return Err(e),
            }
            // The handshake's replies go out as soon as they are made.
            match self.send_records() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_records()?;
        let n = self
            .tls
            .writer()
            .write(&buf[..buf.len().min(TLS_WRITE_CHUNK)])?;
        match self.send_records() {
            Ok(()) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            Err(e) => Err(e),
        }
    }

    /// Writes the records rustls holds until none is left or the socket is
    /// full (`WouldBlock`).
    fn send_records(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
