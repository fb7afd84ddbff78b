//! Integers as ASCII decimal digits appended to a byte buffer, for the bytes paygate
//! builds by hand on every request (`RateLimit` header values, audit lines) where
//! `core::fmt` would cost more than the rest of the job. Not a number formatter in general:
//! unsigned integers only.

/// Appends `n` in decimal, without leading zeros.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // `n % 10` is a single decimal digit, so the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_match_the_formatter() {
        for n in [0, 7, 10, 99, 1_000, 4_242, u64::from(u32::MAX), u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }
}
