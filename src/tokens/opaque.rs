//! Opaque session tokens: 32 random bytes, shown to the client once as base64url, and kept
//! by the server only as their SHA-256. A stolen database therefore holds no usable token,
//! and a lookup by hash needs no constant-time comparison: the attacker does not control
//! the hash.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Length of the base64url text of a token.
pub const TOKEN_CHARS: usize = 43;

/// What the database stores for a token.
pub type TokenHash = [u8; 32];

/// A new token: its text for the client and its hash for the database.
pub fn generate(rng: &SystemRandom) -> Result<(String, TokenHash), ring::error::Unspecified> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rng.fill(&mut bytes)?;
    Ok((URL_SAFE_NO_PAD.encode(bytes), hash(&bytes)))
}

fn hash(bytes: &[u8; TOKEN_BYTES]) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

/// The hash of a token presented by a client, if it has the shape of one of ours
/// (canonical base64url of exactly 32 bytes).
pub fn parse(text: &str) -> Option<TokenHash> {
    if text.len() != TOKEN_CHARS {
        return None;
    }
    let mut bytes = [0u8; TOKEN_BYTES];
    // 43 characters decode to at most 32 bytes, so the buffer is large enough; the engine
    // rejects padding, `+`, `/` and non-zero trailing bits.
    match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
        Ok(TOKEN_BYTES) => Some(hash(&bytes)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_to_its_hash() {
        let rng = SystemRandom::new();
        let (text, stored) = generate(&rng).unwrap();
        assert_eq!(text.len(), TOKEN_CHARS);
        assert_eq!(parse(&text), Some(stored));
        let (other, _) = generate(&rng).unwrap();
        assert_ne!(text, other);
    }

    #[test]
    fn only_canonical_tokens_parse() {
        let rng = SystemRandom::new();
        let (text, _) = generate(&rng).unwrap();
        assert_eq!(parse(&format!("{text}=")), None, "padding");
        assert_eq!(parse(&text[1..]), None, "too short");
        assert_eq!(
            parse(&format!("{}+", &text[..42])),
            None,
            "standard alphabet"
        );
        // 43 characters carry 258 bits for 256: the last character's two low bits must be
        // zero. Setting one gives a second spelling of the same token, which is refused.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = ALPHABET
            .iter()
            .position(|&c| c == text.as_bytes()[42])
            .unwrap();
        assert_eq!(last & 3, 0);
        let sibling = char::from(ALPHABET[last | 1]);
        let respelled = format!("{}{sibling}", &text[..42]);
        assert_eq!(parse(&respelled), None, "non-zero trailing bits");
    }
}
