//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP): HMAC-SHA1, 6 digits, 30 s
//! steps, one step of drift either way. Pure arithmetic; remembering which step was last
//! used (so a code works once) is the store's job.
//!
//! SHA-1 is what every authenticator app implements for TOTP; RFC 6238's security rests on
//! HMAC, where SHA-1's collision weakness does not apply.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Digits in a code.
pub const DIGITS: u32 = 6;
/// Seconds per time step.
pub const STEP_S: i64 = 30;
/// Bytes of a secret: 160 bits, the size RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;

/// A fresh random secret.
pub fn new_secret(rng: &SystemRandom) -> Result<[u8; SECRET_LEN], ring::error::Unspecified> {
    let mut secret = [0u8; SECRET_LEN];
    rng.fill(&mut secret)?;
    Ok(secret)
}

/// HOTP value (RFC 4226 section 5.3) of `counter`, truncated to `digits` decimal digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let h = tag.as_ref();
    // An HMAC-SHA1 tag is 20 bytes, so offset + 3 <= 15 + 3 is always in range.
    let offset = usize::from(h[h.len() - 1] & 0x0f);
    let binary = u32::from_be_bytes([
        h[offset] & 0x7f,
        h[offset + 1],
        h[offset + 2],
        h[offset + 3],
    ]);
    binary % 10u32.pow(digits)
}

/// The time step containing `unix_s`.
pub fn step_at(unix_s: i64) -> i64 {
    unix_s.div_euclid(STEP_S)
}

/// Whether `code` has the shape of a code: exactly the digits an authenticator app shows.
pub fn is_well_formed(code: &[u8]) -> bool {
    code.len() == DIGITS as usize && code.iter().all(u8::is_ascii_digit)
}

/// Checks a code typed by the user against the steps around `unix_s` (one before, the
/// current one, one after). Returns the step it matches, so the caller can refuse a second
/// use of it. A code that is not exactly six ASCII digits matches nothing.
pub fn matching_step(secret: &[u8], code: &str, unix_s: i64) -> Option<i64> {
    if !is_well_formed(code.as_bytes()) {
        return None;
    }
    let typed: u32 = code.parse().ok()?;
    let now = step_at(unix_s);
    let mut found = None;
    // Every candidate is computed and compared without an early exit, so the time taken
    // does not say which step (if any) matched.
    for step in [now - 1, now, now + 1] {
        let expected = u64::try_from(step).map_or(u32::MAX, |c| hotp(secret, c, DIGITS));
        let differs = expected ^ typed;
        if differs == 0 && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// RFC 4648 base32 without padding, the form authenticator apps expect for the secret.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The `otpauth://` URI an authenticator app scans (Key Uri Format).
pub fn otpauth_uri(username: &str, secret: &[u8]) -> String {
    // Usernames are [a-z0-9._-] only, so nothing in the label needs escaping.
    format!(
        "otpauth://totp/paygate:{username}?secret={}&issuer=paygate",
        base32(secret)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc_4226_appendix_d_hotp_values() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, value) in expected.iter().enumerate() {
            assert_eq!(
                hotp(RFC_SECRET, counter as u64, 6),
                *value,
                "count {counter}"
            );
        }
    }

    #[test]
    fn rfc_6238_appendix_b_sha1_values() {
        let vectors = [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ];
        for (time, value) in vectors {
            let counter = u64::try_from(step_at(time)).unwrap();
            assert_eq!(hotp(RFC_SECRET, counter, 8), value, "T = {time}");
        }
    }

    #[test]
    fn codes_match_one_step_either_way_and_no_further() {
        let t = 1_234_567_890;
        let code = |step: i64| format!("{:06}", hotp(RFC_SECRET, step as u64, 6));
        let now = step_at(t);
        assert_eq!(matching_step(RFC_SECRET, &code(now), t), Some(now));
        assert_eq!(matching_step(RFC_SECRET, &code(now - 1), t), Some(now - 1));
        assert_eq!(matching_step(RFC_SECRET, &code(now + 1), t), Some(now + 1));
        assert_eq!(matching_step(RFC_SECRET, &code(now - 2), t), None);
        assert_eq!(matching_step(RFC_SECRET, &code(now + 2), t), None);
        for bad in [
            "",
            "12345",
            "1234567",
            "12345a",
            " 12345",
            "+12345",
            "١٢٣٤٥٦",
        ] {
            assert_eq!(matching_step(RFC_SECRET, bad, t), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_per_rfc_4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(RFC_SECRET), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let uri = otpauth_uri("alice", RFC_SECRET);
        assert_eq!(
            uri,
            "otpauth://totp/paygate:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=paygate"
        );
    }
}
