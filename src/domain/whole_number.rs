//! Whole numbers in JSON request bodies, read exactly.
//!
//! JSON (and JSON Schema's `integer`) counts `12`, `12.0` and `1.2e1` as the same whole
//! number, and clients built on floating-point JSON libraries send the latter forms. serde
//! would read them through an `f64`, which is exactly what must never happen near money, or
//! refuse them. Here the number's text is read as a decimal instead: a whole number in any
//! notation is accepted exactly, anything with a fractional part is refused. Used with
//! `#[serde(deserialize_with = ...)]`.

use serde::de::{Deserialize, Deserializer, Error};
use serde_json::value::RawValue;

/// A whole-number field of a JSON body.
pub fn deserialize<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    let raw = Box::<RawValue>::deserialize(deserializer)?;
    let value = parse(raw.get()).ok_or_else(|| {
        D::Error::custom(format!("expected a whole number, found {}", kind(&raw)))
    })?;
    T::try_from(value).map_err(|_| D::Error::custom("the number is out of range"))
}

/// An optional whole-number field (use with `#[serde(default)]`).
pub fn deserialize_option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i128>,
{
    deserialize(deserializer).map(Some)
}

/// What the value is, for the error message — never the value itself (it could be anything
/// a client typed).
fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number with a fractional part, or out of range",
    }
}

/// The whole number a JSON number's text denotes, if it denotes one that fits in an i128.
fn parse(text: &str) -> Option<i128> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if integer.is_empty() || !all_digits(integer) || !all_digits(fraction) {
        return None;
    }
    // The value is digits × 10^scale; fractional digits must cancel against trailing zeros.
    let digits = format!("{integer}{fraction}");
    let mut digits = digits.as_str();
    let mut scale = exponent.checked_sub(i64::try_from(fraction.len()).ok()?)?;
    while scale < 0 {
        digits = digits.strip_suffix('0')?;
        scale += 1;
    }
    let mut value: i128 = 0;
    for digit in digits.bytes() {
        value = value
            .checked_mul(10)?
            .checked_add(i128::from(digit - b'0'))?;
    }
    if value != 0 {
        for _ in 0..scale {
            value = value.checked_mul(10)?;
        }
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_in_every_notation_are_read_exactly() {
        for (text, value) in [
            ("0", 0),
            ("-0", 0),
            ("12", 12),
            ("12.0", 12),
            ("12.000", 12),
            ("1.2e1", 12),
            ("1.2E+1", 12),
            ("120e-1", 12),
            ("-5", -5),
            ("1e12", 1_000_000_000_000),
            ("1000000000000.0", 1_000_000_000_000),
            ("0e999999", 0),
            ("9223372036854775807", i128::from(i64::MAX)),
        ] {
            assert_eq!(parse(text), Some(value), "{text}");
        }
    }

    #[test]
    fn fractions_and_overflow_are_refused() {
        // 1000000000000.00001 is 1e12 as an f64: read as a decimal, it is not whole.
        for text in [
            "12.5",
            "1.25e1",
            "1e-1",
            "1000000000000.00001",
            "1e39",
            "1e9999999999999999999",
            "",
            ".5",
            "-",
        ] {
            assert_eq!(parse(text), None, "{text}");
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[serde(deserialize_with = "deserialize")]
        amount: i64,
        #[serde(default, deserialize_with = "deserialize_option")]
        seconds: Option<u64>,
    }

    #[test]
    fn as_a_serde_field() {
        let body: Body = serde_json::from_str(r#"{"amount": 1145.0, "seconds": 6e1}"#).unwrap();
        assert_eq!((body.amount, body.seconds), (1145, Some(60)));
        let body: Body = serde_json::from_str(r#"{"amount": 7}"#).unwrap();
        assert_eq!(body.seconds, None);
        for bad in [
            r#"{"amount": 1.5}"#,
            r#"{"amount": "7"}"#,
            r#"{"amount": null}"#,
            r#"{"amount": 7, "seconds": -1}"#,
            r#"{"amount": 1e19}"#,
            r#"{"amount": 7, "seconds": null}"#,
        ] {
            assert!(serde_json::from_str::<Body>(bad).is_err(), "{bad}");
        }
    }
}
