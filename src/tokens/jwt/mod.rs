//! JSON Web Tokens as paygate issues and accepts them: JWS compact serialisation, HS256
//! only, via `ring::hmac`. Pure functions; which `jti`s were revoked is the caller's
//! business.
//!
//! Verification runs in a fixed order and trusts nothing before the signature has been
//! checked in constant time: size, shape and canonical base64url, a strictly parsed header
//! (`alg` exactly `HS256`, `typ` JWT, a known `kid`, no `crit`, no repeated member), the
//! signature, and only then the claims (issuer, audience, times, lifetime).
//!
//! Times: a token is refused from its `exp` on, to the second — the `expires_at` a login
//! answers is the token's whole life. `nbf` and `iat` allow [`LEEWAY_S`] of clock
//! difference, for a verifier whose clock runs behind the issuer's (another node, or
//! another service signing with exported keys): a token is never refused for being a
//! little early, and never accepted for being late.
//!
//! The strict JSON readers of the header and the claims are in `strict_json`.

use std::borrow::Cow;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use serde::Serialize;

use super::keys::{KeySet, SigningKey};

mod strict_json;
use strict_json::rejection;

/// Our `iss` claim.
pub const ISSUER: &str = "paygate";
/// Our `aud` claim: the API these tokens are for.
pub const AUDIENCE: &str = "paygate-api";
/// Clock difference tolerated between issuer and verifier for `nbf` and `iat`, in seconds
/// (never for `exp`).
pub const LEEWAY_S: i64 = 60;
/// Longest token accepted, in bytes; ours are about 330.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest header segment accepted (base64url characters). A JOSE header paygate accepts
/// is `alg`, `typ` and `kid` — about 90 characters — and it is parsed before the
/// signature is checked, so it is kept small: an 8 KiB header costs nothing to refuse.
pub const MAX_HEADER_BYTES: usize = 512;
/// Most members one JSON object (at any depth) of a header or claims may have: far more
/// than any real token has, few enough that looking for a repeated name stays cheap.
pub const MAX_MEMBERS: usize = 32;

/// Why a token was refused. For the audit log only: every refusal looks the same to the
/// client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtRejection {
    Oversized,
    /// Not three dot-separated segments.
    Malformed,
    /// A segment is not canonical base64url.
    BadEncoding,
    /// The header is not a JSON object of the expected members and types.
    BadHeader,
    /// A JSON object repeats a member name.
    DuplicateMember,
    /// `alg` is not exactly `HS256` (this includes `none` in every spelling).
    AlgorithmNotAllowed,
    /// `typ` is not `JWT`.
    WrongType,
    /// No `kid`, or one that names no key.
    UnknownKey,
    /// A `crit` header: extensions paygate does not implement.
    CriticalHeader,
    BadSignature,
    /// The claims are not a JSON object of the expected members and types.
    BadClaims,
    WrongIssuer,
    WrongAudience,
    Expired,
    NotYetValid,
    IssuedInFuture,
    /// `exp - iat` is longer than tokens may live.
    LifetimeTooLong,
    /// The `amr` values are not ones paygate issues.
    UnknownAmr,
}

impl JwtRejection {
    pub fn as_str(self) -> &'static str {
        use JwtRejection::*;
        match self {
            Oversized => "token larger than 8 KiB",
            Malformed => "not three segments",
            BadEncoding => "segment not canonical base64url",
            BadHeader => "malformed header",
            DuplicateMember => "repeated JSON member",
            AlgorithmNotAllowed => "algorithm not allowed",
            WrongType => "typ is not JWT",
            UnknownKey => "unknown kid",
            CriticalHeader => "crit header present",
            BadSignature => "bad signature",
            BadClaims => "malformed claims",
            WrongIssuer => "wrong iss",
            WrongAudience => "wrong aud",
            Expired => "expired",
            NotYetValid => "not yet valid",
            IssuedInFuture => "iat in the future",
            LifetimeTooLong => "lifetime longer than allowed",
            UnknownAmr => "unknown amr",
        }
    }
}

/// How the user proved themselves, as RFC 8176 `amr` values.
pub fn amr_from(values: &[String]) -> Option<&'static [&'static str]> {
    match values {
        [a] if a == "pwd" => Some(&["pwd"]),
        [a, b] if a == "pwd" && b == "otp" => Some(&["pwd", "otp"]),
        _ => None,
    }
}

/// `aud` may be one string or an array of them (RFC 7519 section 4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn includes(&self, wanted: &str) -> bool {
        match self {
            Audience::One(aud) => aud == wanted,
            Audience::Many(list) => list.iter().any(|a| a == wanted),
        }
    }
}

/// The claims of a paygate token. All are required; others are ignored (RFC 7519), but no
/// member may appear twice, at any depth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    pub iss: String,
    pub aud: Audience,
    /// The username.
    pub sub: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Unique id; logout revokes it.
    pub jti: String,
    pub amr: Vec<String>,
}

/// The JOSE header members paygate reads.
struct Header<'a> {
    alg: Cow<'a, str>,
    typ: Option<Cow<'a, str>>,
    kid: Option<Cow<'a, str>>,
    /// Whether a `crit` member is present (its value does not matter: it is refused).
    crit: bool,
}

#[derive(Serialize)]
struct OurHeader<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// Signs `claims` with `key` into a compact JWS.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let header = OurHeader {
        alg: "HS256",
        typ: "JWT",
        kid: &key.kid,
    };
    // Plain strings and integers always serialise.
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let claims = serde_json::to_vec(claims).unwrap_or_default();
    let mut token = String::with_capacity(400);
    URL_SAFE_NO_PAD.encode_string(header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims, &mut token);
    let tag = hmac::sign(&key.key, token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut token);
    token
}

/// A token split into its parts, header checked, signature not yet checked.
#[derive(Debug)]
pub struct Jws<'a> {
    /// `header.payload`, the bytes the signature covers.
    signing_input: &'a str,
    /// The payload segment, still base64url: decoded only once the signature holds, so a
    /// forged token's payload costs nothing but the HMAC over it.
    payload_text: &'a str,
    signature: Vec<u8>,
    /// The header's `kid`, if any.
    pub kid: Option<String>,
}

fn decode_segment(segment: &str) -> Result<Vec<u8>, JwtRejection> {
    // The engine accepts only the URL-safe alphabet without padding and with zero trailing
    // bits: exactly one encoding per byte string.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtRejection::BadEncoding)
}

impl<'a> Jws<'a> {
    /// Size, shape, encoding and header checks.
    pub fn parse(token: &'a str) -> Result<Jws<'a>, JwtRejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtRejection::Oversized);
        }
        let mut parts = token.split('.');
        let (Some(header_text), Some(payload_text), Some(signature_text), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtRejection::Malformed);
        };
        if header_text.len() > MAX_HEADER_BYTES {
            return Err(JwtRejection::Oversized);
        }
        let signing_input = &token[..header_text.len() + 1 + payload_text.len()];
        let header_bytes = decode_segment(header_text)?;
        let signature = decode_segment(signature_text)?;
        let header: Header<'_> = serde_json::from_slice(&header_bytes)
            .map_err(|e| rejection(&e, JwtRejection::BadHeader))?;
        if header.alg != "HS256" {
            return Err(JwtRejection::AlgorithmNotAllowed);
        }
        // Media type names are case-insensitive (RFC 7515 section 4.1.9).
        if !header.typ.is_some_and(|t| t.eq_ignore_ascii_case("JWT")) {
            return Err(JwtRejection::WrongType);
        }
        if header.crit {
            return Err(JwtRejection::CriticalHeader);
        }
        Ok(Jws {
            signing_input,
            payload_text,
            signature,
            kid: header.kid.map(Cow::into_owned),
        })
    }

    /// Constant-time signature check.
    pub fn verify_signature(&self, key: &hmac::Key) -> Result<(), JwtRejection> {
        hmac::verify(key, self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwtRejection::BadSignature)
    }

    /// The payload, decoded; only meaningful after [`Jws::verify_signature`].
    pub fn payload(&self) -> Result<Vec<u8>, JwtRejection> {
        decode_segment(self.payload_text)
    }
}

/// `exp`: refused from that second on, without leeway (RFC 7519 section 4.1.4 allows some;
/// paygate's login answer states `expires_at`, and that is when the token ends).
pub fn check_expiry(exp: i64, now_s: i64) -> Result<(), JwtRejection> {
    if now_s >= exp {
        Err(JwtRejection::Expired)
    } else {
        Ok(())
    }
}

/// The whole verification of a token paygate could have issued. `max_lifetime_s` is the
/// longest `exp - iat` accepted.
pub fn verify(
    token: &str,
    keys: &KeySet,
    now_s: i64,
    max_lifetime_s: i64,
) -> Result<Claims, JwtRejection> {
    let jws = Jws::parse(token)?;
    let key = jws
        .kid
        .as_deref()
        .and_then(|kid| keys.find(kid))
        .ok_or(JwtRejection::UnknownKey)?;
    jws.verify_signature(&key.key)?;
    // From here on the payload is ours (or made with our key).
    let claims: Claims = serde_json::from_slice(&jws.payload()?)
        .map_err(|e| rejection(&e, JwtRejection::BadClaims))?;
    if claims.iss != ISSUER {
        return Err(JwtRejection::WrongIssuer);
    }
    if !claims.aud.includes(AUDIENCE) {
        return Err(JwtRejection::WrongAudience);
    }
    check_expiry(claims.exp, now_s)?;
    if now_s.saturating_add(LEEWAY_S) < claims.nbf {
        return Err(JwtRejection::NotYetValid);
    }
    if claims.iat > now_s.saturating_add(LEEWAY_S) {
        return Err(JwtRejection::IssuedInFuture);
    }
    if claims.exp.saturating_sub(claims.iat) > max_lifetime_s || claims.exp < claims.iat {
        return Err(JwtRejection::LifetimeTooLong);
    }
    if amr_from(&claims.amr).is_none() {
        return Err(JwtRejection::UnknownAmr);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    const NOW: i64 = 1_800_000_000;
    const TTL: i64 = 3600;

    fn claims() -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: Audience::One(AUDIENCE.into()),
            sub: "alice".into(),
            iat: NOW,
            nbf: NOW,
            exp: NOW + TTL,
            jti: "0b7c4c1e-4c1f-4d55-9b4e-1a2b3c4d5e6f".into(),
            amr: vec!["pwd".into()],
        }
    }

    fn keys() -> KeySet {
        KeySet::generate(&SystemRandom::new(), NOW).unwrap()
    }

    /// A token with arbitrary header and payload JSON, signed with `key`.
    fn forge(key: &SigningKey, header: &str, payload: &str) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let tag = hmac::sign(&key.key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    fn header(key: &SigningKey) -> String {
        format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#, key.kid)
    }

    fn payload(claims: &Claims) -> String {
        serde_json::to_string(claims).unwrap()
    }

    #[test]
    fn a_signed_token_verifies_and_round_trips() {
        let keys = keys();
        let token = sign(keys.current(), &claims());
        assert_eq!(verify(&token, &keys, NOW, TTL), Ok(claims()));
        assert!(token.len() < 400, "{}", token.len());
    }

    #[test]
    fn rfc_7515_appendix_a1_hs256_example() {
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.\
                     eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.\
                     dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let k = URL_SAFE_NO_PAD
            .decode(
                "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow",
            )
            .unwrap();
        let jws = Jws::parse(token).unwrap();
        assert_eq!(jws.kid, None);
        jws.verify_signature(&hmac::Key::new(hmac::HMAC_SHA256, &k))
            .unwrap();
        let wrong = hmac::Key::new(hmac::HMAC_SHA256, b"another key");
        assert_eq!(
            jws.verify_signature(&wrong),
            Err(JwtRejection::BadSignature)
        );
        let payload: serde_json::Value = serde_json::from_slice(&jws.payload().unwrap()).unwrap();
        assert_eq!(payload["iss"], "joe");
        let exp = payload["exp"].as_i64().unwrap();
        assert_eq!(exp, 1_300_819_380);
        assert_eq!(check_expiry(exp, NOW), Err(JwtRejection::Expired));
        assert_eq!(check_expiry(exp, exp - 1), Ok(()));
    }

    #[test]
    fn header_rules() {
        let keys = keys();
        let key = keys.current();
        let body = payload(&claims());
        let kid = &key.kid;
        let cases = [
            (
                format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"alg":"None","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"alg":"NONE","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"alg":"hs256","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"alg":"HS512","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"alg":"RS256","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::AlgorithmNotAllowed,
            ),
            (
                format!(r#"{{"typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::BadHeader,
            ),
            (
                format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
                JwtRejection::WrongType,
            ),
            (
                format!(r#"{{"alg":"HS256","typ":"JOSE+JSON","kid":"{kid}"}}"#),
                JwtRejection::WrongType,
            ),
            (
                r#"{"alg":"HS256","typ":"JWT"}"#.to_owned(),
                JwtRejection::UnknownKey,
            ),
            (
                r#"{"alg":"HS256","typ":"JWT","kid":"../../etc/passwd"}"#.to_owned(),
                JwtRejection::UnknownKey,
            ),
            (
                format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}","crit":["exp"]}}"#),
                JwtRejection::CriticalHeader,
            ),
            (
                format!(r#"{{"alg":"HS256","alg":"none","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::DuplicateMember,
            ),
            (
                format!(r#"{{"alg":"none","alg":"HS256","typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::DuplicateMember,
            ),
            (
                format!(r#"{{"alg":["HS256"],"typ":"JWT","kid":"{kid}"}}"#),
                JwtRejection::BadHeader,
            ),
            ("[]".to_owned(), JwtRejection::BadHeader),
        ];
        for (header, expected) in cases {
            let token = forge(key, &header, &body);
            assert_eq!(verify(&token, &keys, NOW, TTL), Err(expected), "{header}");
        }
    }

    #[test]
    fn encoding_and_shape_rules() {
        let keys = keys();
        let token = sign(keys.current(), &claims());
        let (input, signature) = token.rsplit_once('.').unwrap();
        let cases = [
            (format!("{input}."), JwtRejection::BadSignature),
            (input.to_owned(), JwtRejection::Malformed),
            (format!("{token}.x"), JwtRejection::Malformed),
            (format!("{input}.{signature}="), JwtRejection::BadEncoding),
            (format!("{input}.{signature} "), JwtRejection::BadEncoding),
            (format!(" {token}"), JwtRejection::BadEncoding),
            (
                format!("{input}.+{}", &signature[1..]),
                JwtRejection::BadEncoding,
            ),
            (
                format!("{input}./{}", &signature[1..]),
                JwtRejection::BadEncoding,
            ),
            ("a".repeat(MAX_TOKEN_BYTES + 1), JwtRejection::Oversized),
        ];
        for (token, expected) in cases {
            assert_eq!(verify(&token, &keys, NOW, TTL), Err(expected), "{token}");
        }
        // Padding anywhere, not only on the signature.
        let (header, rest) = token.split_once('.').unwrap();
        let padded = format!("{header}==.{rest}");
        assert_eq!(
            verify(&padded, &keys, NOW, TTL),
            Err(JwtRejection::BadEncoding)
        );
    }

    #[test]
    fn the_signature_is_checked_before_any_claim() {
        let keys = keys();
        let other = KeySet::generate(&SystemRandom::new(), NOW).unwrap();
        // Signed with a key we do not have, under our kid: bad signature, although the
        // claims are also wrong in every way.
        let mut bad = claims();
        bad.iss = "mallory".into();
        bad.exp = 0;
        let mut forged_key = other.current().clone();
        forged_key.kid = keys.current().kid.clone();
        let token = sign(&forged_key, &bad);
        assert_eq!(
            verify(&token, &keys, NOW, TTL),
            Err(JwtRejection::BadSignature)
        );
        // A tampered payload under a genuine signature.
        let genuine = sign(keys.current(), &claims());
        let mut parts: Vec<&str> = genuine.split('.').collect();
        let mut admin = claims();
        admin.sub = "admin".into();
        let tampered_payload = URL_SAFE_NO_PAD.encode(payload(&admin));
        parts[1] = &tampered_payload;
        assert_eq!(
            verify(&parts.join("."), &keys, NOW, TTL),
            Err(JwtRejection::BadSignature)
        );
    }

    #[test]
    fn claim_rules() {
        let keys = keys();
        let key = keys.current();
        let check = |change: &dyn Fn(&mut Claims), now: i64| {
            let mut c = claims();
            change(&mut c);
            verify(&sign(key, &c), &keys, now, TTL)
        };
        assert_eq!(
            check(&|c| c.iss = "someone".into(), NOW),
            Err(JwtRejection::WrongIssuer)
        );
        assert_eq!(
            check(&|c| c.aud = Audience::One("other".into()), NOW),
            Err(JwtRejection::WrongAudience)
        );
        assert!(check(
            &|c| c.aud = Audience::Many(vec!["x".into(), AUDIENCE.into()]),
            NOW
        )
        .is_ok());
        // Expiry to the second, without leeway; not-before with exactly 60 s.
        assert!(check(&|_| {}, NOW + TTL - 1).is_ok());
        assert_eq!(check(&|_| {}, NOW + TTL), Err(JwtRejection::Expired));
        assert!(check(&|c| c.nbf = NOW + LEEWAY_S, NOW).is_ok());
        assert_eq!(
            check(
                &|c| {
                    c.nbf = NOW + LEEWAY_S + 1;
                    c.exp = c.nbf + 10;
                    c.iat = NOW;
                },
                NOW
            ),
            Err(JwtRejection::NotYetValid)
        );
        assert_eq!(
            check(
                &|c| {
                    c.iat = NOW + LEEWAY_S + 1;
                    c.nbf = NOW;
                    c.exp = c.iat + 10;
                },
                NOW
            ),
            Err(JwtRejection::IssuedInFuture)
        );
        assert_eq!(
            check(&|c| c.exp = c.iat + TTL + 1, NOW),
            Err(JwtRejection::LifetimeTooLong)
        );
        assert_eq!(
            check(&|c| c.amr = vec!["otp".into()], NOW),
            Err(JwtRejection::UnknownAmr)
        );
        assert!(check(&|c| c.amr = vec!["pwd".into(), "otp".into()], NOW).is_ok());
    }

    #[test]
    fn claims_are_parsed_strictly() {
        let keys = keys();
        let key = keys.current();
        let good = payload(&claims());
        let duplicate_sub = good.replacen('{', r#"{"sub":"admin","#, 1);
        let float_exp = good.replace(&format!("\"exp\":{}", NOW + TTL), "\"exp\":1.8e9");
        let missing_jti = serde_json::to_string(&{
            let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
            v.as_object_mut().unwrap().remove("jti");
            v
        })
        .unwrap();
        let nested_duplicate = good.replacen('{', r#"{"x":{"a":1,"a":2},"#, 1);
        for (payload, expected) in [
            (duplicate_sub, JwtRejection::DuplicateMember),
            (nested_duplicate, JwtRejection::DuplicateMember),
            (float_exp, JwtRejection::BadClaims),
            (missing_jti, JwtRejection::BadClaims),
            ("not json".to_owned(), JwtRejection::BadClaims),
        ] {
            let token = forge(key, &header(key), &payload);
            assert_eq!(verify(&token, &keys, NOW, TTL), Err(expected), "{payload}");
        }
        // Unknown claims are ignored, as RFC 7519 asks.
        let extra = good.replacen('{', r#"{"scope":"x","#, 1);
        assert!(verify(&forge(key, &header(key), &extra), &keys, NOW, TTL).is_ok());
    }

    #[test]
    fn retired_keys_verify_and_unknown_ones_do_not() {
        let rng = SystemRandom::new();
        let old = KeySet::generate(&rng, NOW).unwrap();
        let token = sign(old.current(), &claims());
        let rotated = old.rotated(&rng, NOW).unwrap();
        assert!(verify(&token, &rotated, NOW, TTL).is_ok());
        let (pruned, _) = rotated.pruned(NOW + 10 * TTL, TTL);
        assert_eq!(
            verify(&token, &pruned, NOW, TTL),
            Err(JwtRejection::UnknownKey)
        );
    }
}
