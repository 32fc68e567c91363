//! The `key=value[,key=value]` option lists of `--disk`, `--net`, `--device` and `--viommu`:
//! one splitter and the typed readers every family uses for its values.
//!
//! Items are read in order and the first bad one is the error, as a user reads the list.

use std::str::FromStr;

use super::net::MacError;

/// `on|true|yes|1` and `off|false|no|0` (`--disk`, `--net`).
pub const SWITCH: &[(&str, bool)] = &[
    ("on", true),
    ("true", true),
    ("yes", true),
    ("1", true),
    ("off", false),
    ("false", false),
    ("no", false),
    ("0", false),
];

/// `on` and `off` only (`--device`).
pub const ON_OFF: &[(&str, bool)] = &[("on", true), ("off", false)];

/// What is wrong in an option value. The `Display` is the message the user reads after the
/// option's name (`--disk: readonly=maybe: expected on or off`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// An item without `=`; `noun` names the list's items (`disk option`).
    #[error("{noun} '{item}' is not key=value")]
    NotKeyValue {
        /// What the list's items are called.
        noun: &'static str,
        /// The item as given.
        item: String,
    },
    /// A key the list does not know, or one whose value may not be empty.
    #[error("unknown {noun} '{item}'")]
    Unknown {
        /// What the list's items are called.
        noun: &'static str,
        /// The item as given (`key=value`).
        item: String,
    },
    /// A value its key does not accept.
    #[error("{key}={value}: expected {expected}")]
    Invalid {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
    /// A whole option value that is none of the accepted forms.
    #[error("expected {expected}, got '{value}'")]
    Expected {
        /// The value as given.
        value: String,
        /// The accepted forms.
        expected: &'static str,
    },
    /// A required key is missing; the message names it.
    #[error("{0}")]
    Missing(&'static str),
    /// Keys that exclude each other were both given; the message names them.
    #[error("{0}")]
    Conflict(&'static str),
    /// `mac=` is not a unicast Ethernet address.
    #[error("mac={value}: {source}")]
    Mac {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        source: MacError,
    },
}

/// One `key=value` item of an option list (split at the first `=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item<'a> {
    noun: &'static str,
    /// The key.
    pub key: &'a str,
    /// The value (possibly empty).
    pub value: &'a str,
}

/// The items of `list`, split at `,`, in order; an item without `=` is an error where it
/// stands. `noun` names the items in messages (`disk option`).
pub fn items<'a>(
    noun: &'static str,
    list: &'a str,
) -> impl Iterator<Item = Result<Item<'a>, OptionError>> + 'a {
    list.split(',').map(move |part| match part.split_once('=') {
        Some((key, value)) => Ok(Item { noun, key, value }),
        None => Err(OptionError::NotKeyValue {
            noun,
            item: part.to_string(),
        }),
    })
}

impl<'a> Item<'a> {
    /// This item is not one the list knows.
    pub fn unknown(&self) -> OptionError {
        OptionError::Unknown {
            noun: self.noun,
            item: format!("{}={}", self.key, self.value),
        }
    }

    /// This item's value is not what its key accepts (`expected`).
    pub fn invalid(&self, expected: &'static str) -> OptionError {
        OptionError::Invalid {
            key: self.key.to_string(),
            value: self.value.to_string(),
            expected,
        }
    }

    /// The value, unless it is empty.
    pub fn non_empty(&self) -> Option<&'a str> {
        Some(self.value).filter(|v| !v.is_empty())
    }

    /// The value of the first of `choices` (word, value) whose word it is.
    pub fn choice<T: Copy>(
        &self,
        choices: &[(&str, T)],
        expected: &'static str,
    ) -> Result<T, OptionError> {
        choices
            .iter()
            .find(|(word, _)| *word == self.value)
            .map(|&(_, v)| v)
            .ok_or_else(|| self.invalid(expected))
    }

    /// An on/off switch written as one of [`SWITCH`].
    pub fn switch(&self) -> Result<bool, OptionError> {
        self.choice(SWITCH, "on or off")
    }

    /// The value as a number that `ok` accepts.
    pub fn number<T: FromStr>(
        &self,
        ok: impl Fn(&T) -> bool,
        expected: &'static str,
    ) -> Result<T, OptionError> {
        self.value
            .parse::<T>()
            .ok()
            .filter(|n| ok(n))
            .ok_or_else(|| self.invalid(expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(list: &str) -> Result<Vec<(&str, &str)>, OptionError> {
        items("test option", list)
            .map(|i| i.map(|i| (i.key, i.value)))
            .collect()
    }

    #[test]
    fn splits_at_commas_and_the_first_equals() {
        assert_eq!(
            all("a=1,b=,c=x=y").unwrap(),
            vec![("a", "1"), ("b", ""), ("c", "x=y")]
        );
        let e = all("a=1,b,c").unwrap_err();
        assert_eq!(e.to_string(), "test option 'b' is not key=value");
        assert_eq!(
            all("").unwrap_err().to_string(),
            "test option '' is not key=value"
        );
        assert!(all("a=1,").is_err());
    }

    #[test]
    fn the_first_bad_item_is_the_error() {
        // A bad value before a malformed item is reported first, as the list is read.
        let mut it = items("test option", "k=maybe,x");
        assert_eq!(
            it.next()
                .unwrap()
                .unwrap()
                .switch()
                .unwrap_err()
                .to_string(),
            "k=maybe: expected on or off"
        );
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    fn item(s: &str) -> Item<'_> {
        items("test option", s).next().unwrap().unwrap()
    }

    #[test]
    fn typed_readers() {
        for (v, want) in SWITCH {
            assert_eq!(item(&format!("k={v}")).switch(), Ok(*want));
        }
        assert_eq!(
            item("k=On").switch(),
            Err(OptionError::Invalid {
                key: "k".into(),
                value: "On".into(),
                expected: "on or off"
            })
        );
        assert_eq!(item("k=on").choice(ON_OFF, "on or off"), Ok(true));
        assert!(item("k=yes").choice(ON_OFF, "on or off").is_err());
        assert_eq!(item("n=12").number::<u32>(|&n| n > 0, "N"), Ok(12));
        assert_eq!(
            item("n=0")
                .number::<u32>(|&n| n > 0, "N")
                .unwrap_err()
                .to_string(),
            "n=0: expected N"
        );
        assert!(item("n=-1").number::<u32>(|_| true, "N").is_err());
        assert!(item("n=99999999999999999999")
            .number::<u32>(|_| true, "N")
            .is_err());
        assert_eq!(item("k=").non_empty(), None);
        assert_eq!(item("k=v").non_empty(), Some("v"));
        assert_eq!(
            item("k=v").unknown().to_string(),
            "unknown test option 'k=v'"
        );
    }
}
