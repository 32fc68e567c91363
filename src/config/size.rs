//! Sizes (`--memory 512M`) and counts (`--cpus 4`).

/// A size that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad size '{0}'")]
pub struct SizeError(pub String);

/// Parse a size like `512M`, `2G`, `65536K` or a plain byte count (no overflow past `u64`).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError(s.to_string());
    let t = s.trim();
    let (num, mult) = match t.chars().last().ok_or_else(bad)? {
        'k' | 'K' => (&t[..t.len() - 1], 1u64 << 10),
        'm' | 'M' => (&t[..t.len() - 1], 1 << 20),
        'g' | 'G' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// A vCPU count out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected 1..254, got '{0}'")]
pub struct CpusError(pub String);

/// Parse a vCPU count, 1..=254.
pub fn parse_cpus(s: &str) -> Result<u8, CpusError> {
    s.parse()
        .ok()
        .filter(|n| (1..=254).contains(n))
        .ok_or_else(|| CpusError(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("2G").ok(), Some(2 << 30));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert_eq!(parse_size("x").ok(), None);
        assert_eq!(parse_size("").ok(), None);
        assert_eq!(parse_size("99999999999999999999G").ok(), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("17179869184G").is_err());
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "bad size 'lots'"
        );
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1"), Ok(1));
        assert_eq!(parse_cpus("254"), Ok(254));
        for bad in ["0", "255", "-1", "", "two"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cpus("0").unwrap_err().to_string(),
            "expected 1..254, got '0'"
        );
    }
}
