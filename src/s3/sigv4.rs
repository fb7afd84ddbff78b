//! AWS Signature Version 4 for S3 requests (header-based, payload signed): what an
//! S3-compatible service checks before it acts on a request. Pure functions over the
//! request's parts, checked against the vectors AWS publishes (the SigV4 test suite's
//! `get-vanilla`, `post-vanilla` and query-order cases, and the S3 API reference's GET,
//! PUT, lifecycle and list examples).

use ring::{digest, hmac};

/// The hex SHA-256 of an empty payload.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An access key and its secret. The secret is never logged or shown.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"REDACTED")
            .finish()
    }
}

/// One request to sign: `path` as sent (already percent-encoded, see [`encode_path`]),
/// `query` as name–value pairs (raw), `headers` with every header to sign (`host`
/// included), `payload_sha256` the hex SHA-256 of the body (also sent as
/// `x-amz-content-sha256` for S3).
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    pub headers: &'a [(&'a str, &'a str)],
    pub payload_sha256: &'a str,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// Percent-encodes `value` as SigV4 wants: everything but `A–Z a–z 0–9 - _ . ~`, and `/`
/// too unless `keep_slash`.
fn encode(value: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// An object key as an S3 path segment sequence: each byte encoded, `/` kept.
pub fn encode_path(raw: &str) -> String {
    encode(raw, true)
}

/// A query string in canonical form: pairs encoded, sorted by name then value.
pub fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (encode(k, false), encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request and the signed header names.
fn canonical_request(request: &Request<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| {
            let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
            (name.to_ascii_lowercase(), value)
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();
    let signed = headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        request.path,
        canonical_query(request.query),
        canonical_headers,
        signed,
        request.payload_sha256
    );
    (canonical, signed)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

/// The `Authorization` header for `request` at `amz_date` (`YYYYMMDDTHHMMSSZ`, the
/// request's `x-amz-date`), for `service` in `region`.
pub fn authorization(
    credentials: &Credentials,
    region: &str,
    service: &str,
    amz_date: &str,
    request: &Request<'_>,
) -> String {
    let day = &amz_date[..amz_date.len().min(8)];
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let (canonical, signed) = canonical_request(request);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let secret = format!("AWS4{}", credentials.secret_access_key);
    let key = [day, region, service, "aws4_request"]
        .iter()
        .fold(secret.into_bytes(), |key, part| {
            hmac_sha256(&key, part.as_bytes())
        });
    let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
        credentials.access_key_id
    )
}

/// `YYYYMMDDTHHMMSSZ` for Unix milliseconds.
pub fn amz_date(millis: i64) -> String {
    let iso = crate::time::format_rfc3339_millis(millis);
    // 2026-12-02T04:44:24.000Z → 20261202T044424Z
    let digits: String = iso[..19].chars().filter(|c| c.is_ascii_digit()).collect();
    format!("{}T{}Z", &digits[..8], &digits[8..14])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    fn s3_docs() -> Credentials {
        Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    fn signature(authorization: &str) -> &str {
        authorization.rsplit("Signature=").next().unwrap()
    }

    /// The SigV4 test suite (service `service`, 2015-08-30T12:36:00Z).
    #[test]
    fn the_sigv4_test_suite_vanilla_requests() {
        let headers = [
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ];
        for (method, query, expected) in [
            (
                "GET",
                &[][..],
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "POST",
                &[][..],
                "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
            ),
            (
                "GET",
                &[("Param2", "value2"), ("Param1", "value1")][..],
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
        ] {
            let request = Request {
                method,
                path: "/",
                query,
                headers: &headers,
                payload_sha256: EMPTY_SHA256,
            };
            let auth = authorization(
                &suite(),
                "us-east-1",
                "service",
                "20150830T123600Z",
                &request,
            );
            assert_eq!(signature(&auth), expected, "{method} {query:?}");
        }
        let request = Request {
            method: "GET",
            path: "/",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_SHA256,
        };
        assert_eq!(
            authorization(
                &suite(),
                "us-east-1",
                "service",
                "20150830T123600Z",
                &request
            ),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// The Amazon S3 API Reference's header-based examples (2013-05-24, examplebucket).
    #[test]
    fn the_s3_api_reference_examples() {
        let host = ("Host", "examplebucket.s3.amazonaws.com");
        let date = ("x-amz-date", "20130524T000000Z");
        let empty = ("x-amz-content-sha256", EMPTY_SHA256);
        let sign = |request: &Request<'_>| {
            authorization(&s3_docs(), "us-east-1", "s3", "20130524T000000Z", request)
        };
        // GET Object, with a Range header.
        let get = Request {
            method: "GET",
            path: &encode_path("/test.txt"),
            query: &[],
            headers: &[host, ("Range", "bytes=0-9"), empty, date],
            payload_sha256: EMPTY_SHA256,
        };
        assert_eq!(
            signature(&sign(&get)),
            "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
        // PUT Object: a key that needs encoding, a signed payload.
        let body = sha256_hex(b"Welcome to Amazon S3.");
        assert_eq!(
            body,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let put = Request {
            method: "PUT",
            path: &encode_path("/test$file.text"),
            query: &[],
            headers: &[
                ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                host,
                ("x-amz-content-sha256", &body),
                date,
                ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ],
            payload_sha256: &body,
        };
        assert_eq!(put.path, "/test%24file.text");
        let auth = sign(&put);
        assert!(auth.contains(
            "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class"
        ));
        assert_eq!(
            signature(&auth),
            "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
        );
        // GET Bucket Lifecycle (a parameter without a value) and List Objects.
        for (query, expected) in [
            (
                &[("lifecycle", "")][..],
                "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
            ),
            (
                &[("max-keys", "2"), ("prefix", "J")][..],
                "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
            ),
        ] {
            let request = Request {
                method: "GET",
                path: "/",
                query,
                headers: &[host, empty, date],
                payload_sha256: EMPTY_SHA256,
            };
            assert_eq!(signature(&sign(&request)), expected, "{query:?}");
        }
    }

    #[test]
    fn dates_and_encodings() {
        assert_eq!(amz_date(1_440_938_160_000), "20150830T123600Z");
        assert_eq!(
            canonical_query(&[("b", "x y"), ("a", "1/2")]),
            "a=1%2F2&b=x%20y"
        );
        assert_eq!(
            encode_path("/audit/node-1/000001.jsonl"),
            "/audit/node-1/000001.jsonl"
        );
        let secret = format!("{:?}", s3_docs());
        assert!(!secret.contains("bPxRfiCY"), "{secret}");
    }
}
