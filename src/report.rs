//! How the VMM reports an error to the user: the error, then each of its causes.

use std::error::Error;
use std::fmt;

/// Displays an error and its `source()` chain on one line: `a: caused by b: caused by c`.
///
/// A cause whose message the previous one already shows is left out: many library errors
/// (linux-loader, vfio-ioctls, seccompiler) put their source in their own message and return
/// it from `source()` too, which would print it twice.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let msg = c.to_string();
            if !shown.contains(&msg) {
                write!(f, ": caused by {msg}")?;
            }
            shown = msg;
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

    /// Shows its source in its own message and returns it as `source()` too.
    #[derive(Debug, thiserror::Error)]
    #[error("wrapped: {0}")]
    struct Wrapping(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot load kernel")]
    struct Load(#[source] linux_loader::loader::Error);

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

    #[test]
    fn a_cause_its_parent_shows_is_not_repeated() {
        let e = Wrapping(std::io::Error::other("root"));
        assert_eq!(Chain(&e).to_string(), "wrapped: root");
        // linux-loader's bzImage error shows its source and returns it.
        let e = Load(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        ));
        assert_eq!(
            Chain(&e).to_string(),
            "cannot load kernel: caused by Kernel Loader: failed to load bzImage kernel image: \
             Kernel Loader: Invalid bzImage"
        );
    }
}
