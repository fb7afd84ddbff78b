//! Capability tokens: `pgc_` followed by an opaque token (32 random bytes, base64url). The
//! prefix tells them apart from session tokens wherever a Bearer value arrives; like
//! sessions, only their SHA-256 is stored, so the database holds nothing a bearer could use.

use ring::rand::SystemRandom;

use super::opaque::{self, TokenHash};

/// What every capability token starts with.
pub const PREFIX: &str = "pgc_";

/// A new capability token and its hash.
pub fn generate(rng: &SystemRandom) -> Result<(String, TokenHash), ring::error::Unspecified> {
    let (token, hash) = opaque::generate(rng)?;
    Ok((format!("{PREFIX}{token}"), hash))
}

/// The hash of a capability token, if `text` has the shape of one.
pub fn parse(text: &str) -> Option<TokenHash> {
    opaque::parse(text.strip_prefix(PREFIX)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_tokens_carry_their_prefix() {
        let (token, hash) = generate(&SystemRandom::new()).unwrap();
        assert!(token.starts_with(PREFIX));
        assert_eq!(parse(&token), Some(hash));
        assert_eq!(
            parse(&token[PREFIX.len()..]),
            None,
            "a session token is not one"
        );
        assert_eq!(parse("pgc_short"), None);
    }
}
