//! Command line: `guest-vfio <mode> [--device BDF] [--iova ADDR] [mode options]`.

use crate::Error;

/// Usage text.
pub const USAGE: &str = "\
usage: guest-vfio <mode> [--device BDF|PATH] [--iova ADDR]
  maps --size 4096|2097152 --count N     time N maps then N unmaps of one buffer
  errors                                 check VFIO type1 error semantics
  virtio-blk-read --sector S [--timeout-ms T]
                                         read one sector of a virtio-blk function via VFIO
  shadow-blk-read --sector S [--timeout-ms T]
                                         the same through viommu's Shadow and StaticMapping
numbers may be decimal or 0x-hex; --device defaults to the first vfio-pci device
(a virtio-blk one for virtio-blk-read); --iova defaults to a free spot in the host's ranges";

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Map/unmap rates.
    Maps {
        /// Bytes per mapping.
        size: u64,
        /// Mappings.
        count: u64,
    },
    /// Error-semantics checks.
    Errors,
    /// Read one sector.
    BlkRead {
        /// Sector (512 bytes) to read.
        sector: u64,
        /// Completion timeout.
        timeout_ms: u64,
    },
    /// Read one sector through the shadow engine, then the static mapping.
    ShadowBlkRead {
        /// Sector (512 bytes) to read.
        sector: u64,
        /// Completion timeout.
        timeout_ms: u64,
    },
}

/// Parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    /// The mode.
    pub mode: Mode,
    /// `--device`, if given.
    pub device: Option<String>,
    /// `--iova`, if given.
    pub iova: Option<u64>,
}

/// Most mappings `maps` makes (type1 allows 65535 per container by default).
pub const MAX_COUNT: u64 = 1 << 20;

/// Parse a decimal or 0x-hex number.
pub fn number(s: &str) -> Result<u64, Error> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| Error::Usage(format!("bad number {s:?}")))
}

/// Parse `args` (without the program name).
pub fn parse(args: &[String]) -> Result<Args, Error> {
    let mode = args.first().ok_or_else(|| Error::Usage("no mode".into()))?;
    let mut opts = std::collections::BTreeMap::new();
    let mut it = args[1..].iter();
    while let Some(k) = it.next() {
        let key = k
            .strip_prefix("--")
            .ok_or_else(|| Error::Usage(format!("unexpected argument {k:?}")))?;
        let v = it
            .next()
            .ok_or_else(|| Error::Usage(format!("--{key} needs a value")))?;
        if opts.insert(key.to_string(), v.clone()).is_some() {
            return Err(Error::Usage(format!("--{key} given twice")));
        }
    }
    let mut take = |k: &str| opts.remove(k);
    let device = take("device");
    let iova = take("iova").map(|v| number(&v)).transpose()?;
    let mode = match mode.as_str() {
        "maps" => {
            let size = number(&take("size").unwrap_or_else(|| "4096".into()))?;
            let count = number(&take("count").unwrap_or_else(|| "1000".into()))?;
            if size == 0 || size % 4096 != 0 {
                return Err(Error::Usage(format!("--size {size}: a multiple of 4096")));
            }
            if count == 0 || count > MAX_COUNT {
                return Err(Error::Usage(format!("--count {count}: 1..={MAX_COUNT}")));
            }
            Mode::Maps { size, count }
        }
        "errors" => Mode::Errors,
        "virtio-blk-read" | "shadow-blk-read" => {
            let sector = number(
                &take("sector").ok_or_else(|| Error::Usage("--sector is required".into()))?,
            )?;
            let timeout_ms = number(&take("timeout-ms").unwrap_or_else(|| "10000".into()))?;
            if mode == "virtio-blk-read" {
                Mode::BlkRead { sector, timeout_ms }
            } else {
                Mode::ShadowBlkRead { sector, timeout_ms }
            }
        }
        m => return Err(Error::Usage(format!("unknown mode {m:?}"))),
    };
    if let Some(k) = opts.keys().next() {
        return Err(Error::Usage(format!("unknown option --{k}")));
    }
    Ok(Args { mode, device, iova })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Args, Error> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn modes_and_options() {
        assert_eq!(
            p("maps --size 2097152 --count 0x10 --device 00:04.0").unwrap(),
            Args {
                mode: Mode::Maps {
                    size: 2 << 20,
                    count: 16
                },
                device: Some("00:04.0".into()),
                iova: None
            }
        );
        assert_eq!(p("errors --iova 0x100000").unwrap().iova, Some(0x10_0000));
        assert_eq!(
            p("shadow-blk-read --sector 3 --timeout-ms 50")
                .unwrap()
                .mode,
            Mode::ShadowBlkRead {
                sector: 3,
                timeout_ms: 50
            }
        );
        assert_eq!(
            p("virtio-blk-read --sector 7").unwrap().mode,
            Mode::BlkRead {
                sector: 7,
                timeout_ms: 10000
            }
        );
    }

    #[test]
    fn bad_command_lines() {
        for bad in [
            "",
            "frob",
            "maps --size 100",
            "maps --count 0",
            "maps --count 99999999",
            "maps --size",
            "maps stray",
            "errors --bogus 1",
            "virtio-blk-read",
            "virtio-blk-read --sector x",
            "errors --iova 1 --iova 2",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
