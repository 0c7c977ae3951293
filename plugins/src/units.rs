//! Units used in configuration: sizes ("256KiB", "8GiB") and periods ("500ms", "30s", "7d").
//!
//! They live here, below the gateway, so sink configs and the gateway's own config share one
//! parser and one error wording.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A size in bytes, written in config as an integer or as "64KiB", "8GiB", "10MB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct ByteSize(pub u64);

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

/// `"<digits><unit>"` as a whole number times the unit's factor from `units`; `what` and
/// `example` word the error.
fn parse_scaled(s: &str, units: &[(&str, u64)], what: &str, example: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a {what} (expected e.g. {example})"))?;
    let unit = unit.trim();
    let factor = units
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|(_, f)| *f)
        .ok_or_else(|| {
            let names: Vec<&str> = units
                .iter()
                .map(|(u, _)| *u)
                .filter(|u| !u.is_empty())
                .collect();
            format!(
                "unknown {what} unit {unit:?} in {s:?} (use {})",
                names.join(", ")
            )
        })?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Config values written either as a bare integer or as text with a unit.
fn int_or_text<'de, D, T>(d: D, from_int: fn(u64) -> T) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(from_int(n)),
        Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

const TIME_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scaled(s, SIZE_UNITS, "size", "4096, \"256KiB\", \"8GiB\"").map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_text(d, ByteSize)
    }
}

/// A span of time, written in config as milliseconds or as "500ms", "30s", "5m", "2h", "7d".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(into = "u64")]
pub struct Period(pub Duration);

impl From<Period> for u64 {
    fn from(p: Period) -> u64 {
        u64::try_from(p.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Period {
    /// A period of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Period(Duration::from_secs(secs))
    }
    /// A period of milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Period(Duration::from_millis(ms))
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scaled(s, TIME_UNITS, "period", "500, \"500ms\", \"30s\", \"7d\"")
            .map(Period::from_millis)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_text(d, Period::from_millis)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn periods_parse_with_units() {
        assert_eq!(
            "500ms".parse::<Period>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("30s".parse::<Period>().unwrap().0, Duration::from_secs(30));
        assert_eq!(
            "7d".parse::<Period>().unwrap().0,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            "250".parse::<Period>().unwrap().0,
            Duration::from_millis(250)
        );
        let err = "3 weeks".parse::<Period>().unwrap_err();
        assert!(err.contains("unknown period unit"), "{err}");
    }
}
