//! Command line: `guest-bench read --dev PATH --bs BYTES [--count N] [--seconds S]
//! [--pattern rand|seq] [--span BYTES] [--seed N]`.

use crate::Error;

/// Usage text.
pub const USAGE: &str = "\
usage: guest-bench read --dev PATH --bs BYTES [--count N] [--seconds S] [--pattern rand|seq]
                        [--span BYTES] [--seed N] [--warmup N]
  O_DIRECT reads of --bs bytes (a multiple of 512) at random (default) or sequential offsets
  within the first --span bytes of the device (default: the whole device), until --count
  requests are done or --seconds have passed (whichever first; default --seconds 3), after
  --warmup untimed requests (default 8). Prints one line:
    iops=... mbps=... bs=... requests=... seconds=... pattern=...";

/// Offsets in the order they are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random, block-aligned.
    Random,
    /// One after the other, wrapping at the span.
    Sequential,
}

/// A parsed `read` command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadArgs {
    /// Block device (or file) to read.
    pub dev: String,
    /// Bytes per request.
    pub bs: u64,
    /// Most requests (timed ones).
    pub count: u64,
    /// Longest timed run, in milliseconds.
    pub millis: u64,
    /// Offset order.
    pub pattern: Pattern,
    /// Bytes of the device used (0 = all).
    pub span: u64,
    /// Seed of the random offsets.
    pub seed: u64,
    /// Untimed requests first.
    pub warmup: u64,
}

/// Largest block size accepted (the buffer is allocated once).
pub const MAX_BS: u64 = 64 << 20;

/// Parse a decimal number with an optional K/M/G suffix (powers of 1024).
pub fn size(s: &str) -> Result<u64, Error> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::Usage(format!("bad number {s:?}")))
}

/// Parse `args` (without the program name).
pub fn parse(args: &[String]) -> Result<ReadArgs, Error> {
    match args.first().map(String::as_str) {
        Some("read") => {}
        Some(m) => return Err(Error::Usage(format!("unknown mode {m:?}"))),
        None => return Err(Error::Usage("no mode".into())),
    }
    let mut a = ReadArgs {
        dev: String::new(),
        bs: 0,
        count: u64::MAX,
        millis: 3000,
        pattern: Pattern::Random,
        span: 0,
        seed: 1,
        warmup: 8,
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut it = args[1..].iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| Error::Usage(format!("unexpected argument {k:?}")))?;
        let v = it
            .next()
            .ok_or_else(|| Error::Usage(format!("--{key} needs a value")))?;
        if !seen.insert(key.to_string()) {
            return Err(Error::Usage(format!("--{key} given twice")));
        }
        match key {
            "dev" => a.dev = v.clone(),
            "bs" => a.bs = size(v)?,
            "count" => a.count = size(v)?,
            "seconds" => {
                let s: f64 = v
                    .parse()
                    .map_err(|_| Error::Usage(format!("bad --seconds {v:?}")))?;
                if !(s > 0.0 && s <= 3600.0) {
                    return Err(Error::Usage(format!("--seconds {v}: 0..3600")));
                }
                a.millis = (s * 1000.0) as u64;
            }
            "pattern" => {
                a.pattern = match v.as_str() {
                    "rand" | "random" => Pattern::Random,
                    "seq" | "sequential" => Pattern::Sequential,
                    p => return Err(Error::Usage(format!("bad --pattern {p:?}"))),
                }
            }
            "span" => a.span = size(v)?,
            "seed" => a.seed = size(v)?,
            "warmup" => a.warmup = size(v)?,
            k => return Err(Error::Usage(format!("unknown option --{k}"))),
        }
    }
    if a.dev.is_empty() {
        return Err(Error::Usage("--dev is required".into()));
    }
    if a.bs == 0 || a.bs % 512 != 0 || a.bs > MAX_BS {
        return Err(Error::Usage(format!(
            "--bs {}: a multiple of 512 up to {MAX_BS}",
            a.bs
        )));
    }
    if a.count == 0 {
        return Err(Error::Usage("--count 0".into()));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ReadArgs, Error> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn parses_options_and_suffixes() {
        let a = p("read --dev /dev/vda --bs 1M --count 100 --pattern seq --span 32M --seconds 1.5")
            .unwrap();
        assert_eq!(a.dev, "/dev/vda");
        assert_eq!(a.bs, 1 << 20);
        assert_eq!(a.count, 100);
        assert_eq!(a.pattern, Pattern::Sequential);
        assert_eq!(a.span, 32 << 20);
        assert_eq!(a.millis, 1500);
        let d = p("read --dev x --bs 4096").unwrap();
        assert_eq!(
            (d.count, d.millis, d.pattern),
            (u64::MAX, 3000, Pattern::Random)
        );
    }

    #[test]
    fn rejects_bad_command_lines() {
        for bad in [
            "",
            "write --dev x --bs 4096",
            "read --bs 4096",
            "read --dev x",
            "read --dev x --bs 100",
            "read --dev x --bs 1G",
            "read --dev x --bs 4096 --count 0",
            "read --dev x --bs 4096 --seconds 0",
            "read --dev x --bs 4096 --seconds nan",
            "read --dev x --bs 4096 --pattern zigzag",
            "read --dev x --bs 4096 --bs 512",
            "read --dev x --bs 4096 --frob 1",
            "read --dev x --bs 4096 --count",
            "read --dev x --bs 99999999999999999999",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
