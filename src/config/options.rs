//! The `key=value[,key=value]` option lists shared by `--disk`, `--net`, `--device` and
//! `--viommu`, and the value kinds they have in common.

/// An option list that could not be read; the `Display` is the message the user sees.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// A list element without `=`.
    #[error("{}option '{part}' is not key=value", prefix(family))]
    NotKeyValue {
        /// The option family (`disk`, `net`, ...; empty for none).
        family: &'static str,
        /// The element as given.
        part: String,
    },
    /// A key the family does not know (or an empty value where one is needed).
    #[error("unknown {}option '{part}'", prefix(family))]
    Unknown {
        /// The option family (`disk`, `net`, ...; empty for none).
        family: &'static str,
        /// The element as given.
        part: String,
    },
    /// A known key with a value it does not accept.
    #[error("{key}={value}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What was expected or what is wrong, e.g. `expected on or off`.
        reason: String,
    },
    /// A required key is missing, or keys that exclude each other are both given.
    #[error("{0}")]
    Required(&'static str),
    /// The leading word (e.g. `--viommu virtio`) is not one of the accepted ones.
    #[error("expected {expected}, got '{got}'")]
    Head {
        /// The accepted forms.
        expected: &'static str,
        /// The whole value as given.
        got: String,
    },
}

fn prefix(family: &str) -> String {
    if family.is_empty() {
        String::new()
    } else {
        format!("{family} ")
    }
}

/// The elements of `s` as `(key, value)` pairs, in order, each checked only when reached (so
/// the first bad element in the list is the one reported). An empty `s` is one empty element.
pub fn pairs<'a>(
    family: &'static str,
    s: &'a str,
) -> impl Iterator<Item = Result<(&'a str, &'a str), OptionError>> + 'a {
    s.split(',').map(move |part| {
        part.split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue {
                family,
                part: part.to_string(),
            })
    })
}

/// The error for an element whose key is unknown to `family`.
pub fn unknown(family: &'static str, key: &str, value: &str) -> OptionError {
    OptionError::Unknown {
        family,
        part: format!("{key}={value}"),
    }
}

/// The error for `key=value` with a value `key` does not take.
pub fn bad_value(key: &str, value: &str, reason: impl Into<String>) -> OptionError {
    OptionError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A switch spelled `on|true|yes|1` or `off|false|no|0`.
pub fn switch(key: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad_value(key, v, "expected on or off")),
    }
}

/// A switch spelled exactly `on` or `off`.
pub fn on_off(key: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(bad_value(key, v, "expected on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_in_order_first_error_wins() {
        let v: Vec<_> = pairs("disk", "a=1,b=,c=x=y").collect();
        assert_eq!(v, vec![Ok(("a", "1")), Ok(("b", "")), Ok(("c", "x=y"))]);
        let mut it = pairs("disk", "a=1,bogus,c");
        assert_eq!(it.next(), Some(Ok(("a", "1"))));
        assert_eq!(
            it.next().unwrap().unwrap_err().to_string(),
            "disk option 'bogus' is not key=value"
        );
        let e = pairs("", "").next().unwrap().unwrap_err();
        assert_eq!(e.to_string(), "option '' is not key=value");
    }

    #[test]
    fn messages() {
        assert_eq!(
            unknown("net", "x", "1").to_string(),
            "unknown net option 'x=1'"
        );
        assert_eq!(unknown("", "x", "1").to_string(), "unknown option 'x=1'");
        assert_eq!(
            switch("iommu", "maybe").unwrap_err().to_string(),
            "iommu=maybe: expected on or off"
        );
        assert_eq!(
            OptionError::Head {
                expected: "a or b",
                got: "c".into()
            }
            .to_string(),
            "expected a or b, got 'c'"
        );
    }

    #[test]
    fn switches() {
        for on in ["on", "true", "yes", "1"] {
            assert_eq!(switch("k", on), Ok(true));
        }
        for off in ["off", "false", "no", "0"] {
            assert_eq!(switch("k", off), Ok(false));
        }
        assert!(switch("k", "").is_err());
        assert_eq!(on_off("k", "on"), Ok(true));
        assert_eq!(on_off("k", "off"), Ok(false));
        assert!(on_off("k", "1").is_err());
        assert!(on_off("k", "yes").is_err());
    }
}
