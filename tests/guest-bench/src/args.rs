//! Command line: `guest-bench read --dev PATH --bs BYTES [--count N] [--seconds S]
//! [--pattern rand|seq] [--span BYTES] [--seed N] [--qd N] [--buf anon|huge] [--phase NAME]
//! [--account DEV]`.

use crate::Error;

/// Usage text.
pub const USAGE: &str = "\
usage: guest-bench read --dev PATH --bs BYTES [--count N] [--seconds S] [--pattern rand|seq]
                        [--span BYTES] [--seed N] [--warmup N] [--qd N] [--buf anon|huge]
                        [--phase NAME] [--account DEV]
  O_DIRECT reads of --bs bytes (a multiple of 512) at random (default) or sequential offsets
  within the first --span bytes of the device (default: the whole device), until --count
  requests are done or --seconds have passed (whichever first; default --seconds 3), after
  --warmup untimed requests (default 8). --qd N: N threads reading at once (default 1), each
  with its own buffer. --buf anon: buffers from the heap (default); huge: 2 MiB-aligned
  buffers, hugetlbfs pages when the kernel has some reserved, else transparent huge pages.
  --phase NAME: `BENCH-PHASE begin NAME` / `BENCH-PHASE end NAME` on stderr around the timed
  part (with a pause after each, for an observer of the console). --account DEV: guest-side
  counters of block device DEV (e.g. vda) before and after the timed part, their differences
  in the result line (acct_*). Prints one line:
    iops=... mbps=... bs=... requests=... seconds=... pattern=... qd=... buf=... [acct_...=...]";

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
    /// Requests in flight (reader threads).
    pub qd: u32,
    /// Where the buffers come from.
    pub buf: BufKind,
    /// Phase name for the console markers (empty: no markers).
    pub phase: String,
    /// Block device name whose guest-side counters are taken (empty: none).
    pub account: String,
}

/// Where the read buffers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// The heap, page-aligned (4 KiB pages, scattered physically).
    Anon,
    /// 2 MiB-aligned: hugetlbfs pages if reserved, else transparent huge pages.
    Huge,
}

/// Most reader threads.
pub const MAX_QD: u32 = 64;

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
        qd: 1,
        buf: BufKind::Anon,
        phase: String::new(),
        account: String::new(),
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
            "qd" => {
                a.qd = v
                    .parse()
                    .ok()
                    .filter(|q| (1..=MAX_QD).contains(q))
                    .ok_or_else(|| Error::Usage(format!("--qd {v}: 1..={MAX_QD}")))?
            }
            "buf" => {
                a.buf = match v.as_str() {
                    "anon" => BufKind::Anon,
                    "huge" => BufKind::Huge,
                    b => return Err(Error::Usage(format!("bad --buf {b:?}"))),
                }
            }
            "phase" | "account" => {
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(Error::Usage(format!("--{key} {v:?}: [A-Za-z0-9_-]+")));
                }
                if key == "phase" {
                    a.phase = v.clone();
                } else {
                    a.account = v.clone();
                }
            }
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
        assert_eq!((d.qd, d.buf), (1, BufKind::Anon));
        assert!(d.phase.is_empty() && d.account.is_empty());
        let q = p("read --dev x --bs 4K --qd 8 --buf huge --phase r4k-q8 --account vda").unwrap();
        assert_eq!((q.qd, q.buf), (8, BufKind::Huge));
        assert_eq!((q.phase.as_str(), q.account.as_str()), ("r4k-q8", "vda"));
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
            "read --dev x --bs 4096 --qd 0",
            "read --dev x --bs 4096 --qd 65",
            "read --dev x --bs 4096 --buf tiny",
            "read --dev x --bs 4096 --phase a/b",
            "read --dev x --bs 4096 --account ../vda",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
