//! `parse_time(pattern, timestamp[, timezone])` (iot-sql-functions): a Unix time in milliseconds
//! formatted by a Joda-Time pattern (`DateTimeFormat`) in a time zone (default UTC); and
//! `time_to_epoch(text, pattern)`: a date/time text read by a JDK `DateTimeFormatter` pattern,
//! as Unix milliseconds (a text with no zone is UTC; no time of day is midnight).
//!
//! The pattern letters are Joda-Time's: `G` era, `C` century, `Y` year of era, `y` year, `x`
//! week-based year, `w` week, `e` day of week as a number, `E` day of week as text, `D` day of
//! year, `M` month (3 or more letters: text), `d` day of month, `a` AM/PM, `K`/`h`/`H`/`k` hours
//! (0-11, 1-12, 0-23, 1-24), `m` minute, `s` second, `S` fraction of a second, `z` the zone's
//! abbreviation, `Z` its offset (`Z` -0800, `ZZ` -08:00, `ZZZ` the zone id); text in single
//! quotes is literal (`''` is a quote); other non-letters are copied. A letter Joda-Time does
//! not know, `zzzz` (the zone's long name, which the time zone database here does not have), a
//! time zone it does not name or a timestamp out of range give Undefined.

use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Offset, TimeZone, Timelike};
use chrono_tz::{OffsetName, Tz};
use datafusion::arrow::array::{Array, ArrayRef, StringArray};
use datafusion::common::Result;

use crate::values::{self, Kind};

/// The UDF's evaluation: arguments are the pattern, the time (converted to an Int), and the
/// optional zone, each already the batch's length.
pub(crate) fn parse_time(a: &[ArrayRef]) -> Result<ArrayRef> {
    let kind = |a: &ArrayRef| Kind::of_type(a.data_type());
    let patterns = values::texts(&a[0], kind(&a[0]))?;
    let times = values::ints(&a[1], kind(&a[1]))?;
    let zones = match a.get(2) {
        Some(z) => Some(values::texts(z, kind(z))?),
        None => None,
    };
    let out: StringArray = (0..patterns.len())
        .map(|i| {
            let pattern = patterns.is_valid(i).then(|| patterns.value(i))?;
            let ms = times.is_valid(i).then(|| times.value(i))?;
            let zone: Tz = match &zones {
                Some(z) => z.is_valid(i).then(|| z.value(i))?.parse().ok()?,
                None => Tz::UTC,
            };
            format(pattern, zone.timestamp_millis_opt(ms).single()?)
        })
        .collect();
    Ok(Arc::new(out))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A piece of a date/time pattern: text to write or match as it is, or a field letter
/// repeated `n` times. Joda-Time and the JDK quote alike: text in single quotes is literal, and
/// `''` is one quote inside quotes or out.
enum Piece {
    Text(String),
    Field(char, usize),
}

fn pieces(pattern: &str) -> Vec<Piece> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            if chars.get(i + 1) == Some(&'\'') {
                text.push('\'');
                i += 2;
                continue;
            }
            i += 1;
            while let Some(&q) = chars.get(i) {
                if q == '\'' && chars.get(i + 1) == Some(&'\'') {
                    text.push('\'');
                    i += 2;
                } else if q == '\'' {
                    i += 1;
                    break;
                } else {
                    text.push(q);
                    i += 1;
                }
            }
            continue;
        }
        if !c.is_ascii_alphabetic() {
            text.push(c);
            i += 1;
            continue;
        }
        let mut n = 1;
        while chars.get(i + n) == Some(&c) {
            n += 1;
        }
        i += n;
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        out.push(Piece::Field(c, n));
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

/// `t` by the Joda-Time `pattern`, or `None` when the pattern has what it cannot give.
fn format(pattern: &str, t: DateTime<Tz>) -> Option<String> {
    let mut out = String::new();
    for piece in pieces(pattern) {
        match piece {
            Piece::Text(text) => out.push_str(&text),
            Piece::Field(c, n) => field(&mut out, c, n, &t)?,
        }
    }
    Some(out)
}

/// A number padded with zeros to `width` digits.
fn number(out: &mut String, v: i64, width: usize) {
    if v < 0 {
        let _ = write!(out, "-{:0width$}", -v);
    } else {
        let _ = write!(out, "{v:0width$}");
    }
}

/// Text: the full form for 4 or more letters, else the short one.
fn text(out: &mut String, full: &str, n: usize) {
    if n >= 4 {
        out.push_str(full);
    } else {
        out.extend(full.chars().take(3));
    }
}

fn field(out: &mut String, c: char, n: usize, t: &DateTime<Tz>) -> Option<()> {
    let year = i64::from(t.year());
    match c {
        'G' => out.push_str(if year > 0 { "AD" } else { "BC" }),
        'C' => number(out, year.abs() / 100, n),
        // Two letters: the year's last two digits (Joda-Time's "yy").
        'y' | 'Y' if n == 2 => number(out, year.rem_euclid(100), 2),
        'y' => number(out, year, n),
        'Y' => number(out, if year > 0 { year } else { 1 - year }, n),
        'x' if n == 2 => number(out, i64::from(t.iso_week().year()).rem_euclid(100), 2),
        'x' => number(out, i64::from(t.iso_week().year()), n),
        'w' => number(out, i64::from(t.iso_week().week()), n),
        'e' => number(out, i64::from(t.weekday().number_from_monday()), n),
        'E' => text(out, DAYS[t.weekday().num_days_from_monday() as usize], n),
        'D' => number(out, i64::from(t.ordinal()), n),
        'M' if n >= 3 => text(out, MONTHS[t.month0() as usize], n),
        'M' => number(out, i64::from(t.month()), n),
        'd' => number(out, i64::from(t.day()), n),
        'a' => out.push_str(if t.hour() < 12 { "AM" } else { "PM" }),
        'K' => number(out, i64::from(t.hour() % 12), n),
        'h' => number(out, i64::from(t.hour12().1), n),
        'H' => number(out, i64::from(t.hour()), n),
        'k' => number(out, i64::from(if t.hour() == 0 { 24 } else { t.hour() }), n),
        'm' => number(out, i64::from(t.minute()), n),
        's' => number(out, i64::from(t.second()), n),
        'S' => {
            // The fraction's first n digits (milliseconds, then zeros).
            let millis = format!("{:03}", t.timestamp_subsec_millis());
            out.extend(millis.chars().chain(std::iter::repeat('0')).take(n));
        }
        'z' if n >= 4 => return None,
        'z' => out.push_str(t.offset().abbreviation()?),
        'Z' if n >= 3 => out.push_str(t.timezone().name()),
        'Z' => {
            let secs = i64::from(t.offset().fix().local_minus_utc());
            let sign = if secs < 0 { '-' } else { '+' };
            let (h, m) = (secs.abs() / 3600, secs.abs() % 3600 / 60);
            if n == 1 {
                let _ = write!(out, "{sign}{h:02}{m:02}");
            } else {
                let _ = write!(out, "{sign}{h:02}:{m:02}");
            }
        }
        _ => return None,
    }
    Some(())
}

/// `time_to_epoch(text, pattern)`'s evaluation: each row's text read by its pattern; a text
/// that does not match, or a date that does not exist, gives Undefined.
pub(crate) fn time_to_epoch(a: &[ArrayRef]) -> Result<ArrayRef> {
    let kind = |a: &ArrayRef| Kind::of_type(a.data_type());
    let texts = values::texts(&a[0], kind(&a[0]))?;
    let patterns = values::texts(&a[1], kind(&a[1]))?;
    let out: datafusion::arrow::array::Int64Array = (0..texts.len())
        .map(|i| {
            let text = texts.is_valid(i).then(|| texts.value(i))?;
            let pattern = patterns.is_valid(i).then(|| patterns.value(i))?;
            read(text, pattern)
        })
        .collect();
    Ok(Arc::new(out))
}

/// A date/time being read.
#[derive(Default)]
struct Parts {
    year: Option<i32>,
    month: Option<u32>,
    day: Option<u32>,
    hour: u32,
    pm: Option<bool>,
    minute: u32,
    second: u32,
    millis: u32,
    zone: Option<Zone>,
}

enum Zone {
    Fixed(chrono::FixedOffset),
    Named(Tz),
}

/// Up to `max` ASCII digits at the front of `s` (at least one), and the rest.
fn digits(s: &str, max: usize) -> Option<(u32, &str)> {
    let n = s.bytes().take(max).take_while(u8::is_ascii_digit).count();
    (n > 0).then(|| Some((s[..n].parse().ok()?, &s[n..])))?
}

/// One of `names` (any case, full or its first three letters) at the front of `s`: its index.
fn name<'a>(s: &'a str, names: &[&str]) -> Option<(usize, &'a str)> {
    let lower = s.to_ascii_lowercase();
    for (i, n) in names.iter().enumerate() {
        let n = n.to_ascii_lowercase();
        if lower.starts_with(&n) {
            return Some((i, &s[n.len()..]));
        }
    }
    for (i, n) in names.iter().enumerate() {
        let short = n[..3].to_ascii_lowercase();
        if lower.starts_with(&short) {
            return Some((i, &s[3..]));
        }
    }
    None
}

/// An offset (`Z`, `+01`, `+0100`, `+01:00`) at the front of `s`.
fn offset(s: &str) -> Option<(chrono::FixedOffset, &str)> {
    if let Some(rest) = s.strip_prefix('Z') {
        return Some((chrono::FixedOffset::east_opt(0)?, rest));
    }
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, rest) = digits(&s[1..], 2)?;
    let rest = rest.strip_prefix(':').unwrap_or(rest);
    let (m, rest) = digits(rest, 2).unwrap_or((0, rest));
    let secs = i32::try_from(h * 3600 + m * 60).ok()?;
    Some((chrono::FixedOffset::east_opt(sign * secs)?, rest))
}

/// A zone id at the front of `s`: an IANA name, or `UTC`/`GMT`/`UT` with an optional offset
/// (`UTC+01:00`), or an offset.
fn zone(s: &str) -> Option<(Zone, &str)> {
    if let Some((o, rest)) = offset(s) {
        return Some((Zone::Fixed(o), rest));
    }
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || "/_-+:".contains(c)))
        .unwrap_or(s.len());
    let (id, rest) = s.split_at(end);
    for prefix in ["UTC", "GMT", "UT"] {
        if let Some(after) = id.strip_prefix(prefix) {
            if after.is_empty() {
                return Some((Zone::Fixed(chrono::FixedOffset::east_opt(0)?), rest));
            }
            if let Some((o, "")) = offset(after) {
                return Some((Zone::Fixed(o), rest));
            }
        }
    }
    Some((Zone::Named(id.parse().ok()?), rest))
}

/// `text` read by the JDK pattern, as Unix milliseconds.
fn read(text: &str, pattern: &str) -> Option<i64> {
    let mut s = text;
    let mut p = Parts::default();
    for piece in pieces(pattern) {
        let (c, n) = match piece {
            Piece::Text(literal) => {
                s = s.strip_prefix(literal.as_str())?;
                continue;
            }
            Piece::Field(c, n) => (c, n),
        };
        let width = if n == 1 { 2 } else { n };
        s = match c {
            'y' | 'u' if n == 2 => {
                let (v, rest) = digits(s, 2)?;
                p.year = Some(2000 + i32::try_from(v).ok()?);
                rest
            }
            'y' | 'u' => {
                let (v, rest) = digits(s, n.max(4))?;
                p.year = Some(i32::try_from(v).ok()?);
                rest
            }
            'M' | 'L' if n >= 3 => {
                let (m, rest) = name(s, &MONTHS)?;
                p.month = Some(u32::try_from(m).ok()? + 1);
                rest
            }
            'M' | 'L' => {
                let (v, rest) = digits(s, width)?;
                p.month = Some(v);
                rest
            }
            'd' => {
                let (v, rest) = digits(s, width)?;
                p.day = Some(v);
                rest
            }
            'E' => name(s, &DAYS)?.1,
            'H' | 'h' | 'K' | 'k' => {
                let (v, rest) = digits(s, width)?;
                p.hour = if c == 'k' && v == 24 { 0 } else { v };
                rest
            }
            'a' => {
                let upper = s.get(..2)?.to_ascii_uppercase();
                p.pm = Some(match upper.as_str() {
                    "AM" => false,
                    "PM" => true,
                    _ => return None,
                });
                &s[2..]
            }
            'm' => {
                let (v, rest) = digits(s, width)?;
                p.minute = v;
                rest
            }
            's' => {
                let (v, rest) = digits(s, width)?;
                p.second = v;
                rest
            }
            'S' => {
                let (v, rest) = digits(s, n)?;
                let scale = 10u64.pow(u32::try_from(n).ok()?);
                p.millis = u32::try_from(u64::from(v) * 1000 / scale).ok()?;
                rest
            }
            'V' | 'z' => {
                let (z, rest) = zone(s)?;
                p.zone = Some(z);
                rest
            }
            'X' | 'x' | 'Z' | 'O' => {
                let (o, rest) = offset(s.strip_prefix("GMT").unwrap_or(s))?;
                p.zone = Some(Zone::Fixed(o));
                rest
            }
            _ => return None,
        };
    }
    if !s.is_empty() {
        return None;
    }
    let hour = match p.pm {
        Some(true) if p.hour < 12 => p.hour + 12,
        Some(false) if p.hour == 12 => 0,
        _ => p.hour,
    };
    let date = chrono::NaiveDate::from_ymd_opt(p.year?, p.month.unwrap_or(1), p.day.unwrap_or(1))?;
    let local = date.and_hms_milli_opt(hour, p.minute, p.second, p.millis)?;
    let utc = match p.zone {
        None => local.and_utc(),
        Some(Zone::Fixed(o)) => o.from_local_datetime(&local).single()?.to_utc(),
        Some(Zone::Named(tz)) => tz.from_local_datetime(&local).earliest()?.to_utc(),
    };
    Some(utc.timestamp_millis())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(ms: i64, zone: &str) -> DateTime<Tz> {
        let zone: Tz = zone.parse().unwrap();
        zone.timestamp_millis_opt(ms).single().unwrap()
    }

    #[test]
    fn time_to_epoch_reads_the_pages_examples() {
        // iot-sql-functions, time_to_epoch: the page's three examples.
        assert_eq!(
            read("2020-04-03 09:45:18 UTC+01:00", "yyyy-MM-dd HH:mm:ss VV"),
            Some(1_585_903_518_000)
        );
        assert_eq!(
            read("18 December 2015", "dd MMMM yyyy"),
            Some(1_450_396_800_000)
        );
        assert_eq!(
            read(
                "2007-12-03 10:15:30.592 America/Los_Angeles",
                "yyyy-MM-dd HH:mm:ss.SSS z"
            ),
            Some(1_196_705_730_592)
        );
        assert_eq!(
            read("2016-12-15T18:07:31.155Z", "yyyy-MM-dd'T'HH:mm:ss.SSSX"),
            Some(1_481_825_251_155)
        );
        assert_eq!(
            read("03/12/07 10:15 PM", "dd/MM/yy hh:mm a"),
            read("2007-12-03 22:15", "yyyy-MM-dd HH:mm")
        );
        assert_eq!(read("2015-02-30", "yyyy-MM-dd"), None);
        assert_eq!(read("2015-02-03 trailing", "yyyy-MM-dd"), None);
        assert_eq!(read("2015-02-03", "yyyy-MM-dd Q"), None);
    }

    #[test]
    fn the_pages_example_and_common_patterns() {
        // iot-sql-functions, parse_time: 100000000 ms in America/Belize.
        assert_eq!(
            format(
                "yyyy.MM.dd G 'at' HH:mm:ss z",
                at(100_000_000, "America/Belize")
            )
            .unwrap(),
            "1970.01.01 AD at 21:46:40 CST"
        );
        let t = at(1_481_825_251_155, "UTC");
        assert_eq!(
            format("yyyy-MM-dd'T'HH:mm:ss.SSSZZ", t).unwrap(),
            "2016-12-15T18:07:31.155+00:00"
        );
        assert_eq!(
            format("EEE, d MMM yy hh:mm a", t).unwrap(),
            "Thu, 15 Dec 16 06:07 PM"
        );
        assert_eq!(format("EEEE MMMM D", t).unwrap(), "Thursday December 350");
        assert_eq!(format("'it''s' yyyy", t).unwrap(), "it's 2016");
        let la = at(1_196_705_730_592, "America/Los_Angeles");
        assert_eq!(format("Z ZZZ", la).unwrap(), "-0800 America/Los_Angeles");
        assert_eq!(format("zzzz", la), None);
        assert_eq!(format("yyyy q", t), None);
    }
}
