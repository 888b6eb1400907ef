//! Netlink attributes (`struct nlattr`): a checked view of one attribute and an
//! iterator over a run of them.
//!
//! Owns: the attribute framing rules (4-byte header in host order, payload,
//! padding to 4 bytes) and the fixed-size payload accessors.
//! Never: allocates, panics on any input, or interprets what an attribute means
//! (that is `ctnetlink.rs`).
//!
//! The guarantee, as in smoltcp's `wire` module: an [`Nla`] only exists once its
//! length was checked against its parent, so no accessor can index out of bounds;
//! accessors check the payload size and return [`WireError::AttrSize`] otherwise.

use super::WireError;

/// Size of `struct nlattr`: `nla_len: u16`, `nla_type: u16`, both host order.
pub const NLA_HDRLEN: usize = 4;
/// Set in `nla_type` on attributes that hold other attributes.
pub const NLA_F_NESTED: u16 = 0x8000;
/// Set in `nla_type` on attributes whose payload is in network order.
pub const NLA_F_NET_BYTEORDER: u16 = 0x4000;
/// Mask that removes the two flag bits from `nla_type`.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// Rounds a netlink length up to the 4-byte alignment of messages and attributes.
#[inline]
pub const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// One attribute whose header was checked against the bytes that hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nla<'a> {
    kind: u16,
    payload: &'a [u8],
}

impl<'a> Nla<'a> {
    /// The attribute type with the nested / byte-order flags masked off.
    #[inline]
    pub fn kind(&self) -> u16 {
        self.kind
    }

    /// The payload, without header and padding.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The attributes nested in this one. `name` names this attribute in errors.
    #[inline]
    pub fn nested(&self, name: &'static str) -> NlaIter<'a> {
        NlaIter::new(self.payload, name)
    }

    #[inline]
    fn array<const N: usize>(&self, name: &'static str) -> Result<[u8; N], WireError> {
        <[u8; N]>::try_from(self.payload).map_err(|_| WireError::AttrSize {
            attr: name,
            expected: N,
            got: self.payload.len(),
        })
    }

    /// A one-byte payload.
    #[inline]
    pub fn u8(&self, name: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(name)?[0])
    }

    /// A two-byte payload in network (big-endian) order.
    #[inline]
    pub fn u16_be(&self, name: &'static str) -> Result<u16, WireError> {
        self.array(name).map(u16::from_be_bytes)
    }

    /// A four-byte payload in network (big-endian) order.
    #[inline]
    pub fn u32_be(&self, name: &'static str) -> Result<u32, WireError> {
        self.array(name).map(u32::from_be_bytes)
    }

    /// An eight-byte payload in network (big-endian) order.
    #[inline]
    pub fn u64_be(&self, name: &'static str) -> Result<u64, WireError> {
        self.array(name).map(u64::from_be_bytes)
    }

    /// A payload of exactly `N` bytes (an address, say).
    #[inline]
    pub fn bytes<const N: usize>(&self, name: &'static str) -> Result<[u8; N], WireError> {
        self.array(name)
    }
}

/// Iterates over a run of attributes (a message body or a nest's payload).
///
/// Yields each attribute, or one error and then nothing more: after a bad
/// length the position of the next attribute is unknown, so iteration stops
/// (as netlink-packet-core's `NlasIterator` does).
#[derive(Clone, Debug)]
pub struct NlaIter<'a> {
    rest: &'a [u8],
    parent: &'static str,
}

impl<'a> NlaIter<'a> {
    /// Attributes in `buf`; `parent` names the message or nest that holds them.
    #[inline]
    pub fn new(buf: &'a [u8], parent: &'static str) -> Self {
        NlaIter { rest: buf, parent }
    }
}

impl<'a> Iterator for NlaIter<'a> {
    type Item = Result<Nla<'a>, WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let buf = self.rest;
        if buf.is_empty() {
            return None;
        }
        let (len, kind) = match buf {
            [l0, l1, t0, t1, ..] => (
                u16::from_ne_bytes([*l0, *l1]),
                u16::from_ne_bytes([*t0, *t1]),
            ),
            _ => {
                self.rest = &[];
                return Some(Err(WireError::Truncated {
                    what: self.parent,
                    need: NLA_HDRLEN,
                    have: buf.len(),
                }));
            }
        };
        let nla_len = usize::from(len);
        if nla_len < NLA_HDRLEN || nla_len > buf.len() {
            self.rest = &[];
            return Some(Err(WireError::AttrLength {
                parent: self.parent,
                nla_type: kind & NLA_TYPE_MASK,
                nla_len: len,
                available: buf.len(),
            }));
        }
        let (attr, after) = buf.split_at(nla_len);
        // The last attribute of a message may come without its padding.
        let pad = (align4(nla_len) - nla_len).min(after.len());
        self.rest = &after[pad..];
        Some(Ok(Nla {
            kind: kind & NLA_TYPE_MASK,
            payload: &attr[NLA_HDRLEN..],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn iterates_padded_attributes_and_masks_flags() {
        let mut buf = attr(1 | NLA_F_NESTED, &[7]);
        buf.extend(attr(2, &[0, 0, 1, 0]));
        let got: Vec<_> = NlaIter::new(&buf, "test").collect();
        assert_eq!(got.len(), 2);
        let a = got[0].unwrap();
        assert_eq!((a.kind(), a.u8("a").unwrap()), (1, 7));
        let b = got[1].unwrap();
        assert_eq!((b.kind(), b.u32_be("b").unwrap()), (2, 256));
    }

    #[test]
    fn last_attribute_may_lack_padding() {
        let mut buf = attr(3, &[9]);
        buf.truncate(5);
        let got: Vec<_> = NlaIter::new(&buf, "test").collect();
        assert_eq!(
            got,
            vec![Ok(Nla {
                kind: 3,
                payload: &[9]
            })]
        );
    }

    #[test]
    fn length_past_buffer_is_one_error_then_end() {
        let mut buf = attr(1, &[0; 8]);
        buf[0] = 200;
        let mut it = NlaIter::new(&buf, "nest");
        assert_eq!(
            it.next(),
            Some(Err(WireError::AttrLength {
                parent: "nest",
                nla_type: 1,
                nla_len: 200,
                available: 12
            }))
        );
        assert_eq!(it.next(), None);
    }

    #[test]
    fn length_below_header_is_an_error() {
        let buf = [2u8, 0, 1, 0, 0, 0, 0, 0];
        let mut it = NlaIter::new(&buf, "msg");
        assert!(matches!(
            it.next(),
            Some(Err(WireError::AttrLength { nla_len: 2, .. }))
        ));
        assert_eq!(it.next(), None);
    }

    #[test]
    fn trailing_bytes_shorter_than_a_header_are_truncation() {
        let mut buf = attr(1, &[1, 2, 3, 4]);
        buf.extend_from_slice(&[0, 0]);
        let got: Vec<_> = NlaIter::new(&buf, "msg").collect();
        assert!(got[0].is_ok());
        assert_eq!(
            got[1],
            Err(WireError::Truncated {
                what: "msg",
                need: 4,
                have: 2
            })
        );
    }

    #[test]
    fn wrong_payload_size_is_reported_with_the_attribute_name() {
        let buf = attr(1, &[1, 2, 3]);
        let a = NlaIter::new(&buf, "msg").next().unwrap().unwrap();
        assert_eq!(
            a.u32_be("CTA_ID"),
            Err(WireError::AttrSize {
                attr: "CTA_ID",
                expected: 4,
                got: 3
            })
        );
    }
}
