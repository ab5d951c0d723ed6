//! Validation helpers: an error collector that tracks the field path, name checks, and the
//! small value types with their own syntax (durations, ports given as numbers or strings).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Collects `(field path, message)` pairs while walking a spec.
#[derive(Debug, Default)]
pub struct Errors {
    path: Vec<String>,
    /// What was found, paths relative to the resource root.
    pub found: Vec<(String, String)>,
}

impl Errors {
    /// Runs `f` with `segment` appended to the current path (`.name` or `[i]` style).
    pub fn at(&mut self, segment: impl Into<String>, f: impl FnOnce(&mut Self)) {
        self.path.push(segment.into());
        f(self);
        self.path.pop();
    }

    /// Records a problem at the current path plus `field` (empty for the current path).
    pub fn add(&mut self, field: &str, message: impl Into<String>) {
        let mut p = String::new();
        for s in self.path.iter().map(String::as_str).chain((!field.is_empty()).then_some(field)) {
            if !p.is_empty() && !s.starts_with('[') {
                p.push('.');
            }
            p.push_str(s);
        }
        self.found.push((p, message.into()));
    }

    /// Checks each element of a list under `name[i]`.
    pub fn each<T>(&mut self, name: &str, items: &[T], mut f: impl FnMut(&mut Self, &T)) {
        for (i, item) in items.iter().enumerate() {
            self.at(format!("{name}[{i}]"), |e| f(e, item));
        }
    }

    /// Records `message` at `field` unless `ok`.
    pub fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.add(field, message());
        }
    }
}

/// RFC 1123 label: what Kubernetes requires of namespace and most names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Checks a name field as an RFC 1123 label.
pub fn dns_label(e: &mut Errors, field: &str, value: &str) {
    e.check(is_dns_label(value), field, || format!("{value:?} is not an RFC 1123 label"));
}

/// A duration in the Gateway API's syntax: up to four `<number><unit>` parts, units h, m, s,
/// ms (such as `1m30s`, `250ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "String")]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Parses the Gateway API duration syntax.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration such as 10s, 1m30s or 250ms");
        let mut total = std::time::Duration::ZERO;
        let mut rest = s;
        let mut parts = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 5 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (std::time::Duration::from_millis(1), 2)
            } else {
                match rest.as_bytes().first() {
                    Some(b'h') => (std::time::Duration::from_secs(3600), 1),
                    Some(b'm') => (std::time::Duration::from_secs(60), 1),
                    Some(b's') => (std::time::Duration::from_secs(1), 1),
                    _ => return Err(bad()),
                }
            };
            rest = &rest[len..];
            total += unit * n as u32;
            parts += 1;
        }
        if parts == 0 || parts > 4 {
            return Err(bad());
        }
        Ok(Self(total))
    }
}

impl fmt::Display for Duration {
    /// The Gateway API syntax, largest units first (`1h2m3s4ms`), so it parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let parts = [
            (ms / 3_600_000, "h"),
            (ms / 60_000 % 60, "m"),
            (ms / 1_000 % 60, "s"),
            (ms % 1_000, "ms"),
        ];
        for (n, unit) in parts {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> Self {
        d.to_string()
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A TCP port written as a number or, as Istio policies do, a string of digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let n = match Raw::deserialize(d)? {
            Raw::N(n) => n,
            Raw::S(s) => s
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a port number")))?,
        };
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(Self(p)),
            _ => Err(serde::de::Error::custom(format!("port {n} is out of range 1-65535"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = |s: &str| Duration::parse(s).map(|d| d.0.as_millis());
        assert_eq!(ms("10s"), Ok(10_000));
        assert_eq!(ms("1m30s"), Ok(90_000));
        assert_eq!(ms("250ms"), Ok(250));
        assert_eq!(ms("1h"), Ok(3_600_000));
        for s in ["1h2m3s4ms", "250ms", "10s", "0s", "90m"] {
            let d = Duration::parse(s).unwrap();
            assert_eq!(Duration::parse(&d.to_string()), Ok(d), "{s} -> {d}");
        }
        assert_eq!(Duration::parse("90m").unwrap().to_string(), "1h30m");
        for bad in ["", "10", "s", "1.5s", "-1s", "1d", "123456s", "1h1m1s1ms1s"] {
            assert!(Duration::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(is_dns_label("shop-1"));
        assert!(!is_dns_label("Shop") && !is_dns_label("-a") && !is_dns_label(""));
        assert!(is_dns_subdomain("reviews.shop.svc"));
        assert!(!is_dns_subdomain("a..b"));
    }

    #[test]
    fn paths_join_fields_and_indexes() {
        let mut e = Errors::default();
        e.at("spec", |e| {
            e.each("rules", &[1, 2], |e, n| e.check(*n != 2, "weight", || "bad".into()))
        });
        assert_eq!(e.found, [("spec.rules[1].weight".to_string(), "bad".to_string())]);
    }
}
