//! Names with rules, checked when the configuration is loaded: the JetStream stream, domain
//! and object-store bucket, and the inbound endpoint's path. Each is deserialised from its
//! text (or refused with the rule it breaks, under its key) and serialised back to it, so
//! nothing after the loader checks a name again.

use std::fmt;

/// Defines a newtype over `String` whose constructor is `check`, with the serde, display and
/// comparison impls every checked name shares.
macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(text: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&text).map(|()| $name(text))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(text: &str) -> Result<Self, String> {
                $name::try_from(text.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

checked_name!(
    /// A JetStream stream name: not empty, no whitespace, `.`, `*`, `>`, `/` or `\`.
    StreamName,
    |text| {
        if text.is_empty()
            || text
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(format!("{text:?} is not a valid stream name"));
        }
        Ok(())
    }
);

checked_name!(
    /// A JetStream domain: not empty, no whitespace, `.`, `*` or `>`.
    JetStreamDomain,
    |text| {
        if text.is_empty()
            || text
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'))
        {
            return Err(format!("{text:?} is not a valid JetStream domain"));
        }
        Ok(())
    }
);

checked_name!(
    /// An object-store bucket name: `[A-Za-z0-9_-]+`.
    BucketName,
    |text| {
        if text.is_empty()
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "{text:?} is not a valid bucket name ([A-Za-z0-9_-]+)"
            ));
        }
        Ok(())
    }
);

checked_name!(
    /// An endpoint's path: starts with `/`, or is empty to turn the endpoint off.
    EndpointPath,
    |text| {
        if !text.is_empty() && !text.starts_with('/') {
            return Err("must start with '/' (or be \"\" to disable)".into());
        }
        Ok(())
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_keeps_its_rule() {
        assert!(StreamName::try_from("CMC_EVENTS").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b", "a\\b"] {
            assert!(StreamName::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(JetStreamDomain::try_from("hub").is_ok());
        for bad in ["", "a.b", "a b", "*"] {
            assert!(JetStreamDomain::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(BucketName::try_from("CMC_INBOUND-2").is_ok());
        for bad in ["", "a.b", "a b", "ä"] {
            assert!(BucketName::try_from(bad).is_err(), "{bad:?}");
        }
        for good in ["", "/", "/webhooks/cmc/inbound"] {
            assert!(EndpointPath::try_from(good).is_ok(), "{good:?}");
        }
        assert!(EndpointPath::try_from("inbound").is_err());
        let name = StreamName::try_from("S").unwrap();
        assert_eq!(name, "S");
        assert_eq!(name.to_string(), "S");
        assert_eq!(String::from(name), "S");
    }
}
