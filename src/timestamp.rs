//! Fast text forms of UTC timestamps for the ledger's hot path.
//!
//! Every usage record carries two timestamps, written once into the journal
//! (JSON) and once into the SQLite ledger (text). chrono formats through
//! `core::fmt` with a parsed format string, which costs more than the rest of
//! the record; these write the same bytes directly. Anything unusual (a year
//! outside 0000–9999, a leap second) goes through chrono, so the output is
//! always exactly chrono's.

use chrono::{DateTime, Datelike as _, SecondsFormat, Timelike as _, Utc};

/// How many fraction digits to write.
#[derive(Debug, Clone, Copy)]
enum Fraction {
    /// 0, 3, 6 or 9 digits, the fewest that are exact (chrono's `AutoSi`).
    Auto,
    /// Always 6 digits (microseconds, truncated).
    Micros,
}

/// `t` as chrono's serde writes a `DateTime<Utc>`
/// (`to_rfc3339_opts(SecondsFormat::AutoSi, true)`), e.g. `2026-11-25T17:45:00.123Z`.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    format(t, Fraction::Auto).unwrap_or_else(|| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// `t` as `%Y-%m-%dT%H:%M:%S%.6fZ`: fixed width, so that comparing the text
/// compares the instants.
pub fn micros(t: &DateTime<Utc>) -> String {
    format(t, Fraction::Micros).unwrap_or_else(|| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// Serializes a timestamp exactly as chrono does, only faster (for `serialize_with`).
pub fn serialize<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(t))
}

fn format(t: &DateTime<Utc>, fraction: Fraction) -> Option<String> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return None; // a leap second
    }
    let mut out = Vec::with_capacity(30);
    push_digits(&mut out, year, 4);
    out.push(b'-');
    push_digits(&mut out, t.month(), 2);
    out.push(b'-');
    push_digits(&mut out, t.day(), 2);
    out.push(b'T');
    push_digits(&mut out, t.hour(), 2);
    out.push(b':');
    push_digits(&mut out, t.minute(), 2);
    out.push(b':');
    push_digits(&mut out, t.second(), 2);
    let (value, digits) = match fraction {
        Fraction::Micros => (nanos / 1000, 6),
        Fraction::Auto if nanos == 0 => (0, 0),
        Fraction::Auto if nanos.is_multiple_of(1_000_000) => (nanos / 1_000_000, 3),
        Fraction::Auto if nanos.is_multiple_of(1000) => (nanos / 1000, 6),
        Fraction::Auto => (nanos, 9),
    };
    if digits > 0 {
        out.push(b'.');
        push_digits(&mut out, value, digits);
    }
    out.push(b'Z');
    String::from_utf8(out).ok()
}

/// Appends the last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut Vec<u8>, value: u32, width: u32) {
    for i in (0..width).rev() {
        let digit = (value / 10u32.pow(i)) % 10;
        out.push(b'0' + digit as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_same_text_as_chrono(secs in -62_167_219_200i64..253_402_300_799, nanos in 0u32..1_000_000_000, round in 0u8..4) {
            // Round the fraction sometimes, so every AutoSi width is exercised.
            let nanos = match round {
                0 => 0,
                1 => nanos - nanos % 1_000_000,
                2 => nanos - nanos % 1000,
                _ => nanos,
            };
            let t = DateTime::from_timestamp(secs, nanos).unwrap();
            prop_assert_eq!(rfc3339(&t), t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
            prop_assert_eq!(micros(&t), t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
            prop_assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", rfc3339(&t)));
        }
    }

    #[test]
    fn years_past_9999_and_leap_seconds_go_through_chrono() {
        let far = DateTime::from_timestamp(253_402_300_800, 5).unwrap();
        assert_eq!(
            rfc3339(&far),
            far.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(
            micros(&leap),
            leap.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
        );
        assert_eq!(
            rfc3339(&leap),
            leap.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
    }
}
