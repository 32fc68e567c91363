//! `--memory SIZE`: sizes written as a byte count or with a `K`, `M` or `G` suffix.

use std::num::ParseIntError;

/// Why a size does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No digits before the suffix.
    #[error("no number")]
    Empty,
    /// The digits are not a number.
    #[error("not a number")]
    Number(#[source] ParseIntError),
    /// The size does not fit in 64 bits.
    #[error("too large")]
    TooLarge,
}

/// Parse a size like `512M`, `2G`, `65536K` or a plain byte count (surrounding blanks ignored).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last() {
        None => return Err(SizeError::Empty),
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 1 << 30),
        Some(_) => (s, 1),
    };
    if num.is_empty() {
        return Err(SizeError::Empty);
    }
    num.parse::<u64>()
        .map_err(SizeError::Number)?
        .checked_mul(mult)
        .ok_or(SizeError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn every_bad_size_class() {
        assert_eq!(parse_size(" 64k "), Ok(64 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        assert_eq!(parse_size("M"), Err(SizeError::Empty));
        assert!(matches!(parse_size("lots"), Err(SizeError::Number(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Number(_))));
        assert!(matches!(parse_size("-1M"), Err(SizeError::Number(_))));
        assert!(matches!(parse_size("1T"), Err(SizeError::Number(_))));
        // A multi-byte last character is not a suffix (no slicing inside it).
        assert!(matches!(parse_size("1é"), Err(SizeError::Number(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Number(_))
        ));
        assert_eq!(parse_size("17179869184G"), Err(SizeError::TooLarge));
        assert_eq!(parse_size("17179869183G"), Ok(17179869183 << 30));
    }
}
