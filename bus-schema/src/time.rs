//! Timestamps on the bus (milliseconds since the Unix epoch) that read as RFC 3339 in JSON.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, in milliseconds since the Unix epoch, UTC.
///
/// On the bus (MessagePack) it is a plain integer; in human-readable formats such as the JSON
/// API it is an RFC 3339 string like `2026-11-23T03:19:40.123Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total_seconds = self.0 / 1000;
        let millis = self.0 % 1000;
        let days = (total_seconds / 86_400) as i64;
        let seconds_of_day = total_seconds % 86_400;
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            seconds_of_day / 3600,
            (seconds_of_day / 60) % 60,
            seconds_of_day % 60
        )
    }
}

/// Converts days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Converts a (year, month, day) date to days since 1970-01-01 (Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A year past every [`Timestamp`] (whose last is in year 584,556,019), small enough for
/// [`days_from_civil`] to compute without overflow.
const MAX_YEAR: i64 = 1_000_000_000;

/// Parses the RFC 3339 form that `Display` writes (UTC, `Z`, optional fraction).
fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = date_parts.next()?.parse().ok()?;
    let month: u32 = date_parts.next()?.parse().ok()?;
    let day: u32 = date_parts.next()?.parse().ok()?;
    if year > MAX_YEAR {
        return None;
    }
    let (clock, fraction) = time.split_once('.').unwrap_or((time, "0"));
    // Only digits, so that cutting it after three bytes cuts no character in two.
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut clock_parts = clock.splitn(3, ':');
    let hour: u64 = clock_parts.next()?.parse().ok()?;
    let minute: u64 = clock_parts.next()?.parse().ok()?;
    let second: u64 = clock_parts.next()?.parse().ok()?;
    let millis: u64 = format!("{fraction:0<3}")[..3].parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    let seconds = days
        .checked_mul(86_400)?
        .checked_add(hour * 3600 + minute * 60 + second)?;
    Some(Timestamp(seconds.checked_mul(1000)?.checked_add(millis)?))
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Millis(u64),
            Text(String),
        }
        match Either::deserialize(deserializer)? {
            Either::Millis(millis) => Ok(Timestamp(millis)),
            Either::Text(text) => parse_rfc3339(&text)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 UTC time: {text}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_795_403_980_123).to_string(),
            "2026-11-23T03:19:40.123Z"
        );
        assert_eq!(Timestamp(951_782_400_000).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn parses_what_it_formats() {
        for millis in [0, 1, 951_782_400_000, 1_795_403_980_123, 4_102_444_800_999] {
            let text = Timestamp(millis).to_string();
            assert_eq!(parse_rfc3339(&text), Some(Timestamp(millis)), "{text}");
        }
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        let last = Timestamp(u64::MAX);
        assert_eq!(parse_rfc3339(&last.to_string()), Some(last));
    }

    #[test]
    fn bad_text_is_refused_without_panicking() {
        // A fraction of multi-byte characters used to be cut inside a character.
        assert_eq!(parse_rfc3339("2026-11-23T03:19:40.\u{e9}\u{e9}Z"), None);
        assert_eq!(parse_rfc3339("2026-11-23T03:19:40.1\u{e9}Z"), None);
        // Years whose day count or millisecond count overflows used to overflow.
        assert_eq!(parse_rfc3339("9223372036854775807-11-23T03:19:40Z"), None);
        assert_eq!(parse_rfc3339("999999999-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("584556020-01-01T00:00:00.000Z"), None);
    }
}
