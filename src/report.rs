//! How the VMM reports an error to the user: the error, then each of its causes.

use std::error::Error;
use std::fmt;

/// Displays an error and its `source()` chain on one line: `a: caused by b: caused by c`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": caused by {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer {0}")]
    struct Outer(&'static str, #[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn every_cause_once_in_order() {
        let e = Outer("x", Inner(std::io::Error::other("root")));
        assert_eq!(
            Chain(&e).to_string(),
            "outer x: caused by inner: caused by root"
        );
        let leaf = std::io::Error::other("alone");
        assert_eq!(Chain(&leaf).to_string(), "alone");
    }
}
