//! Value types that validate themselves while they are deserialized, so that a bad value is
//! reported with the line and column of the YAML node it came from.

use std::{fmt, str::FromStr, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as Gateway API does: `250ms`, `2s`, `1m`, `1h`, or a combination (`1m30s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationValue(pub Duration);

impl FromStr for DurationValue {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid duration {s:?}: expected e.g. 250ms, 2s, 1m30s");
        if s.is_empty() {
            return Err(bad());
        }
        let (mut total, mut rest) = (Duration::ZERO, s);
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                _ => return Err(bad()),
            };
            total += unit;
            rest = &rest[unit_len..];
        }
        Ok(Self(total))
    }
}

impl fmt::Display for DurationValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for DurationValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A regular expression, compiled (and so checked) when it is read.
#[derive(Clone, Debug)]
pub struct RegexValue(pub regex::Regex);

impl<'de> Deserialize<'de> for RegexValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Anchor the pattern: Gateway API's RegularExpression matches the whole value.
        regex::Regex::new(&format!("^(?:{s})$"))
            .map(Self)
            .map_err(|e| de::Error::custom(format!("invalid regular expression {s:?}: {e}")))
    }
}

impl Serialize for RegexValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let p = self.0.as_str();
        s.serialize_str(&p[4..p.len() - 2])
    }
}

impl PartialEq for RegexValue {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// An HTTP header name, checked when it is read, stored lower-case.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if ok {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(de::Error::custom(format!("invalid header name {s:?}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            "250ms".parse::<DurationValue>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "1m30s".parse::<DurationValue>().unwrap().0,
            Duration::from_secs(90)
        );
        for bad in ["", "5", "s", "5x", "1.5s", "-1s"] {
            assert!(bad.parse::<DurationValue>().is_err(), "{bad}");
        }
    }
}
