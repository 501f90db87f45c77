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

impl Eq for RegexValue {}

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

/// Numbers with a range and a name for what they are, so that a wrong value is refused
/// with what is allowed ("a port number 1-65535") rather than a type ("invalid u16").
pub(crate) mod num {
    use std::{collections::BTreeMap, fmt, marker::PhantomData};

    use serde::{de, Deserialize, Deserializer};

    /// A kind of number: its range and how to say it.
    pub(crate) trait Kind {
        const MIN: u64;
        const MAX: u64;
        const WHAT: &'static str;
    }

    /// A TCP port.
    pub(crate) struct Port;
    impl Kind for Port {
        const MIN: u64 = 1;
        const MAX: u64 = 65_535;
        const WHAT: &'static str = "a port number 1-65535";
    }

    /// A count, weight, limit or percentage (checked further where it is used).
    pub(crate) struct Count;
    impl Kind for Count {
        const MIN: u64 = 0;
        const MAX: u64 = u32::MAX as u64;
        const WHAT: &'static str = "a whole number from 0 to 4294967295";
    }

    /// An HTTP status code.
    pub(crate) struct Status;
    impl Kind for Status {
        const MIN: u64 = 100;
        const MAX: u64 = 599;
        const WHAT: &'static str = "an HTTP status code (100-599)";
    }

    /// A value of kind `K`.
    pub(crate) struct Of<K>(pub(crate) u64, PhantomData<K>);

    impl<'de, K: Kind> Deserialize<'de> for Of<K> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<K>(PhantomData<K>);
            impl<K: Kind> de::Visitor<'_> for V<K> {
                type Value = u64;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str(K::WHAT)
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                    if (K::MIN..=K::MAX).contains(&v) {
                        Ok(v)
                    } else {
                        Err(E::custom(format!("{v} is not {}", K::WHAT)))
                    }
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                    match u64::try_from(v) {
                        Ok(v) => self.visit_u64(v),
                        Err(_) => Err(E::custom(format!("{v} is not {}", K::WHAT))),
                    }
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
                    Err(E::custom(format!("{v} is not {}", K::WHAT)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                    Err(E::custom(format!("{v:?} is not {}", K::WHAT)))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<u64, E> {
                    Err(E::custom(format!("{v} is not {}", K::WHAT)))
                }
            }
            d.deserialize_any(V::<K>(PhantomData))
                .map(|v| Self(v, PhantomData))
        }
    }

    /// A port.
    pub(crate) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        Of::<Port>::deserialize(d).map(|p| p.0 as u16)
    }

    /// An optional port.
    pub(crate) fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        Option::<Of<Port>>::deserialize(d).map(|o| o.map(|p| p.0 as u16))
    }

    /// A list of ports.
    pub(crate) fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        Vec::<Of<Port>>::deserialize(d).map(|v| v.into_iter().map(|p| p.0 as u16).collect())
    }

    /// Ports by name.
    pub(crate) fn port_map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, u16>, D::Error> {
        BTreeMap::<String, Of<Port>>::deserialize(d)
            .map(|m| m.into_iter().map(|(k, p)| (k, p.0 as u16)).collect())
    }

    /// A count.
    pub(crate) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        Of::<Count>::deserialize(d).map(|c| c.0 as u32)
    }

    /// An optional count.
    pub(crate) fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<Of<Count>>::deserialize(d).map(|o| o.map(|c| c.0 as u32))
    }

    /// An optional percentage, 0 to 100, fractions allowed.
    pub(crate) fn opt_percent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        let v = Option::<f64>::deserialize(d)?;
        match v {
            Some(p) if !(0.0..=100.0).contains(&p) => Err(de::Error::custom(format!(
                "{p} is not a percentage from 0 to 100"
            ))),
            _ => Ok(v),
        }
    }

    /// HTTP status codes.
    pub(crate) fn statuses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
        Vec::<Of<Status>>::deserialize(d).map(|v| v.into_iter().map(|s| s.0 as u16).collect())
    }
}

/// Addresses, refused with what is expected.
pub(crate) mod addr {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use serde::{de, Deserialize, Deserializer};

    fn parse<'de, D: Deserializer<'de>, T: std::str::FromStr>(
        d: D,
        what: &str,
    ) -> Result<T, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|_| de::Error::custom(format!("{s:?} is not {what}")))
    }

    /// An IP address.
    pub(crate) fn ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
        parse(d, "an IP address (such as 10.0.0.5 or fd00::5)")
    }

    /// An optional IPv4 address.
    pub(crate) fn opt_ipv4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        s.parse().map(Some).map_err(|_| {
            de::Error::custom(format!("{s:?} is not an IPv4 address (such as 10.96.0.10)"))
        })
    }

    /// An address and port.
    pub(crate) fn socket<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        parse(
            d,
            "an address and port (such as 127.0.0.1:9001 or [::1]:9001)",
        )
    }
}
