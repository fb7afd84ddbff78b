//! What an audit line holds, and how lines are chained.
//!
//! A line is one JSON object: `{"seq":N, …fields…, "chain":"<64 hex>"}`. The chain value is
//! HMAC-SHA256(audit key, previous line's chain value ‖ the line without its `chain`
//! member, i.e. the bytes up to `,"chain"` followed by `}`). The first line of an
//! instance's first file uses 32 zero bytes as the previous value; every later file
//! continues from the last line of the one before. So editing, deleting, inserting or
//! reordering any line breaks every chain value from there on.
//!
//! Fields are serialised by serde_json, which escapes every control character: no value a
//! client sends can end a line or add a member.

use std::io::Write as _;
use std::net::IpAddr;

use ring::hmac;
use serde::Serialize;

use crate::decimal::push_decimal;

/// The chain value before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// The bytes that end every line before the hex chain value.
const CHAIN_MEMBER: &[u8] = b",\"chain\":\"";

/// The `request` record: written and synced before access control runs.
#[derive(Debug, Serialize)]
pub struct RequestRecord<'a> {
    /// UTC, RFC 3339 with milliseconds.
    pub time: &'a str,
    pub phase: &'static str,
    pub request_id: &'a str,
    /// The worker instance and its process id.
    pub worker: &'a str,
    pub pid: u32,
    pub client_ip: IpAddr,
    /// The proven username, or null.
    pub principal: Option<&'a str>,
    /// The username a failed attempt claimed, if it named one.
    pub claimed: Option<&'a str>,
    /// `basic`, `bearer-jwt`, `bearer-opaque`, `capability` or `none`.
    pub auth: &'static str,
    /// `ok`, `failed`, or null when no credentials were offered.
    pub auth_result: Option<&'static str>,
    /// Why authentication failed.
    pub auth_reason: Option<&'static str>,
    /// The id of the capability used (never its token).
    pub capability: Option<&'a str>,
    pub method: &'a str,
    /// Path and query, with secret query parameters redacted.
    pub path: &'a str,
    /// `C`, `R`, `U` or `D`.
    pub op: &'static str,
}

/// The `response` record: how the request ended.
#[derive(Debug, Serialize)]
pub struct ResponseRecord<'a> {
    pub time: &'a str,
    pub phase: &'static str,
    pub request_id: &'a str,
    pub worker: &'a str,
    pub pid: u32,
    pub status: u16,
    /// Why a 4xx/5xx was answered (never a secret: a category, a field name or a
    /// server-written sentence).
    pub reason: Option<&'a str>,
    pub duration_us: u64,
}

/// The `break` record: the first record of a chain segment that `paygate audit seal`
/// started after the log was found damaged. It chains from the last record that still
/// verified, and says what was found, why the operator continued, and when.
#[derive(Debug, Serialize)]
pub struct BreakRecord<'a> {
    pub time: &'a str,
    pub phase: &'static str,
    /// The instance whose chain this is.
    pub worker: &'a str,
    /// What verification found (file, line and why).
    pub found: &'a str,
    /// The operator's reason, as given to `audit seal --reason`.
    pub reason: &'a str,
    /// The last record that verified, and its chain value (hex): this record chains from
    /// there, and everything after it in the damaged segment is set aside.
    pub after_seq: u64,
    pub after_chain: &'a str,
}

impl Record for BreakRecord<'_> {
    fn write_body(&self, out: &mut Vec<u8>) {
        let mut members = Members::start(out);
        members.str("time", self.time);
        members.str("phase", self.phase);
        members.str("worker", self.worker);
        members.str("found", self.found);
        members.str("reason", self.reason);
        members.number("after_seq", self.after_seq);
        members.str("after_chain", self.after_chain);
        members.end();
    }
}

/// What the audit writer accepts: a record of one of the three phases (never arbitrary
/// bytes, so nothing but these fields can reach the log).
pub trait Record {
    /// Appends the record's JSON without `seq` and `chain` (`{"time":…}`): exactly the
    /// bytes serde_json makes of it (a test holds the two together), written without
    /// serde's per-key escaping because every record costs it twice per request.
    fn write_body(&self, out: &mut Vec<u8>);
}

impl Record for RequestRecord<'_> {
    fn write_body(&self, out: &mut Vec<u8>) {
        let mut members = Members::start(out);
        members.heading(
            self.time,
            self.phase,
            self.request_id,
            self.worker,
            self.pid,
        );
        members.display_str("client_ip", self.client_ip);
        members.opt_str("principal", self.principal);
        members.opt_str("claimed", self.claimed);
        members.str("auth", self.auth);
        members.opt_str("auth_result", self.auth_result);
        members.opt_str("auth_reason", self.auth_reason);
        members.opt_str("capability", self.capability);
        members.str("method", self.method);
        members.str("path", self.path);
        members.str("op", self.op);
        members.end();
    }
}

impl Record for ResponseRecord<'_> {
    fn write_body(&self, out: &mut Vec<u8>) {
        let mut members = Members::start(out);
        members.heading(
            self.time,
            self.phase,
            self.request_id,
            self.worker,
            self.pid,
        );
        members.number("status", self.status);
        members.opt_str("reason", self.reason);
        members.number("duration_us", self.duration_us);
        members.end();
    }
}

/// Writes one JSON object member by member. Keys are this file's constants; numbers and
/// IP addresses are written by their `Display` (digits, dots, colons and hex only); every
/// string value goes through [`push_json_str`].
struct Members<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Members<'a> {
    fn start(out: &'a mut Vec<u8>) -> Members<'a> {
        out.push(b'{');
        Members { out, first: true }
    }

    /// The members every record starts with, in the order both record types declare them.
    fn heading(&mut self, time: &str, phase: &str, request_id: &str, worker: &str, pid: u32) {
        self.str("time", time);
        self.str("phase", phase);
        self.str("request_id", request_id);
        self.str("worker", worker);
        self.number("pid", pid);
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_str(value, self.out);
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(value) => self.str(key, value),
            None => {
                self.key(key);
                self.out.extend_from_slice(b"null");
            }
        }
    }

    fn number(&mut self, key: &str, value: impl Into<u64>) {
        self.key(key);
        push_decimal(self.out, value.into());
    }

    fn display_str(&mut self, key: &str, value: impl std::fmt::Display) {
        self.key(key);
        // Writing into a Vec cannot fail.
        let _ = write!(self.out, "\"{value}\"");
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// Appends `value` as a JSON string. Printable ASCII other than `"` and `\` (ids, times,
/// most paths) is copied as it is, as serde_json would; anything else goes through
/// serde_json's escaper, so no value can end the string, the member or the line.
fn push_json_str(value: &str, out: &mut Vec<u8>) {
    // A fold without an early exit, so that the compiler can check many bytes at once.
    let plain = value.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        // Serialising a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

/// A record's body on its own (see [`Record::write_body`]).
pub fn body_of(record: &impl Record) -> Vec<u8> {
    let mut body = Vec::with_capacity(512);
    record.write_body(&mut body);
    body
}

/// The full line (with `seq` and `chain`, ending in a newline) for `body` as record `seq`
/// after the chain value `prev`; returns the line's own chain value too.
pub fn seal(
    key: &hmac::Key,
    prev: &[u8; 32],
    seq: u64,
    body: &[u8],
    line: &mut Vec<u8>,
) -> [u8; 32] {
    let start = line.len();
    line.extend_from_slice(b"{\"seq\":");
    // Writing into a Vec cannot fail.
    let _ = write!(line, "{seq}");
    // `body` is a JSON object: `{` + members + `}`; splice its members in after `seq`.
    if body.len() > 2 {
        line.push(b',');
        line.extend_from_slice(&body[1..body.len() - 1]);
    }
    line.push(b'}');
    let chain = chain_value(key, prev, &line[start..]);
    // Replace the closing brace with the chain member.
    line.pop();
    line.extend_from_slice(CHAIN_MEMBER);
    push_hex(&chain, line);
    line.extend_from_slice(b"\"}\n");
    chain
}

fn chain_value(key: &hmac::Key, prev: &[u8; 32], content: &[u8]) -> [u8; 32] {
    let mut context = hmac::Context::with_key(key);
    context.update(prev);
    context.update(content);
    let mut out = [0u8; 32];
    out.copy_from_slice(context.sign().as_ref());
    out
}

/// The chain value of `line` (without its newline) when it is a sealed record that follows
/// `prev` under `key`, compared in constant time; `None` otherwise. Unlike [`unseal`] and
/// [`verifies`] it copies nothing: start-up checks run it over whole files.
pub fn verify_line(key: &hmac::Key, prev: &[u8; 32], line: &[u8]) -> Option<[u8; 32]> {
    let (signed, stated) = split_chain(line)?;
    let mut context = hmac::Context::with_key(key);
    context.update(prev);
    context.update(signed);
    context.update(b"}");
    let computed = context.sign();
    let differs = computed
        .as_ref()
        .iter()
        .zip(stated)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    (differs == 0).then_some(stated)
}

/// The sequence number a line states (`{"seq":N,…`), without parsing the rest; `None`
/// when it does not start that way. Trust it only once [`verify_line`] accepted the line.
pub fn line_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 || !matches!(rest.get(digits), Some(b',' | b'}')) {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// What a checkpoint's MAC covers: a label, the instance, the record count and the chain
/// value.
fn checkpoint_input(instance: &str, records: u64, head: &[u8; 32]) -> Vec<u8> {
    let mut data = Vec::with_capacity(72 + instance.len());
    data.extend_from_slice(b"paygate audit checkpoint v1\0");
    data.extend_from_slice(instance.as_bytes());
    data.push(0);
    data.extend_from_slice(&records.to_be_bytes());
    data.extend_from_slice(head);
    data
}

/// The MAC of a checkpoint (HMAC-SHA256 under the audit key over [`checkpoint_input`]).
/// Without the key nobody can move a checkpoint to match a log they cut.
pub fn checkpoint_mac(key: &hmac::Key, instance: &str, records: u64, head: &[u8; 32]) -> [u8; 32] {
    let tag = hmac::sign(key, &checkpoint_input(instance, records, head));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Whether `mac` authenticates the checkpoint (constant-time).
pub fn checkpoint_authentic(
    key: &hmac::Key,
    instance: &str,
    records: u64,
    head: &[u8; 32],
    mac: &[u8; 32],
) -> bool {
    hmac::verify(key, &checkpoint_input(instance, records, head), mac).is_ok()
}

/// A line taken apart: what was signed, and the chain value it carries.
pub struct Unsealed {
    /// The line without its chain member (the signed bytes).
    pub content: Vec<u8>,
    pub chain: [u8; 32],
}

/// Splits a line (without its newline) into content and chain value; `None` when it does
/// not end with a well-formed chain member.
pub fn unseal(line: &[u8]) -> Option<Unsealed> {
    let (signed, chain) = split_chain(line)?;
    let mut content = signed.to_vec();
    content.push(b'}');
    Some(Unsealed { content, chain })
}

/// The chain value a line states (not verified), without copying the line.
pub fn line_chain(line: &[u8]) -> Option<[u8; 32]> {
    split_chain(line).map(|(_, chain)| chain)
}

/// A line (without its newline) split at its chain member — `,"chain":"<64 hex>"}` — into
/// what precedes it (the signed content, less its closing brace) and the chain value.
fn split_chain(line: &[u8]) -> Option<(&[u8], [u8; 32])> {
    let tail = CHAIN_MEMBER.len() + 64 + 2;
    if line.len() < tail + 2 || !line.ends_with(b"\"}") {
        return None;
    }
    let at = line.len() - tail;
    if &line[at..at + CHAIN_MEMBER.len()] != CHAIN_MEMBER {
        return None;
    }
    let chain = unhex(&line[at + CHAIN_MEMBER.len()..line.len() - 2])?;
    Some((&line[..at], chain))
}

/// Whether `unsealed` follows `prev` under `key` (constant-time comparison).
pub fn verifies(key: &hmac::Key, prev: &[u8; 32], unsealed: &Unsealed) -> bool {
    let mut context = Vec::with_capacity(32 + unsealed.content.len());
    context.extend_from_slice(prev);
    context.extend_from_slice(&unsealed.content);
    hmac::verify(key, &context, &unsealed.chain).is_ok()
}

/// Appends `bytes` as lowercase hex.
pub fn push_hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

pub fn unhex(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, b"test audit key, 32 bytes long!!!")
    }

    #[test]
    fn a_sealed_line_unseals_and_verifies_only_after_its_predecessor() {
        let key = key();
        let mut line = Vec::new();
        let body = br#"{"time":"t","phase":"request"}"#;
        let first = seal(&key, &GENESIS, 1, body, &mut line);
        assert!(line.starts_with(br#"{"seq":1,"time":"t","phase":"request","chain":""#));
        assert!(line.ends_with(b"\"}\n"));
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["seq"], 1);
        let unsealed = unseal(&line[..line.len() - 1]).unwrap();
        assert_eq!(unsealed.chain, first);
        assert!(verifies(&key, &GENESIS, &unsealed));
        assert!(!verifies(&key, &[1; 32], &unsealed), "wrong predecessor");
        let other = hmac::Key::new(hmac::HMAC_SHA256, b"another key");
        assert!(!verifies(&other, &GENESIS, &unsealed), "wrong key");

        // An edited byte anywhere in the content breaks it.
        let edited = String::from_utf8(line[..line.len() - 1].to_vec())
            .unwrap()
            .replace("request", "respons");
        let unsealed = unseal(edited.as_bytes()).unwrap();
        assert!(!verifies(&key, &GENESIS, &unsealed));
    }

    #[test]
    fn client_strings_cannot_break_a_line() {
        let record = RequestRecord {
            time: "t",
            phase: "request",
            request_id: "r",
            worker: "1",
            pid: 1,
            client_ip: IpAddr::from([127, 0, 0, 1]),
            principal: None,
            claimed: Some("x\"}\n{\"seq\":99,\"forged\":\"\u{0}"),
            auth: "basic",
            auth_result: Some("failed"),
            auth_reason: None,
            capability: None,
            method: "GET",
            path: "/a\r\nb",
            op: "R",
        };
        let mut line = Vec::new();
        seal(&key(), &GENESIS, 7, &body_of(&record), &mut line);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["seq"], 7);
        assert!(parsed.get("forged").is_none());
        assert_eq!(parsed["path"], "/a\r\nb");
    }

    #[test]
    fn bodies_are_exactly_what_serde_json_makes_of_the_records() {
        let nasty = [
            "",
            "plain",
            "quote\" and \\ backslash",
            "new\nline\r\t\u{0}\u{1f}\u{7f}",
            "ünïcödé ✓ 😀",
            "\u{2028}\u{2029}",
            "</script>",
        ];
        for text in nasty {
            for (ip, reason) in [
                (IpAddr::from([10, 0, 0, 1]), None),
                ("::1".parse().unwrap(), Some(text)),
            ] {
                let request = RequestRecord {
                    time: text,
                    phase: "request",
                    request_id: text,
                    worker: "1",
                    pid: u32::MAX,
                    client_ip: ip,
                    principal: Some(text),
                    claimed: reason,
                    auth: "basic",
                    auth_result: None,
                    auth_reason: Some("bad-password"),
                    capability: reason,
                    method: "GET",
                    path: text,
                    op: "R",
                };
                assert_eq!(
                    body_of(&request),
                    serde_json::to_vec(&request).unwrap(),
                    "{text:?}"
                );
                let response = ResponseRecord {
                    time: "t",
                    phase: "response",
                    request_id: text,
                    worker: text,
                    pid: 0,
                    status: 503,
                    reason,
                    duration_us: u64::MAX,
                };
                assert_eq!(
                    body_of(&response),
                    serde_json::to_vec(&response).unwrap(),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn lines_verify_in_place_and_state_their_number() {
        let key = key();
        let mut bytes = Vec::new();
        let first = seal(&key, &GENESIS, 41, br#"{"a":1}"#, &mut bytes);
        let line = &bytes[..bytes.len() - 1];
        assert_eq!(verify_line(&key, &GENESIS, line), Some(first));
        assert_eq!(verify_line(&key, &[7; 32], line), None);
        let mut edited = line.to_vec();
        edited[10] ^= 1;
        assert_eq!(verify_line(&key, &GENESIS, &edited), None);
        assert_eq!(line_seq(line), Some(41));
        assert_eq!(line_seq(b"{\"seq\":7}"), Some(7));
        for bad in [
            &b"{\"seq\":}"[..],
            b"{\"seq\":1x",
            b"{\"seq\":-1,",
            b"{\"sek\":1,",
            b"",
        ] {
            assert_eq!(line_seq(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let mac = checkpoint_mac(&key, "1", 22, &first);
        assert!(checkpoint_authentic(&key, "1", 22, &first, &mac));
        assert!(!checkpoint_authentic(&key, "1", 18, &first, &mac));
        assert!(!checkpoint_authentic(&key, "2", 22, &first, &mac));
    }

    #[test]
    fn malformed_chain_members_are_refused() {
        assert!(unseal(b"{}").is_none());
        assert!(unseal(br#"{"seq":1,"chain":"zz"}"#).is_none());
        let upper = format!(r#"{{"seq":1,"chain":"{}"}}"#, "A".repeat(64));
        assert!(unseal(upper.as_bytes()).is_none());
        let good = format!(r#"{{"seq":1,"chain":"{}"}}"#, "a".repeat(64));
        assert!(unseal(good.as_bytes()).is_some());
        let mut hex = Vec::new();
        push_hex(&[0xab; 32], &mut hex);
        assert_eq!(unhex(&hex), Some([0xab; 32]));
    }
}
