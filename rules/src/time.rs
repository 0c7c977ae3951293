//! `parse_time(pattern, timestamp[, timezone])` (iot-sql-functions): a Unix time in milliseconds
//! formatted by a Joda-Time pattern (`DateTimeFormat`) in a time zone (default UTC).
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

/// `t` by the Joda-Time `pattern`, or `None` when the pattern has what it cannot give.
fn format(pattern: &str, t: DateTime<Tz>) -> Option<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            // Quoted text; `''` is one quote, inside or outside quotes.
            if chars.get(i + 1) == Some(&'\'') {
                out.push('\'');
                i += 2;
                continue;
            }
            i += 1;
            loop {
                match chars.get(i) {
                    None => break,
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        out.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&other) => {
                        out.push(other);
                        i += 1;
                    }
                }
            }
            continue;
        }
        if !c.is_ascii_alphabetic() {
            out.push(c);
            i += 1;
            continue;
        }
        let mut n = 1;
        while chars.get(i + n) == Some(&c) {
            n += 1;
        }
        i += n;
        field(&mut out, c, n, &t)?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(ms: i64, zone: &str) -> DateTime<Tz> {
        let zone: Tz = zone.parse().unwrap();
        zone.timestamp_millis_opt(ms).single().unwrap()
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
