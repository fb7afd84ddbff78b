//! Wall-clock time as paygate reads and shows it: the one [`Clock`] every decision that
//! depends on the time asks (expiry of sessions, JWTs, capabilities and idempotency keys,
//! TOTP steps, token buckets, timestamps), and RFC 3339 UTC timestamps with millisecond
//! precision with the civil-date arithmetic behind them.
//!
//! No time zones. Storage keeps Unix milliseconds, so ordering never depends on text.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where a worker reads the time. A server runs on [`Clock::system`]; tests build one they
/// can move forward, so that expiry is tested by advancing the clock, not by sleeping.
/// Cheap to clone: clones share one source.
#[derive(Debug, Clone, Default)]
pub struct Clock(Source);

#[derive(Debug, Clone, Default)]
enum Source {
    /// The host's wall clock.
    #[default]
    System,
    /// The host's wall clock plus an offset (nanoseconds) that only grows.
    Advanced(Arc<AtomicI64>),
    /// A fixed instant (nanoseconds since the epoch) that moves only when advanced.
    Manual(Arc<AtomicI64>),
}

/// Nanoseconds since the Unix epoch by the host's clock.
fn system_ns() -> i64 {
    // A clock before 1970 is a broken host; treat it as the epoch rather than panic.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Clock {
    /// The host's wall clock: what every server runs on.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// The host's clock, which [`Clock::advance`] can move forward (integration tests: the
    /// server keeps real time for I/O deadlines, and jumps for expiry).
    pub fn advanceable() -> Clock {
        Clock(Source::Advanced(Arc::new(AtomicI64::new(0))))
    }

    /// A clock that stands at `at_ns` (nanoseconds since the epoch) until advanced (unit
    /// tests of exact arithmetic).
    pub fn manual(at_ns: i64) -> Clock {
        Clock(Source::Manual(Arc::new(AtomicI64::new(at_ns))))
    }

    /// Nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> i64 {
        match &self.0 {
            Source::System => system_ns(),
            Source::Advanced(offset) => system_ns().saturating_add(offset.load(Ordering::SeqCst)),
            Source::Manual(at) => at.load(Ordering::SeqCst),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_millis(&self) -> i64 {
        self.now_ns().div_euclid(1_000_000)
    }

    /// Seconds since the Unix epoch.
    pub fn now_s(&self) -> i64 {
        self.now_ns().div_euclid(1_000_000_000)
    }

    /// Moves a test clock forward by `by`. The system clock cannot be moved: asking is a
    /// bug in a test, and panics there.
    pub fn advance(&self, by: Duration) {
        self.advance_ns(i64::try_from(by.as_nanos()).unwrap_or(i64::MAX));
    }

    /// [`Clock::advance`] in nanoseconds.
    pub fn advance_ns(&self, by: i64) {
        match &self.0 {
            Source::System => panic!("the system clock cannot be advanced"),
            Source::Advanced(at) | Source::Manual(at) => {
                at.fetch_add(by, Ordering::SeqCst);
            }
        }
    }
}

/// Milliseconds since the Unix epoch by the host's clock, for what no clock was given to:
/// command-line tools and file names. A running server reads its [`Clock`].
pub fn now_millis() -> i64 {
    system_ns().div_euclid(1_000_000)
}

/// A calendar date in the proleptic Gregorian calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilDate {
    pub year: i64,
    pub month: u8,
    pub day: u8,
}

/// Converts days since 1970-01-01 to a calendar date (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> CivilDate {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    CivilDate { year, month, day }
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339_millis(millis: i64) -> String {
    with_rfc3339_millis(millis, str::to_owned)
}

/// Calls `f` with `millis` formatted as by [`format_rfc3339_millis`], without allocating
/// for years 0–9999 (the audit log formats two of these per request).
pub fn with_rfc3339_millis<R>(millis: i64, f: impl FnOnce(&str) -> R) -> R {
    let secs = millis.div_euclid(1000);
    let ms = millis.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let date = civil_from_days(days);
    if !(0..=9999).contains(&date.year) {
        // Outside what four digits hold: the general (slower) path.
        return f(&format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            date.year,
            date.month,
            date.day,
            sod / 3600,
            (sod / 60) % 60,
            sod % 60,
            ms
        ));
    }
    // Every audit record carries one of these: digits into a fixed buffer, no formatter.
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            // `value % 10` is a single decimal digit, so the cast cannot truncate.
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, date.year);
    put(5, 2, i64::from(date.month));
    put(8, 2, i64::from(date.day));
    put(11, 2, sod / 3600);
    put(14, 2, (sod / 60) % 60);
    put(17, 2, sod % 60);
    put(20, 3, ms);
    // Only ASCII digits and separators were written, so this is always valid UTF-8.
    f(std::str::from_utf8(&out).unwrap_or_default())
}

/// Days since 1970-01-01 of a calendar date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(date: CivilDate) -> i64 {
    let year = date.year - i64::from(date.month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(date.month);
    let doy =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(date.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses an RFC 3339 date-time — `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, `T` and `Z`
/// in either case — into Unix milliseconds (a longer fraction is cut to milliseconds).
/// Anything else, impossible dates and leap seconds included, is `None`.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut at = 19;
    let mut millis = 0;
    if b[at] == b'.' {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let kept = digits.min(3);
        millis = num(at + 1..at + 1 + kept)? * 10i64.pow(3 - kept as u32);
        at += 1 + digits;
    }
    let offset_minutes = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 60 + minutes;
            if *sign == b'-' {
                -offset
            } else {
                offset
            }
        }
        _ => return None,
    };
    let date = CivilDate {
        year,
        month: u8::try_from(month).ok().filter(|m| (1..=12).contains(m))?,
        day: u8::try_from(day).ok().filter(|d| (1..=31).contains(d))?,
    };
    let days = days_from_civil(date);
    // Reject 2026-02-30 and the like: the date must survive the round trip.
    if civil_from_days(days) != date || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let local = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis;
    Some(local - offset_minutes * 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digit_writer_agrees_with_the_formatter() {
        let reference = |millis: i64| {
            let (secs, ms) = (millis.div_euclid(1000), millis.rem_euclid(1000));
            let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
            let d = civil_from_days(days);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                d.year,
                d.month,
                d.day,
                sod / 3600,
                (sod / 60) % 60,
                sod % 60,
                ms
            )
        };
        // Years 1970 to ~9990, in steps that hit every field's digits.
        let mut millis = 0i64;
        while millis < 253_100_000_000_000 {
            assert_eq!(format_rfc3339_millis(millis), reference(millis));
            millis += 77_777_777_777;
        }
        assert_eq!(format_rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn epoch_and_known_dates() {
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 is a leap day in a year divisible by 400.
        assert_eq!(
            format_rfc3339_millis(951_782_400_123),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_millis(1_767_225_599_999),
            "2025-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn rfc3339_parsing_is_strict_and_round_trips() {
        for millis in [0, 951_782_400_123, 1_767_225_599_999, 1_795_950_000_000] {
            assert_eq!(parse_rfc3339(&format_rfc3339_millis(millis)), Some(millis));
        }
        assert_eq!(
            parse_rfc3339("2026-11-29T12:00:00Z"),
            Some(1_795_953_600_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-29T12:00:00.5Z"),
            Some(1_795_953_600_500)
        );
        // Offsets, lower-case separators and longer fractions name the same instants.
        for same in [
            "2026-11-29T13:30:00+01:30",
            "2026-11-29T02:00:00-10:00",
            "2026-11-29t12:00:00z",
            "2026-11-29T12:00:00.000999Z",
            "2026-11-29T12:00:00-00:00",
        ] {
            assert_eq!(parse_rfc3339(same), Some(1_795_953_600_000), "{same}");
        }
        for bad in [
            "",
            "2026-11-29",
            "2026-11-29T12:00:00",
            "2026-11-29T12:00:00+0100",
            "2026-11-29T12:00:00+24:00",
            "2026-11-29T12:00:00+01:60",
            "2026-02-30T00:00:00Z",
            "2026-11-29T24:00:00Z",
            "2026-11-29 12:00:00Z",
            "2026-11-29T12:00:00.Z",
            "2026-11-29T12:00:60Z",
            "+026-11-29T12:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn days_round_trip_across_centuries() {
        assert_eq!(
            civil_from_days(-1),
            CivilDate {
                year: 1969,
                month: 12,
                day: 31
            }
        );
        assert_eq!(
            civil_from_days(47_541),
            CivilDate {
                year: 2100,
                month: 3,
                day: 1
            }
        );
    }
}
