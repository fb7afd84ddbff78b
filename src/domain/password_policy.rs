//! Which passwords paygate accepts at registration: 8–256 characters, not the username, and
//! not one of the most common passwords.
//!
//! The common-password list is Openwall's `password.lst` (3,546 entries, compiled by Solar
//! Designer 1996–2011 and placed in the public domain by its author; Debian ships it in the
//! `john-data` package). Its `#!comment:` header lines are kept in the file and skipped here.
//! The password itself is stored exactly as sent: no trimming, no normalisation.

use std::collections::HashSet;
use std::sync::LazyLock;

use super::{Invalid, Username};

const LIST: &str = include_str!("common-passwords.txt");

/// The list, lower-cased, so "Password1" counts as common as well as "password1".
static COMMON: LazyLock<HashSet<String>> = LazyLock::new(|| {
    LIST.lines()
        .filter(|line| !line.starts_with("#!comment"))
        .map(str::to_lowercase)
        .collect()
});

/// Checks a new password for `username`.
pub fn check_password(username: &Username, password: &str) -> Result<(), Invalid> {
    let length = password.chars().count();
    if !(8..=256).contains(&length) {
        return Err(Invalid::new("password", "must be 8 to 256 characters"));
    }
    let lower = password.to_lowercase();
    if lower == username.as_str() {
        return Err(Invalid::new("password", "must not be the username"));
    }
    if COMMON.contains(&lower) {
        return Err(Invalid::new(
            "password",
            "is one of the most commonly used passwords; choose another",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Username {
        Username::parse("username", "alice123").unwrap()
    }

    #[test]
    fn the_whole_list_is_loaded() {
        assert!(COMMON.len() > 3400, "{}", COMMON.len());
        assert!(!COMMON.iter().any(|p| p.starts_with("#!comment")));
    }

    #[test]
    fn rules() {
        assert!(check_password(&alice(), "correct horse battery staple").is_ok());
        assert!(check_password(&alice(), "short").is_err());
        assert!(check_password(&alice(), &"x".repeat(257)).is_err());
        assert!(
            check_password(&alice(), &"ü".repeat(256)).is_ok(),
            "counts characters"
        );
        assert!(check_password(&alice(), "ALICE123").is_err(), "username");
        for common in ["password", "12345678", "Password1", "iloveyou"] {
            let err = check_password(&alice(), common).unwrap_err();
            assert!(err.detail.contains("commonly"), "{common}");
        }
    }
}
