//! The binary codec of saved state: a framed blob ([`frame`] / [`unframe`]) holding fields
//! written by a [`Writer`] and read back by a bounds-checked [`Reader`].

use super::{Result, SnapshotError};

/// First bytes of every blob.
pub const MAGIC: [u8; 4] = *b"VMMS";
/// The format version written; the only one read.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of the frame before the payload.
const HEADER: usize = 4 + 4 + 2 + 8;

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// Feed `data` into a running CRC-32 register (start with `!0`, finish with `!`): the CRC
/// of a stream written piece by piece.
pub fn crc32_update(state: u32, data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = state;
    for &b in data {
        c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

/// Frame `payload` as a blob of `kind`.
pub fn frame(kind: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&kind);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn kind_name(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// Check a blob's magic, kind, version, length and checksum; return its payload.
pub fn unframe(kind: [u8; 4], blob: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(blob);
    if r.bytes(4)? != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let found = r.bytes(4)?;
    if found != kind {
        return Err(SnapshotError::WrongKind {
            expected: kind_name(&kind),
            found: kind_name(found),
        });
    }
    let version = r.u16()?;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = r.u64()?;
    let len = usize::try_from(len).map_err(|_| SnapshotError::Truncated {
        at: HEADER,
        need: usize::MAX,
        have: r.remaining(),
    })?;
    let payload = r.bytes(len)?;
    let body_end = HEADER + len;
    let crc = r.u32()?;
    r.finish()?;
    if crc32(&blob[..body_end]) != crc {
        return Err(SnapshotError::Checksum);
    }
    Ok(payload)
}

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// A bool as one byte (0 or 1).
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    /// A u16.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u32.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A u64.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A count (u64) of the elements that follow.
    pub fn count(&mut self, n: usize) {
        self.u64(n as u64);
    }
    /// Length-prefixed bytes (e.g. a nested blob).
    pub fn blob(&mut self, b: &[u8]) {
        self.count(b.len());
        self.buf.extend_from_slice(b);
    }
    /// The bytes written.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian fields, never past the end.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(SnapshotError::Truncated {
                at: self.pos,
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    /// A bool; anything but 0 or 1 is refused.
    pub fn bool(&mut self) -> Result<bool> {
        let at = self.pos;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(SnapshotError::Invalid(format!(
                "boolean field at offset {at} holds {v}"
            ))),
        }
    }
    /// A u16.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of `what`, each taking at least `min_bytes` bytes: refused when over `max` or
    /// when the bytes left cannot hold that many (so a caller may allocate for it).
    pub fn count(&mut self, what: &'static str, max: usize, min_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        if n > max as u64 {
            return Err(SnapshotError::TooMany {
                what,
                count: n,
                max: max as u64,
            });
        }
        // n <= max fits usize.
        let n = n as usize;
        let need = n.saturating_mul(min_bytes.max(1));
        if min_bytes > 0 && need > self.remaining() {
            return Err(SnapshotError::Truncated {
                at: self.pos,
                need,
                have: self.remaining(),
            });
        }
        Ok(n)
    }

    /// Length-prefixed bytes of at most `max` bytes.
    pub fn blob(&mut self, what: &'static str, max: usize) -> Result<&'a [u8]> {
        let n = self.count(what, max, 1)?;
        self.bytes(n)
    }

    /// Refuse bytes left over.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(SnapshotError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn frames_round_trip_and_every_damage_is_refused() {
        let blob = frame(*b"TEST", b"payload");
        assert_eq!(unframe(*b"TEST", &blob), Ok(&b"payload"[..]));
        assert!(matches!(
            unframe(*b"OTHR", &blob),
            Err(SnapshotError::WrongKind { .. })
        ));
        for cut in 0..blob.len() {
            assert!(unframe(*b"TEST", &blob[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(unframe(*b"TEST", &bad).is_err(), "flip at {i}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert_eq!(unframe(*b"TEST", &long), Err(SnapshotError::Trailing(1)));
        let mut v2 = blob.clone();
        v2[8] = 2;
        assert!(matches!(
            unframe(*b"TEST", &v2),
            Err(SnapshotError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn counts_are_bounded_by_the_limit_and_the_bytes_left() {
        let mut w = Writer::new();
        w.count(1 << 40);
        let b = w.into_inner();
        assert!(matches!(
            Reader::new(&b).count("things", 100, 8),
            Err(SnapshotError::TooMany { .. })
        ));
        let mut w = Writer::new();
        w.count(50);
        w.u64(1);
        let b = w.into_inner();
        assert!(matches!(
            Reader::new(&b).count("things", 100, 8),
            Err(SnapshotError::Truncated { .. })
        ));
        let mut w = Writer::new();
        w.u8(2);
        assert!(matches!(
            Reader::new(&w.into_inner()).bool(),
            Err(SnapshotError::Invalid(_))
        ));
    }
}
