//! The capture format of `tests/fixtures/*.bin`: a plain concatenation of
//! records, each a little-endian `u32` length followed by that many bytes, one
//! datagram exactly as `recvmsg` returned it.
//!
//! Owns: splitting a capture into datagrams. Never: allocates or panics; a
//! record whose length runs past the end is an error, then the walk ends.

use std::fmt;

/// A capture that ends inside a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureError {
    /// Offset of the bad record's length prefix.
    pub offset: usize,
    /// Bytes the record needs (prefix included).
    pub need: usize,
    /// Bytes left from `offset`.
    pub have: usize,
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capture record at offset {} needs {} bytes, {} left",
            self.offset, self.need, self.have
        )
    }
}

impl std::error::Error for CaptureError {}

/// The datagrams of a capture, in order.
pub fn records(buf: &[u8]) -> Records<'_> {
    Records { buf, offset: 0 }
}

/// Iterator returned by [`records`].
#[derive(Clone, Debug)]
pub struct Records<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<&'a [u8], CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.buf.get(self.offset..).unwrap_or_default();
        if rest.is_empty() {
            return None;
        }
        let record = rest.split_first_chunk::<4>().and_then(|(len, data)| {
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            data.get(..len)
        });
        match record {
            Some(data) => {
                self.offset += 4 + data.len();
                Some(Ok(data))
            }
            None => {
                let need = rest.first_chunk::<4>().map_or(4, |l| {
                    4usize.saturating_add(u32::from_le_bytes(*l) as usize)
                });
                let err = CaptureError {
                    offset: self.offset,
                    need,
                    have: rest.len(),
                };
                self.offset = self.buf.len();
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_records_and_reports_a_short_last_one() {
        let buf = [2, 0, 0, 0, 0xaa, 0xbb, 0, 0, 0, 0, 5, 0, 0, 0, 1];
        let got: Vec<_> = records(&buf).collect();
        assert_eq!(
            got,
            vec![
                Ok(&[0xaa, 0xbb][..]),
                Ok(&[][..]),
                Err(CaptureError {
                    offset: 10,
                    need: 9,
                    have: 5
                })
            ]
        );
    }
}
