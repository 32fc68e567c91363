//! `--watchdog SECS[,kmsg=on|off]` (or the `VMM_WATCHDOG` environment variable, same form).

use super::options::{bad_value, pairs, unknown, OptionError};

/// Environment variable read when `--watchdog` is not given (the test rig sets it).
pub const WATCHDOG_ENV: &str = "VMM_WATCHDOG";

/// The hang watchdog ([`crate::watchdog`]): report when no vCPU made progress, or one vCPU
/// stayed in one exit handler, for `limit_secs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchdogOptions {
    /// Seconds without progress before a report.
    pub limit_secs: u64,
    /// Copy each report line to `/dev/kmsg` too, so that it reaches the host's console even
    /// if the host dies before the VMM's stderr is read (nested test runs).
    pub kmsg: bool,
}

impl WatchdogOptions {
    /// Parse `SECS[,kmsg=on|off]`; SECS from 1 to 86400.
    pub fn parse(s: &str) -> Result<WatchdogOptions, OptionError> {
        let (head, rest) = match s.split_once(',') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        let limit_secs = head
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=86_400).contains(n))
            .ok_or_else(|| bad_value("SECS", head, "expected seconds from 1 to 86400"))?;
        let mut o = WatchdogOptions {
            limit_secs,
            kmsg: false,
        };
        for kv in rest.into_iter().flat_map(|r| pairs("watchdog", r)) {
            let (k, v) = kv?;
            match k {
                "kmsg" => {
                    o.kmsg = match v {
                        "on" | "1" => true,
                        "off" | "0" => false,
                        _ => return Err(bad_value(k, v, "expected on or off")),
                    }
                }
                _ => return Err(unknown("watchdog", k, v)),
            }
        }
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_kmsg() {
        assert_eq!(
            WatchdogOptions::parse("30"),
            Ok(WatchdogOptions {
                limit_secs: 30,
                kmsg: false
            })
        );
        assert_eq!(
            WatchdogOptions::parse("5,kmsg=on"),
            Ok(WatchdogOptions {
                limit_secs: 5,
                kmsg: true
            })
        );
        for bad in ["", "0", "-1", "x", "100000", "5,kmsg=maybe", "5,file=/x"] {
            assert!(WatchdogOptions::parse(bad).is_err(), "{bad}");
        }
    }
}
