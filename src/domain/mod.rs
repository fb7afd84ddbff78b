//! The values paygate's API accepts, each as a type that can only hold a valid value.
//!
//! Parsing a request body yields raw strings and numbers; turning them into these types is
//! where every field rule lives (lengths, alphabets, ranges). A violation is a
//! [`Invalid`] naming the field, which the HTTP layer answers with 422. Nothing here does
//! I/O.

mod currency;
mod password_policy;
pub mod whole_number;

use std::fmt;

pub use password_policy::check_password;

/// A field value that breaks its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The JSON field (or header) that holds the bad value.
    pub field: &'static str,
    /// What the rule is, phrased for the client.
    pub detail: String,
}

impl Invalid {
    pub fn new(field: &'static str, detail: impl Into<String>) -> Self {
        Invalid {
            field,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

/// A username: 3–32 characters from `a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Invalid> {
        let ok_len = (3..=32).contains(&raw.len());
        let ok_chars = raw
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
        if ok_len && ok_chars {
            Ok(Username(raw.to_owned()))
        } else {
            Err(Invalid::new(
                field,
                "must be 3 to 32 characters from a-z, 0-9, '.', '_' and '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Global roles, beyond per-account permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Auditor,
}

impl Role {
    pub fn parse(raw: &str) -> Option<Role> {
        match raw {
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

/// One per-account permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Read payments.
    Read,
    /// Create payments.
    Write,
    /// Cancel payments.
    Delete,
    /// Manage members.
    Admin,
}

impl Perm {
    const ALL: [Perm; 4] = [Perm::Read, Perm::Write, Perm::Delete, Perm::Admin];

    /// The letter that stands for this permission in `rwda`.
    pub fn letter(self) -> char {
        match self {
            Perm::Read => 'r',
            Perm::Write => 'w',
            Perm::Delete => 'd',
            Perm::Admin => 'a',
        }
    }

    fn bit(self) -> u8 {
        match self {
            Perm::Read => 1,
            Perm::Write => 2,
            Perm::Delete => 4,
            Perm::Admin => 8,
        }
    }
}

/// A set of [`Perm`]s, written as letters in the order `rwda`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    pub const ALL: Perms = Perms(15);
    /// No permission: what someone without a grant holds.
    pub const NONE: Perms = Perms(0);
    /// Read only: what the auditor role holds on every account.
    pub const READ_ONLY: Perms = Perms(1);
    /// The permissions that act on a single payment, and so can be delegated by a
    /// capability: read and cancel.
    pub const ON_ONE_PAYMENT: Perms = Perms(1 | 4);

    /// Parses a non-empty set of distinct letters from `rwda`, in any order.
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Invalid> {
        let mut set = 0u8;
        for c in raw.chars() {
            let perm = Perm::ALL
                .into_iter()
                .find(|p| p.letter() == c)
                .ok_or_else(|| {
                    Invalid::new(
                        field,
                        "must be letters from 'rwda' (read, write, delete, admin)",
                    )
                })?;
            if set & perm.bit() != 0 {
                return Err(Invalid::new(field, format!("repeats '{c}'")));
            }
            set |= perm.bit();
        }
        if set == 0 {
            return Err(Invalid::new(field, "must name at least one permission"));
        }
        Ok(Perms(set))
    }

    pub fn contains(self, perm: Perm) -> bool {
        self.0 & perm.bit() != 0
    }

    /// Whether every permission of `self` is also in `other`.
    pub fn is_subset_of(self, other: Perms) -> bool {
        self.0 & !other.0 == 0
    }

    /// The permissions in both.
    pub fn intersection(self, other: Perms) -> Perms {
        Perms(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for perm in Perm::ALL {
            if self.contains(perm) {
                write!(f, "{}", perm.letter())?;
            }
        }
        Ok(())
    }
}

/// An active ISO 4217 currency code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, Invalid> {
        if currency::is_iso4217(raw) {
            Ok(Currency(raw.to_owned()))
        } else {
            Err(Invalid::new(
                field,
                "must be an active ISO 4217 currency code in upper case, such as EUR",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Largest payment amount in minor units (10^12, e.g. ten billion euros in cents).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;

/// A payment amount in minor units, 1 ≤ n ≤ [`MAX_AMOUNT_MINOR`].
pub fn check_amount(field: &'static str, amount: i64) -> Result<i64, Invalid> {
    if (1..=MAX_AMOUNT_MINOR).contains(&amount) {
        Ok(amount)
    } else {
        Err(Invalid::new(
            field,
            "must be an integer number of minor units from 1 to 1000000000000",
        ))
    }
}

/// A payee: 1–64 characters from `A-Z a-z 0-9 . _ -`.
pub fn check_payee(field: &'static str, raw: &str) -> Result<String, Invalid> {
    let ok = (1..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(Invalid::new(
            field,
            "must be 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'",
        ))
    }
}

/// Free text such as a payment reference: at most `max` characters, none of them a control
/// character (Cc: no line breaks or escape sequences reach logs and terminals), a format
/// character (Cf: bidi overrides such as U+202E that reorder what a reader sees, zero-width
/// characters that hide a difference between two strings) or a line or paragraph separator
/// (U+2028, U+2029).
pub fn check_text(
    field: &'static str,
    raw: &str,
    min: usize,
    max: usize,
) -> Result<String, Invalid> {
    let count = raw.chars().count();
    if !(min..=max).contains(&count) {
        return Err(Invalid::new(
            field,
            format!("must be {min} to {max} characters"),
        ));
    }
    match raw.chars().find(|&c| !is_visible_text(c)) {
        None => Ok(raw.to_owned()),
        Some(c) => Err(Invalid::new(
            field,
            format!(
                "must not contain control, format (bidi, zero-width) or line-separator \
                 characters; found U+{:04X}",
                u32::from(c)
            ),
        )),
    }
}

/// The format characters (general category Cf) of Unicode 15. std knows no categories,
/// and this short table is all paygate needs of one.
const FORMAT_CHARACTERS: &[(u32, u32)] = &[
    (0xAD, 0xAD),
    (0x600, 0x605),
    (0x61C, 0x61C),
    (0x6DD, 0x6DD),
    (0x70F, 0x70F),
    (0x890, 0x891),
    (0x8E2, 0x8E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` may appear in free text: not Cc, Cf, Zl or Zp.
fn is_visible_text(c: char) -> bool {
    let code = u32::from(c);
    !c.is_control()
        && !matches!(c, '\u{2028}' | '\u{2029}')
        && !FORMAT_CHARACTERS
            .iter()
            .any(|&(first, last)| (first..=last).contains(&code))
}

/// An `Idempotency-Key`: 1–255 visible ASCII characters.
pub fn check_idempotency_key(raw: &[u8]) -> Result<String, Invalid> {
    let ok = (1..=255).contains(&raw.len()) && raw.iter().all(|b| (0x21..=0x7e).contains(b));
    match std::str::from_utf8(raw) {
        Ok(key) if ok => Ok(key.to_owned()),
        _ => Err(Invalid::new(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["bob", "alice.smith", "a_b-c.9", &"x".repeat(32)] {
            assert!(Username::parse("username", ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "Alice",
            "al ice",
            "alice@x",
            "ålice",
            &"x".repeat(33),
            "",
        ] {
            assert!(Username::parse("username", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn perms_are_a_nonempty_set_printed_in_canonical_order() {
        assert_eq!(Perms::parse("perms", "ar").unwrap().to_string(), "ra");
        assert_eq!(Perms::parse("perms", "adwr").unwrap(), Perms::ALL);
        assert!(Perms::parse("perms", "").is_err());
        assert!(Perms::parse("perms", "rr").is_err());
        assert!(Perms::parse("perms", "rx").is_err());
        assert!(Perms::parse("perms", "R").is_err());
        let p = Perms::parse("perms", "wd").unwrap();
        assert!(p.contains(Perm::Write) && p.contains(Perm::Delete));
        assert!(!p.contains(Perm::Read) && !p.contains(Perm::Admin));
    }

    #[test]
    fn amounts_are_bounded() {
        assert!(check_amount("amount_minor", 1).is_ok());
        assert!(check_amount("amount_minor", MAX_AMOUNT_MINOR).is_ok());
        for bad in [0, -1, MAX_AMOUNT_MINOR + 1, i64::MIN] {
            assert!(check_amount("amount_minor", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn payees_and_references() {
        assert!(check_payee("payee", "ACME-Corp_1.0").is_ok());
        assert!(check_payee("payee", "").is_err());
        assert!(check_payee("payee", "a b").is_err());
        assert!(check_payee("payee", &"p".repeat(65)).is_err());
        assert!(check_text("reference", "Invoice №42 — thanks", 0, 140).is_ok());
        assert!(check_text("reference", &"é".repeat(140), 0, 140).is_ok());
        assert!(check_text("reference", &"é".repeat(141), 0, 140).is_err());
        assert!(check_text("reference", "line\nbreak", 0, 140).is_err());
        assert!(check_text("reference", "esc\u{1b}[31m", 0, 140).is_err());
        for hidden in [
            "\u{202e}",  // right-to-left override
            "\u{2066}",  // left-to-right isolate
            "\u{200b}",  // zero-width space
            "\u{200d}",  // zero-width joiner
            "\u{feff}",  // byte-order mark
            "\u{ad}",    // soft hyphen
            "\u{2028}",  // line separator (Zl)
            "\u{2029}",  // paragraph separator (Zp)
            "\u{e0041}", // tag letter A
            "\u{85}",    // next line (Cc)
        ] {
            let text = format!("pay{hidden}ment");
            let err = check_text("reference", &text, 0, 140).unwrap_err();
            assert!(err.to_string().contains("format"), "{hidden:?}: {err}");
        }
        // Ordinary scripts, combining marks and emoji stay allowed.
        for fine in ["مرجع ٤٢", "日本語の参照", "e\u{301}", "💶 rent", "Ωmega"] {
            assert!(check_text("reference", fine, 0, 140).is_ok(), "{fine}");
        }
    }

    #[test]
    fn idempotency_keys() {
        assert!(check_idempotency_key(b"order-1234").is_ok());
        assert!(check_idempotency_key(&[b'k'; 255]).is_ok());
        assert!(check_idempotency_key(&[b'k'; 256]).is_err());
        assert!(check_idempotency_key(b"").is_err());
        assert!(check_idempotency_key(b"has space").is_err());
        assert!(check_idempotency_key("caf\u{e9}".as_bytes()).is_err());
    }

    #[test]
    fn currencies() {
        assert_eq!(Currency::parse("currency", "EUR").unwrap().as_str(), "EUR");
        assert!(Currency::parse("currency", "eur").is_err());
        assert!(Currency::parse("currency", "XXX").is_err());
    }
}
