//! Signed digests of archived audit segments: per node and interval, the list of segments
//! shipped in it (object key, size, SHA-256, first and last sequence number, chain head),
//! the previous digest's key and signature, signed with the node's Ed25519 key
//! ([`super::signing`]). Whoever holds the public keys can check every digest, the chain of
//! digests and every segment's hash — and forge none of them.
//!
//! A digest is one JSON object. Its signature covers the object without its `signature`
//! member, serialised with sorted keys and no spaces (what serde_json writes), so a
//! verifier re-derives the signed bytes from what it read.

use ring::digest;
use serde_json::{json, Map, Value};

use super::record::{line_chain, line_seq};
use super::signing::{self, SigningKey};

/// What a digest says about one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Its object key in the archive.
    pub key: String,
    pub size: u64,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The chain value of its last record, hex.
    pub chain_head: String,
}

impl Segment {
    /// Reads a sealed segment's figures off its bytes (whole lines, each a chained record).
    /// Fails, naming the line, when a line is not a record.
    pub fn of(key: &str, bytes: &[u8]) -> Result<Segment, String> {
        if bytes.is_empty() {
            return Err(format!("{key}: an empty segment"));
        }
        let mut first = None;
        let mut last = None;
        for (n, line) in bytes
            .strip_suffix(b"\n")
            .unwrap_or(bytes)
            .split(|&b| b == b'\n')
            .enumerate()
        {
            let bad = || format!("{key}: line {} is not an audit record", n + 1);
            let seq = line_seq(line).ok_or_else(bad)?;
            let chain = line_chain(line).ok_or_else(bad)?;
            first.get_or_insert(seq);
            last = Some((seq, chain));
        }
        let (Some(first_seq), Some((last_seq, head))) = (first, last) else {
            return Err(format!("{key}: an empty segment"));
        };
        Ok(Segment {
            key: key.to_owned(),
            size: bytes.len() as u64,
            sha256: hex(digest::digest(&digest::SHA256, bytes).as_ref()),
            first_seq,
            last_seq,
            chain_head: hex(&head),
        })
    }

    pub(super) fn to_json(&self) -> Value {
        json!({
            "key": self.key,
            "size": self.size,
            "sha256": self.sha256,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "chain_head": self.chain_head,
        })
    }

    pub(super) fn from_json(value: &Value) -> Option<Segment> {
        Some(Segment {
            key: value["key"].as_str()?.to_owned(),
            size: value["size"].as_u64()?,
            sha256: value["sha256"].as_str()?.to_owned(),
            first_seq: value["first_seq"].as_u64()?,
            last_seq: value["last_seq"].as_u64()?,
            chain_head: value["chain_head"].as_str()?.to_owned(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One digest, as written or as read back and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// The node (and worker) whose segments it lists.
    pub node: String,
    /// The interval it covers, RFC 3339 UTC: from `start` (inclusive) to `end`.
    pub start: String,
    pub end: String,
    pub segments: Vec<Segment>,
    /// The digest before it: its object key and signature (`None` for the first).
    pub previous: Option<(String, String)>,
    /// The public key that signed it.
    pub public_key: String,
}

/// The bytes a signature covers: the object without `signature`, keys sorted.
fn signed_bytes(object: &Map<String, Value>) -> Vec<u8> {
    let mut unsigned = object.clone();
    unsigned.remove("signature");
    Value::Object(unsigned).to_string().into_bytes()
}

impl Digest {
    /// The digest as the object to store, signed with `key` (whose public key it names).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut object = Map::new();
        object.insert("version".into(), 1.into());
        object.insert("node".into(), self.node.clone().into());
        object.insert("start".into(), self.start.clone().into());
        object.insert("end".into(), self.end.clone().into());
        let segments = self.segments.iter().map(Segment::to_json).collect();
        object.insert("segments".into(), Value::Array(segments));
        let previous = self
            .previous
            .as_ref()
            .map(|(k, s)| json!({"key": k, "signature": s}));
        object.insert("previous".into(), previous.unwrap_or(Value::Null));
        object.insert("public_key".into(), key.public_key().into());
        let signature = key.sign(&signed_bytes(&object));
        object.insert("signature".into(), signature.into());
        Value::Object(object).to_string().into_bytes()
    }

    /// Reads a stored digest and checks its signature against one of `trusted` (public
    /// keys as `paygate audit public-key` prints them). Returns the digest and its
    /// signature, or what is wrong.
    pub fn verify(bytes: &[u8], trusted: &[String]) -> Result<(Digest, String), String> {
        let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(bytes) else {
            return Err("not a digest (not a JSON object)".into());
        };
        let text = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_owned);
        let public_key = text("public_key").ok_or("no public_key")?;
        if !trusted.contains(&public_key) {
            return Err(format!(
                "signed by {public_key}, which is not a trusted key"
            ));
        }
        let signature = text("signature").ok_or("no signature")?;
        if !signing::verify(&public_key, &signed_bytes(&object), &signature) {
            return Err("the signature does not match its content".into());
        }
        if object.get("version").and_then(Value::as_u64) != Some(1) {
            return Err("an unknown digest version".into());
        }
        let segments = object
            .get("segments")
            .and_then(Value::as_array)
            .ok_or("no segments")?
            .iter()
            .map(Segment::from_json)
            .collect::<Option<Vec<_>>>()
            .ok_or("a malformed segment entry")?;
        let previous = match object.get("previous") {
            Some(Value::Null) | None => None,
            Some(previous) => Some((
                previous["key"]
                    .as_str()
                    .ok_or("a malformed previous")?
                    .to_owned(),
                previous["signature"]
                    .as_str()
                    .ok_or("a malformed previous")?
                    .to_owned(),
            )),
        };
        let digest = Digest {
            node: text("node").ok_or("no node")?,
            start: text("start").ok_or("no start")?,
            end: text("end").ok_or("no end")?,
            segments,
            previous,
            public_key,
        };
        Ok((digest, signature))
    }
}

/// What is wrong with a node's sequence of verified digests, `(object key, digest,
/// signature)` in time order: each must name the one before it (key and signature) and
/// start where it ended. Empty when the chain is whole.
pub fn chain_breaks(digests: &[(String, Digest, String)]) -> Vec<String> {
    let mut breaks = Vec::new();
    for pair in digests.windows(2) {
        let [(before_key, before, before_signature), (key, digest, _)] = pair else {
            continue;
        };
        let named = digest.previous.as_ref();
        if named != Some(&(before_key.clone(), before_signature.clone())) {
            breaks.push(format!(
                "{key} does not name {before_key} as the digest before it (a digest is missing \
                 or was replaced)"
            ));
        }
        if digest.start != before.end {
            breaks.push(format!(
                "a gap in time: {before_key} ends at {}, {key} starts at {}",
                before.end, digest.start
            ));
        }
    }
    breaks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{seal, unseal, GENESIS};

    fn segment_bytes(first: u64, count: u64) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k");
        let mut out = Vec::new();
        let mut chain = GENESIS;
        for seq in first..first + count {
            chain = seal(&key, &chain, seq, br#"{"phase":"request"}"#, &mut out);
        }
        out
    }

    fn new_key() -> (SigningKey, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("paygate-digest-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        (SigningKey::load_or_create(&dir).unwrap(), dir)
    }

    #[test]
    fn a_segment_is_summed_up_from_its_records() {
        let bytes = segment_bytes(41, 3);
        let segment = Segment::of("a/1/000002.jsonl", &bytes).unwrap();
        assert_eq!((segment.first_seq, segment.last_seq), (41, 43));
        assert_eq!(segment.size, bytes.len() as u64);
        assert_eq!(segment.sha256.len(), 64);
        let last = bytes[..bytes.len() - 1]
            .rsplit(|&b| b == b'\n')
            .next()
            .unwrap();
        assert_eq!(segment.chain_head, hex(&unseal(last).unwrap().chain));
        assert!(Segment::of("x", b"").unwrap_err().contains("empty"));
        assert!(Segment::of("x", b"{\"seq\":1}\ngarbage\n")
            .unwrap_err()
            .contains("line 1"));
    }

    #[test]
    fn digests_verify_with_the_public_key_only_and_chain_without_gaps() {
        let (key, dir) = new_key();
        let trusted = vec![key.public_key()];
        let first = Digest {
            node: "node-a/1".into(),
            start: "2026-12-02T04:00:00.000Z".into(),
            end: "2026-12-02T05:00:00.000Z".into(),
            segments: vec![Segment::of("p/node-a/1/000001.jsonl", &segment_bytes(1, 5)).unwrap()],
            previous: None,
            public_key: key.public_key(),
        };
        let stored = first.sign(&key);
        let (read, signature) = Digest::verify(&stored, &trusted).unwrap();
        assert_eq!(read, first);
        let second = Digest {
            start: first.end.clone(),
            end: "2026-12-02T06:00:00.000Z".into(),
            segments: vec![],
            previous: Some(("d/1".into(), signature.clone())),
            ..first.clone()
        };
        let (second_read, second_signature) = Digest::verify(&second.sign(&key), &trusted).unwrap();
        let chain = vec![
            ("d/1".to_owned(), read.clone(), signature.clone()),
            (
                "d/2".to_owned(),
                second_read.clone(),
                second_signature.clone(),
            ),
        ];
        assert!(chain_breaks(&chain).is_empty());

        // Any change to a signed digest breaks its signature.
        let text = String::from_utf8(stored.clone()).unwrap();
        let edited = text.replace("\"size\":", "\"size\":1");
        assert!(Digest::verify(edited.as_bytes(), &trusted)
            .unwrap_err()
            .contains("signature"));
        // A key the auditor does not hold is refused, even with a good signature.
        let (stranger, other) = new_key();
        assert!(Digest::verify(&first.sign(&stranger), &trusted)
            .unwrap_err()
            .contains("not a trusted key"));
        // A digest missing from the chain, and a gap in time, are named.
        let third = Digest {
            start: "2026-12-02T07:00:00.000Z".into(),
            end: "2026-12-02T08:00:00.000Z".into(),
            previous: Some(("d/2".into(), second_signature.clone())),
            ..second.clone()
        };
        let (third_read, third_signature) = Digest::verify(&third.sign(&key), &trusted).unwrap();
        let skipped = vec![
            ("d/1".to_owned(), read, signature),
            ("d/3".to_owned(), third_read, third_signature),
        ];
        let breaks = chain_breaks(&skipped);
        assert_eq!(breaks.len(), 2, "{breaks:?}");
        assert!(breaks[0].contains("does not name d/1"), "{breaks:?}");
        assert!(breaks[1].contains("gap in time"), "{breaks:?}");
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other);
    }
}
