//! The key header: the wire format a client sends first ([docs/design.md §2](../docs/design.md)).
//!
//! `[len][key]` — `len` is an unsigned integer of 1, 2 or 4 bytes (big-endian by default),
//! then `len` bytes of key. This module owns the format and its pure parser; it never touches
//! a socket, so it can be property-tested and fuzzed over plain byte slices. Progress is a
//! value ([`Parse::Need`]), not an error.

use std::fmt;

/// Default upper bound on the key length, in bytes.
pub const DEFAULT_MAX_KEY_LEN: u32 = 256;

/// Width of the length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LenBytes {
    /// One byte: keys up to 255 bytes.
    One,
    /// Two bytes (the default).
    Two,
    /// Four bytes.
    Four,
}

impl LenBytes {
    /// Number of bytes the length field occupies.
    pub const fn width(self) -> usize {
        match self {
            LenBytes::One => 1,
            LenBytes::Two => 2,
            LenBytes::Four => 4,
        }
    }

    /// The largest length this field can express.
    pub const fn max_value(self) -> u64 {
        match self {
            LenBytes::One => u8::MAX as u64,
            LenBytes::Two => u16::MAX as u64,
            LenBytes::Four => u32::MAX as u64,
        }
    }

    /// Parses the CLI spelling: `1`, `2` or `4`.
    pub fn from_width(width: u8) -> Option<Self> {
        match width {
            1 => Some(LenBytes::One),
            2 => Some(LenBytes::Two),
            4 => Some(LenBytes::Four),
            _ => None,
        }
    }
}

/// Byte order of the length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    /// Network byte order (the default).
    Big,
    /// Least significant byte first.
    Little,
}

/// Whether the backend sees the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    /// The backend sees the stream exactly as the client sent it (the default).
    Forward,
    /// The header is removed; the backend sees only what follows it.
    Strip,
}

/// The header format in force on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFormat {
    /// Width of the length field.
    pub len_bytes: LenBytes,
    /// Byte order of the length field.
    pub endian: Endian,
    /// Longest key accepted; longer ones are rejected before reading them.
    pub max_key_len: u32,
    /// Whether the header is forwarded to the backend.
    pub mode: HeaderMode,
}

impl Default for HeaderFormat {
    fn default() -> Self {
        HeaderFormat {
            len_bytes: LenBytes::Two,
            endian: Endian::Big,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            mode: HeaderMode::Forward,
        }
    }
}

/// Why a header was rejected. Each maps to one `reason` label of
/// `shardproxy_header_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HeaderError {
    /// The length field was zero: there is no key to route on.
    #[error("key length is zero")]
    ZeroLength,
    /// The length field exceeds `max_key_len`.
    #[error("key length exceeds the configured maximum")]
    TooLong,
    /// The client closed before the header was complete.
    #[error("connection closed inside the key header")]
    Eof,
    /// The header was not complete within the header timeout.
    #[error("key header not complete within the header timeout")]
    Timeout,
}

impl HeaderError {
    /// Every variant, for pre-registering metrics.
    pub const ALL: [HeaderError; 4] = [
        HeaderError::ZeroLength,
        HeaderError::TooLong,
        HeaderError::Eof,
        HeaderError::Timeout,
    ];

    /// The metric label for this error.
    pub const fn reason(self) -> &'static str {
        match self {
            HeaderError::ZeroLength => "zero_length",
            HeaderError::TooLong => "too_long",
            HeaderError::Eof => "eof",
            HeaderError::Timeout => "timeout",
        }
    }

    /// Index into [`HeaderError::ALL`].
    pub const fn index(self) -> usize {
        match self {
            HeaderError::ZeroLength => 0,
            HeaderError::TooLong => 1,
            HeaderError::Eof => 2,
            HeaderError::Timeout => 3,
        }
    }
}

/// Result of parsing the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// The header is incomplete: at least this many more bytes are needed.
    Need(usize),
    /// The header is complete.
    Done {
        /// The key bytes (borrowed from the input).
        key: &'a [u8],
        /// Bytes of input the header occupies (length field plus key); the rest is payload.
        consumed: usize,
    },
    /// The header is malformed; the connection must be closed.
    Error(HeaderError),
}

impl HeaderFormat {
    /// The longest a valid header can be: the length field plus `max_key_len`.
    pub fn max_header_len(&self) -> usize {
        self.len_bytes.width() + self.max_key_len as usize
    }

    /// Parses the start of a stream. Pure: the same bytes always give the same answer, and a
    /// prefix of a valid header always gives `Need`. Never reads past `max_header_len` bytes
    /// and never allocates.
    pub fn parse<'a>(&self, buf: &'a [u8]) -> Parse<'a> {
        let width = self.len_bytes.width();
        let Some(field) = buf.get(..width) else {
            return Parse::Need(width - buf.len());
        };
        let len = self.decode_len(field);
        if len == 0 {
            return Parse::Error(HeaderError::ZeroLength);
        }
        if len > u64::from(self.max_key_len) {
            return Parse::Error(HeaderError::TooLong);
        }
        // len <= max_key_len <= u32::MAX, so it fits in usize on every supported target.
        let total = width + len as usize;
        match buf.get(width..total) {
            Some(key) => Parse::Done {
                key,
                consumed: total,
            },
            None => Parse::Need(total - buf.len()),
        }
    }

    /// Encodes a header for `key` (what a client sends). Fails if the key does not fit the
    /// length field or exceeds `max_key_len`.
    pub fn encode(&self, key: &[u8]) -> Result<Vec<u8>, EncodeError> {
        let len = key.len() as u64;
        if len == 0 {
            return Err(EncodeError::Empty);
        }
        if len > self.len_bytes.max_value() || len > u64::from(self.max_key_len) {
            return Err(EncodeError::TooLong {
                len: key.len(),
                max: self.len_bytes.max_value().min(u64::from(self.max_key_len)),
            });
        }
        let mut out = Vec::with_capacity(self.len_bytes.width() + key.len());
        match (self.len_bytes, self.endian) {
            (LenBytes::One, _) => out.push(len as u8),
            (LenBytes::Two, Endian::Big) => out.extend_from_slice(&(len as u16).to_be_bytes()),
            (LenBytes::Two, Endian::Little) => out.extend_from_slice(&(len as u16).to_le_bytes()),
            (LenBytes::Four, Endian::Big) => out.extend_from_slice(&(len as u32).to_be_bytes()),
            (LenBytes::Four, Endian::Little) => out.extend_from_slice(&(len as u32).to_le_bytes()),
        }
        out.extend_from_slice(key);
        Ok(out)
    }

    fn decode_len(&self, field: &[u8]) -> u64 {
        field.iter().enumerate().fold(0u64, |acc, (i, &b)| {
            let shift = match self.endian {
                Endian::Big => 8 * (field.len() - 1 - i),
                Endian::Little => 8 * i,
            };
            acc | (u64::from(b) << shift)
        })
    }
}

/// Why a key cannot be encoded as a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Keys must have at least one byte.
    #[error("key is empty")]
    Empty,
    /// The key is longer than the format allows.
    #[error("key is {len} bytes; this header format allows at most {max}")]
    TooLong {
        /// Length of the key.
        len: usize,
        /// Largest length allowed.
        max: u64,
    },
}

impl fmt::Display for HeaderFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "u{}{} length, max key {} bytes, {}",
            self.len_bytes.width() * 8,
            match self.endian {
                Endian::Big => "be",
                Endian::Little => "le",
            },
            self.max_key_len,
            match self.mode {
                HeaderMode::Forward => "forwarded",
                HeaderMode::Strip => "stripped",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fmt(len_bytes: LenBytes, endian: Endian, max: u32) -> HeaderFormat {
        HeaderFormat {
            len_bytes,
            endian,
            max_key_len: max,
            mode: HeaderMode::Forward,
        }
    }

    #[test]
    fn table() {
        let be2 = HeaderFormat::default();
        let le4 = fmt(LenBytes::Four, Endian::Little, 256);
        let one = fmt(LenBytes::One, Endian::Big, 10);
        let cases: &[(HeaderFormat, &[u8], Parse)] = &[
            (be2, b"", Parse::Need(2)),
            (be2, b"\x00", Parse::Need(1)),
            (be2, b"\x00\x00", Parse::Error(HeaderError::ZeroLength)),
            (be2, b"\x00\x03ab", Parse::Need(1)),
            (
                be2,
                b"\x00\x03abcXYZ",
                Parse::Done {
                    key: b"abc",
                    consumed: 5,
                },
            ),
            (be2, b"\x01\x01", Parse::Error(HeaderError::TooLong)),
            (
                be2,
                b"\x01\x00",
                Parse::Need(256), // exactly max_key_len is allowed
            ),
            (le4, b"\x03\x00\x00", Parse::Need(1)),
            (
                le4,
                b"\x02\x00\x00\x00hi",
                Parse::Done {
                    key: b"hi",
                    consumed: 6,
                },
            ),
            (le4, b"\x00\x00\x00\x01", Parse::Error(HeaderError::TooLong)),
            (le4, b"\xff\xff\xff\xff", Parse::Error(HeaderError::TooLong)),
            (one, b"\x0b", Parse::Error(HeaderError::TooLong)),
            (
                one,
                b"\x01k",
                Parse::Done {
                    key: b"k",
                    consumed: 2,
                },
            ),
        ];
        for (i, (f, input, want)) in cases.iter().enumerate() {
            assert_eq!(f.parse(input), *want, "case {i}: {input:?}");
        }
    }

    #[test]
    fn encode_rejects_what_parse_rejects() {
        let f = fmt(LenBytes::One, Endian::Big, 300);
        assert_eq!(f.encode(b""), Err(EncodeError::Empty));
        assert!(matches!(
            f.encode(&[b'x'; 256]),
            Err(EncodeError::TooLong { max: 255, .. })
        ));
        assert_eq!(f.encode(b"ab").unwrap(), b"\x02ab");
    }

    fn any_format() -> impl Strategy<Value = HeaderFormat> {
        (
            prop_oneof![
                Just(LenBytes::One),
                Just(LenBytes::Two),
                Just(LenBytes::Four)
            ],
            prop_oneof![Just(Endian::Big), Just(Endian::Little)],
            1u32..2000,
        )
            .prop_map(|(l, e, m)| fmt(l, e, m))
    }

    proptest! {
        /// Split a valid header plus payload at every byte boundary: every strict prefix of the
        /// header asks for exactly the missing bytes, and every longer prefix finds the key.
        #[test]
        fn every_split_point(f in any_format(), key in proptest::collection::vec(any::<u8>(), 1..300),
                             payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let key = &key[..key.len().min(f.max_key_len as usize).min(f.len_bytes.max_value() as usize)];
            let mut wire = f.encode(key).unwrap();
            let hlen = wire.len();
            wire.extend_from_slice(&payload);
            for cut in 0..=wire.len() {
                match f.parse(&wire[..cut]) {
                    Parse::Need(n) => {
                        prop_assert!(cut < hlen);
                        if cut >= f.len_bytes.width() {
                            prop_assert_eq!(n, hlen - cut);
                        } else {
                            prop_assert_eq!(n, f.len_bytes.width() - cut);
                        }
                    }
                    Parse::Done { key: k, consumed } => {
                        prop_assert!(cut >= hlen);
                        prop_assert_eq!(k, key);
                        prop_assert_eq!(consumed, hlen);
                    }
                    Parse::Error(e) => prop_assert!(false, "unexpected {e:?}"),
                }
            }
        }

        /// Arbitrary garbage never panics, never claims more than it was given, and `Need` is
        /// always a positive count that does not run past the longest valid header.
        #[test]
        fn garbage_is_bounded(f in any_format(), buf in proptest::collection::vec(any::<u8>(), 0..4200)) {
            match f.parse(&buf) {
                Parse::Need(n) => {
                    prop_assert!(n > 0);
                    prop_assert!(buf.len() + n <= f.max_header_len());
                }
                Parse::Done { key, consumed } => {
                    prop_assert!(consumed <= buf.len());
                    prop_assert!(consumed <= f.max_header_len());
                    prop_assert_eq!(key.len() + f.len_bytes.width(), consumed);
                    prop_assert!(!key.is_empty());
                }
                Parse::Error(e) => prop_assert!(matches!(e, HeaderError::ZeroLength | HeaderError::TooLong)),
            }
        }

        /// The decision depends only on the bytes seen: feeding more bytes never changes a
        /// `Done` or `Error` already reached.
        #[test]
        fn monotone(f in any_format(), buf in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..600) {
            let cut = cut.min(buf.len());
            let early = f.parse(&buf[..cut]);
            let late = f.parse(&buf);
            match early {
                Parse::Need(_) => {}
                other => prop_assert_eq!(other, late),
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // The proxy's read loop against a reference model
    // ---------------------------------------------------------------------------------

    /// What the reference model says a prefix is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Expect {
        Need(usize),
        Done { consumed: usize },
        Error(HeaderError),
    }

    /// The header rules written out plainly, independently of [`HeaderFormat::parse`]: the
    /// length field is padded to a `u64` and decoded with the standard library.
    fn reference(f: &HeaderFormat, p: &[u8]) -> Expect {
        let w = f.len_bytes.width();
        if p.len() < w {
            return Expect::Need(w - p.len());
        }
        let mut field = [0u8; 8];
        let len = match f.endian {
            Endian::Big => {
                field[8 - w..].copy_from_slice(&p[..w]);
                u64::from_be_bytes(field)
            }
            Endian::Little => {
                field[..w].copy_from_slice(&p[..w]);
                u64::from_le_bytes(field)
            }
        };
        if len == 0 {
            Expect::Error(HeaderError::ZeroLength)
        } else if len > u64::from(f.max_key_len) {
            Expect::Error(HeaderError::TooLong)
        } else if (p.len() as u64) < w as u64 + len {
            Expect::Need(w + len as usize - p.len())
        } else {
            Expect::Done {
                consumed: w + len as usize,
            }
        }
    }

    /// `len` as `f`'s length field (no range check: out-of-range lengths are the point).
    fn length_field(f: &HeaderFormat, len: u64) -> Vec<u8> {
        let w = f.len_bytes.width();
        match f.endian {
            Endian::Big => len.to_be_bytes()[8 - w..].to_vec(),
            Endian::Little => len.to_le_bytes()[..w].to_vec(),
        }
    }

    /// How the proxy's read loop ended.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        Done {
            key: Vec<u8>,
            consumed: usize,
        },
        Error(HeaderError),
        /// The stream ended while the parser still needed bytes (the proxy counts `eof`).
        Eof,
    }

    /// Feeds `stream` to `f.parse` the way `read_header` does: a buffer of
    /// `max_header_len` bytes, reads of the given sizes (cycled, never past the buffer or
    /// the stream), and after each read (and once before the first, for a read that found
    /// nothing) the whole prefix re-parsed. Every answer is checked against [`reference`];
    /// returns how the loop ended and the buffer fill at that point.
    fn drive(
        f: &HeaderFormat,
        stream: &[u8],
        reads: &[usize],
    ) -> Result<(Outcome, usize), TestCaseError> {
        let cap = f.max_header_len();
        let mut buf = vec![0u8; cap];
        let mut filled = 0;
        let mut reads = reads.iter().cycle();
        loop {
            let got = f.parse(&buf[..filled]);
            let want = reference(f, &buf[..filled]);
            match (got, want) {
                (Parse::Need(n), Expect::Need(m)) => {
                    prop_assert_eq!(n, m, "Need at {} bytes", filled);
                    prop_assert!(n > 0);
                    prop_assert!(
                        filled + n <= cap,
                        "Need({}) at {} runs past {}",
                        n,
                        filled,
                        cap
                    );
                }
                (Parse::Done { key, consumed }, Expect::Done { consumed: c }) => {
                    prop_assert_eq!(consumed, c);
                    prop_assert!(consumed <= filled);
                    prop_assert_eq!(key, &buf[f.len_bytes.width()..consumed]);
                    return Ok((
                        Outcome::Done {
                            key: key.to_vec(),
                            consumed,
                        },
                        filled,
                    ));
                }
                (Parse::Error(e), Expect::Error(r)) => {
                    prop_assert_eq!(e, r);
                    return Ok((Outcome::Error(e), filled));
                }
                (got, want) => {
                    return Err(TestCaseError::fail(format!(
                        "at {filled} bytes: parse gave {got:?}, the reference {want:?}"
                    )))
                }
            }
            // Need: read more, as the proxy does, into the rest of the buffer.
            let room = cap - filled;
            let left = stream.len() - filled;
            if left == 0 {
                return Ok((Outcome::Eof, filled));
            }
            prop_assert!(room > 0, "Need with a full buffer at {} bytes", filled);
            let n = (*reads.next().unwrap_or(&1)).clamp(1, room.min(left));
            buf[filled..filled + n].copy_from_slice(&stream[filled..filled + n]);
            filled += n;
        }
    }

    /// The kinds of stream a client can send.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        /// A valid header, then payload.
        Valid,
        /// A zero length field, then anything.
        Zero,
        /// A length over `max_key_len` (but within the field), then anything.
        TooLong,
        /// A valid header cut short, then EOF.
        Truncated,
        /// Random bytes.
        Garbage,
    }

    fn any_kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Valid),
            Just(Kind::Zero),
            Just(Kind::TooLong),
            Just(Kind::Truncated),
            Just(Kind::Garbage),
        ]
    }

    /// Read sizes: mostly small (odd splits inside the length field and the key), some
    /// large enough to take the whole header at once.
    fn any_reads() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(prop_oneof![4 => 1usize..8, 1 => 1usize..5000], 1..16)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The proxy's incremental parse of a generated stream agrees with the reference at
        /// every step, and ends the way the stream's kind says: a valid header is found
        /// (key and length exactly) as soon as its last byte is in, a zero or too-long
        /// length is rejected as soon as the length field is in, and a cut-short header
        /// only ever asks for more until the stream ends.
        #[test]
        fn incremental_parse_matches_the_reference(
            f in any_format(),
            kind in any_kind(),
            key in proptest::collection::vec(any::<u8>(), 1..300),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            r in any::<u64>(),
            reads in any_reads(),
        ) {
            let w = f.len_bytes.width();
            let key_max = (f.max_key_len as usize).min(f.len_bytes.max_value() as usize);
            let key = &key[..key.len().min(key_max)];
            let header = f.encode(key).unwrap();
            let mut stream = Vec::new();
            match kind {
                Kind::Valid => {
                    stream.extend_from_slice(&header);
                    stream.extend_from_slice(&tail);
                }
                Kind::Zero => {
                    stream.extend(length_field(&f, 0));
                    stream.extend_from_slice(&tail);
                }
                Kind::TooLong => {
                    let over = f.len_bytes.max_value().saturating_sub(u64::from(f.max_key_len));
                    // With max_key_len at (or past) the field's maximum no length is too long.
                    prop_assume!(over > 0);
                    stream.extend(length_field(&f, u64::from(f.max_key_len) + 1 + r % over));
                    stream.extend_from_slice(&tail);
                }
                Kind::Truncated => {
                    stream.extend_from_slice(&header[..(r % header.len() as u64) as usize]);
                }
                Kind::Garbage => {
                    stream.extend_from_slice(key);
                    stream.extend_from_slice(&tail);
                }
            }

            let (outcome, filled) = drive(&f, &stream, &reads)?;
            match kind {
                Kind::Valid => {
                    prop_assert_eq!(outcome, Outcome::Done { key: key.to_vec(), consumed: header.len() });
                    // Found with the read that brought its last byte: never more than one
                    // read's worth past it.
                    prop_assert!(filled >= header.len());
                }
                Kind::Zero => {
                    prop_assert_eq!(outcome, Outcome::Error(HeaderError::ZeroLength));
                    prop_assert!(filled >= w);
                }
                Kind::TooLong => {
                    prop_assert_eq!(outcome, Outcome::Error(HeaderError::TooLong));
                    prop_assert!(filled >= w);
                }
                Kind::Truncated => {
                    prop_assert_eq!(outcome, Outcome::Eof);
                    prop_assert_eq!(filled, stream.len());
                }
                // The reference decided every step; an EOF is right exactly when the
                // reference still needed bytes at the end of the stream.
                Kind::Garbage => {
                    if outcome == Outcome::Eof {
                        prop_assert_eq!(filled, stream.len());
                    }
                }
            }
        }
    }
}
