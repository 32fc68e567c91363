//! `--serial stdout|file=PATH`: where COM1 output goes.

use std::path::PathBuf;

use super::options::OptionError;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    #[default]
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

impl SerialOutput {
    /// Parse `stdout` or `file=PATH` (PATH not empty).
    pub fn parse(s: &str) -> Result<SerialOutput, OptionError> {
        if s == "stdout" {
            Ok(SerialOutput::Stdout)
        } else if let Some(p) = s.strip_prefix("file=").filter(|p| !p.is_empty()) {
            Ok(SerialOutput::File(p.into()))
        } else {
            Err(OptionError::Expected {
                value: s.to_string(),
                expected: "stdout or file=PATH",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_parses() {
        assert_eq!(SerialOutput::parse("stdout"), Ok(SerialOutput::Stdout));
        assert_eq!(
            SerialOutput::parse("file=/tmp/s,x"),
            Ok(SerialOutput::File("/tmp/s,x".into()))
        );
        for bad in ["", "tty", "file=", "file", "Stdout", "stdout,file=/x"] {
            assert_eq!(
                SerialOutput::parse(bad).unwrap_err().to_string(),
                format!("expected stdout or file=PATH, got '{bad}'")
            );
        }
    }
}
