//! Printing an error with its causes, for the user: `disk /x.img: caused by: No such file or
//! directory (os error 2)`.

use std::error::Error;
use std::fmt;

/// An error and its chain of sources on one line, each cause after `: caused by: `. A cause
/// whose message its parent already shows (many errors put their source in their own
/// message) is not repeated.
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let msg = e.to_string();
            if !msg.is_empty() && !shown.contains(&msg) {
                write!(f, ": caused by: {msg}")?;
            }
            shown = msg;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("disk {0}")]
        Disk(&'static str, #[source] Middle),
    }

    #[derive(Debug, thiserror::Error)]
    enum Middle {
        #[error(transparent)]
        Io(#[from] io::Error),
        /// Shows its source in its own message, as many library errors do.
        #[error("opening: {0}")]
        Open(#[source] io::Error),
    }

    #[test]
    fn causes_follow_on_one_line() {
        let e = Outer::Disk("/x.img", io::Error::from(io::ErrorKind::NotFound).into());
        assert_eq!(
            ErrorChain(&e).to_string(),
            "disk /x.img: caused by: entity not found"
        );
        let plain = io::Error::other("no");
        assert_eq!(ErrorChain(&plain).to_string(), "no");
    }

    #[test]
    fn a_cause_already_shown_is_not_repeated() {
        let e = Outer::Disk(
            "/x.img",
            Middle::Open(io::Error::from(io::ErrorKind::PermissionDenied)),
        );
        assert_eq!(
            ErrorChain(&e).to_string(),
            "disk /x.img: caused by: opening: permission denied"
        );
    }
}
