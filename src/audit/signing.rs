//! A node's audit signing key: Ed25519 (ring), kept in `audit-signing.key` in the data
//! directory (mode 0600), for the digests that list the segments a node archived. Unlike
//! the HMAC key of the chain (`audit.key`), whose holder can also write records, the
//! public half verifies and can forge nothing: an auditor holding only public keys checks
//! every digest. `paygate audit public-key` prints it.
//!
//! The file holds the key pair as a PKCS#8 document (RFC 8410), base64url, one line.
//! The public key is shown as `ed25519:` followed by its 32 bytes in base64url.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

use crate::secret_file::{read_private, write_private};

/// The key file inside the data directory.
pub const SIGNING_KEY_FILE: &str = "audit-signing.key";

/// How a public key is written: `ed25519:` and base64url of its 32 bytes.
const PREFIX: &str = "ed25519:";

/// A node's signing key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Reads the signing key of `data_dir`, creating one on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<SigningKey, String> {
        let path = data_dir.join(SIGNING_KEY_FILE);
        if !path.exists() {
            let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| "the system random generator failed".to_owned())?;
            let text = format!("{}\n", URL_SAFE_NO_PAD.encode(document.as_ref()));
            match write_private(&path, text.as_bytes(), false) {
                Ok(()) => log::info!("created the audit signing key {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
            }
        }
        SigningKey::load(&path)
    }

    fn load(path: &Path) -> Result<SigningKey, String> {
        let text = read_private(path)?;
        let damaged = || {
            format!(
                "{} does not hold an Ed25519 key; restore it from a backup, or move it \
                 aside to start a new key (publish the new public key to your auditors)",
                path.display()
            )
        };
        let document = URL_SAFE_NO_PAD
            .decode(text.trim_ascii())
            .map_err(|_| damaged())?;
        Ed25519KeyPair::from_pkcs8(&document)
            .map(SigningKey)
            .map_err(|_| damaged())
    }

    /// The public key, as `paygate audit public-key` prints it.
    pub fn public_key(&self) -> String {
        format!(
            "{PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.0.public_key().as_ref())
        )
    }

    /// The signature of `message`, base64url.
    pub fn sign(&self, message: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(self.0.sign(message).as_ref())
    }
}

/// Whether `signature` (base64url) is `public_key`'s (as [`SigningKey::public_key`] writes
/// it) over `message`. Anything malformed is `false`.
pub fn verify(public_key: &str, message: &[u8], signature: &str) -> bool {
    let Some(key) = public_key
        .strip_prefix(PREFIX)
        .and_then(|k| URL_SAFE_NO_PAD.decode(k).ok())
        .filter(|k| k.len() == 32)
    else {
        return false;
    };
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, &signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_node_keeps_one_private_key_and_anyone_verifies_with_the_public_one() {
        let dir = std::env::temp_dir().join(format!("paygate-signing-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = SigningKey::load_or_create(&dir).unwrap();
        let file = dir.join(SIGNING_KEY_FILE);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The same key on the next start.
        let again = SigningKey::load_or_create(&dir).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        assert!(key.public_key().starts_with("ed25519:"));

        let signature = key.sign(b"digest of node-a, 04:00-05:00");
        assert!(verify(
            &key.public_key(),
            b"digest of node-a, 04:00-05:00",
            &signature
        ));
        // A changed message, a changed signature, another key, or garbage: false.
        assert!(!verify(
            &key.public_key(),
            b"digest of node-a, 04:00-05:01",
            &signature
        ));
        let mut forged = signature.clone().into_bytes();
        forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
        assert!(!verify(
            &key.public_key(),
            b"digest of node-a, 04:00-05:00",
            &String::from_utf8(forged).unwrap()
        ));
        let other = std::env::temp_dir().join(format!("paygate-signing-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&other).unwrap();
        let stranger = SigningKey::load_or_create(&other).unwrap();
        assert!(!verify(
            &stranger.public_key(),
            b"digest of node-a, 04:00-05:00",
            &signature
        ));
        assert!(!verify("ed25519:short", b"x", &signature));
        assert!(!verify(&key.public_key(), b"x", "%%%"));

        // A damaged file is refused with what to do, never replaced.
        std::fs::write(&file, "not a key\n").unwrap();
        let err = SigningKey::load_or_create(&dir).err().unwrap();
        assert!(err.contains("restore it from a backup"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    }
}
