//! A small S3 client for the audit archive: the few operations it needs (create-only PUT
//! with a SHA-256 checksum the service verifies and Object Lock retention, GET, list,
//! DELETE), signed with SigV4 ([`sigv4`]) and sent with hyper over TCP, or over rustls
//! (ring) for an `https` endpoint. Path-style addressing (`ENDPOINT/BUCKET/KEY`), which
//! S3-compatible services (SeaweedFS, MinIO, Ceph) and AWS all accept.
//!
//! One connection per request: the archive sends a few requests per sealed segment (about
//! one an hour per worker), so a pool would buy nothing.

pub mod sigv4;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

pub use sigv4::Credentials;

/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request did not get an answer, or got one that is an error.
#[derive(Debug)]
pub enum S3Error {
    /// No answer: the endpoint is unreachable, the TLS handshake failed, or it timed out.
    Unreachable(String),
    /// The service answered with an error status; `code` is its S3 error code when the
    /// body names one (`AccessDenied`, `NoSuchBucket`, …).
    Refused { status: u16, code: String },
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            S3Error::Unreachable(why) => write!(f, "unreachable: {why}"),
            S3Error::Refused { status, code } => write!(f, "refused: {status} {code}"),
        }
    }
}

impl std::error::Error for S3Error {}

/// An answer from the service.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a create-only PUT did.
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// The object was created with this body; on a versioned bucket, as this version.
    Created { version: Option<String> },
    /// An object already had the key; nothing was written (412).
    Exists,
}

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// A bucket on an S3-compatible service, with the credentials to use it.
#[derive(Clone)]
pub struct Bucket {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    region: String,
    bucket: String,
    credentials: Credentials,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.port, self.bucket)
    }
}

impl Bucket {
    /// `endpoint` is `http://HOST[:PORT]` or `https://HOST[:PORT]`; for `https`, the
    /// server's certificate is checked against the CA certificates in `ca_file` (a PEM
    /// bundle; the system's is `/etc/ssl/certs/ca-certificates.crt`).
    pub fn new(
        endpoint: &str,
        region: &str,
        bucket: &str,
        credentials: Credentials,
        ca_file: &std::path::Path,
    ) -> Result<Bucket, String> {
        let bad = || format!("`{endpoint}` is not an http:// or https:// URL of an S3 endpoint");
        let (tls, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = endpoint.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad());
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(bad());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host.to_owned(), port.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (authority.to_owned(), if tls { 443 } else { 80 }),
        };
        let tls = if tls {
            Some(Arc::new(client_config(ca_file)?))
        } else {
            None
        };
        Ok(Bucket {
            tls,
            host,
            port,
            region: region.to_owned(),
            bucket: bucket.to_owned(),
            credentials,
        })
    }

    /// The bucket's name.
    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// Stores `body` at `key` unless an object already has it (`If-None-Match: *`), with
    /// its SHA-256 for the service to check, and, with `retain_until` (Unix ms), Object
    /// Lock retention in COMPLIANCE mode until then.
    pub async fn put_new(
        &self,
        key: &str,
        body: Bytes,
        retain_until: Option<i64>,
    ) -> Result<Put, S3Error> {
        // One hash of the body serves the checksum and the signature.
        let sha256 = ring::digest::digest(&ring::digest::SHA256, &body);
        let checksum = base64::engine::general_purpose::STANDARD.encode(sha256.as_ref());
        let mut headers = vec![
            ("if-none-match", "*".to_owned()),
            ("x-amz-checksum-sha256", checksum),
            ("content-type", "application/octet-stream".to_owned()),
        ];
        if let Some(until) = retain_until {
            headers.push(("x-amz-object-lock-mode", "COMPLIANCE".to_owned()));
            headers.push((
                "x-amz-object-lock-retain-until-date",
                crate::time::format_rfc3339_millis(until),
            ));
        }
        let answer = self
            .send_hashed(
                Method::PUT,
                key,
                &[],
                &headers,
                body,
                sigv4::hex(sha256.as_ref()),
            )
            .await?;
        match answer.status.as_u16() {
            200..=299 => Ok(Put::Created {
                version: answer
                    .headers
                    .get("x-amz-version-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            }),
            412 => Ok(Put::Exists),
            _ => Err(refused(&answer)),
        }
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, S3Error> {
        let answer = self.send(Method::GET, key, &[], &[], Bytes::new()).await?;
        match answer.status.as_u16() {
            200 => Ok(Some(answer.body)),
            404 => Ok(None),
            _ => Err(refused(&answer)),
        }
    }

    /// Deletes the object at `key` (its newest version; on a versioned bucket, a delete
    /// marker). Locked objects refuse with `AccessDenied`.
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        let answer = self
            .send(Method::DELETE, key, &[], &[], Bytes::new())
            .await?;
        match answer.status.as_u16() {
            200..=299 => Ok(()),
            _ => Err(refused(&answer)),
        }
    }

    /// Every object whose key starts with `prefix`, in key order (ListObjectsV2, page by
    /// page).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut listed = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type", "2"), ("prefix", prefix)];
            if let Some(token) = &token {
                query.push(("continuation-token", token));
            }
            let answer = self
                .send(Method::GET, "", &query, &[], Bytes::new())
                .await?;
            if answer.status != StatusCode::OK {
                return Err(refused(&answer));
            }
            let text = String::from_utf8_lossy(&answer.body);
            for contents in elements(&text, "Contents") {
                let key = elements(contents, "Key").next().map(unescape_xml);
                let size = elements(contents, "Size")
                    .next()
                    .and_then(|s| s.parse().ok());
                if let (Some(key), Some(size)) = (key, size) {
                    listed.push(Listed { key, size });
                }
            }
            let truncated = elements(&text, "IsTruncated").next() == Some("true");
            token = elements(&text, "NextContinuationToken")
                .next()
                .map(unescape_xml);
            if !truncated || token.is_none() {
                break;
            }
        }
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    /// Signs and sends one request for `key` (empty: the bucket itself).
    pub async fn send(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        body: Bytes,
    ) -> Result<Answer, S3Error> {
        let payload = sigv4::sha256_hex(&body);
        self.send_hashed(method, key, query, extra, body, payload)
            .await
    }

    /// [`Bucket::send`] with the body's SHA-256 (hex) already computed.
    async fn send_hashed(
        &self,
        method: Method,
        key: &str,
        query: &[(&str, &str)],
        extra: &[(&str, String)],
        body: Bytes,
        payload: String,
    ) -> Result<Answer, S3Error> {
        let path = sigv4::encode_path(&format!("/{}/{key}", self.bucket));
        let path = if key.is_empty() {
            path.trim_end_matches('/').to_owned()
        } else {
            path
        };
        let host = match (self.tls.is_some(), self.port) {
            (true, 443) | (false, 80) => self.host.clone(),
            _ => format!("{}:{}", self.host, self.port),
        };
        let date = sigv4::amz_date(crate::time::now_millis());
        let mut headers: Vec<(&str, &str)> = vec![
            ("host", &host),
            ("x-amz-content-sha256", &payload),
            ("x-amz-date", &date),
        ];
        headers.extend(extra.iter().map(|(name, value)| (*name, value.as_str())));
        let signed = sigv4::Request {
            method: method.as_str(),
            path: &path,
            query,
            headers: &headers,
            payload_sha256: &payload,
        };
        let authorization =
            sigv4::authorization(&self.credentials, &self.region, "s3", &date, &signed);
        let query = sigv4::canonical_query(query);
        let uri = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in &headers {
            request = request.header(*name, *value);
        }
        let request = request
            .header("authorization", authorization)
            .body(Full::new(body))
            .map_err(|e| S3Error::Unreachable(format!("building the request: {e}")))?;
        tokio::time::timeout(TIMEOUT, self.exchange(request))
            .await
            .map_err(|_| S3Error::Unreachable(format!("no answer within {}s", TIMEOUT.as_secs())))?
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<Answer, S3Error> {
        let unreachable = |e: &dyn std::fmt::Display| {
            S3Error::Unreachable(format!("{}:{}: {e}", self.host, self.port))
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(&e))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => round_trip(TokioIo::new(tcp), request).await,
            Some(config) => {
                let name = ServerName::try_from(self.host.trim_matches(['[', ']']).to_owned())
                    .map_err(|e| unreachable(&e))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(&e))?;
                round_trip(TokioIo::new(stream), request).await
            }
        }
        .map_err(|e| unreachable(&e))
    }
}

async fn round_trip<T>(io: T, request: Request<Full<Bytes>>) -> Result<Answer, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driving = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    let result = match response {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            body.collect().await.map(|body| Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.to_bytes(),
            })
        }
        Err(e) => Err(e),
    };
    driving.abort();
    result
}

/// The error an answer carries: its status and the S3 error code of its XML body.
fn refused(answer: &Answer) -> S3Error {
    let text = String::from_utf8_lossy(&answer.body);
    let code = elements(&text, "Code").next().unwrap_or("").to_owned();
    S3Error::Refused {
        status: answer.status.as_u16(),
        code,
    }
}

/// The contents of each `<name>…</name>` element in `xml`, in order (S3's answers are
/// flat enough that this is all the XML the client needs).
fn elements<'a>(xml: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let end = start + rest[start..].find(&close)?;
        let found = &rest[start..end];
        rest = &rest[end + close.len()..];
        Some(found)
    })
}

fn unescape_xml(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// TLS to an `https` endpoint, checked against the CA certificates in `ca_file`.
fn client_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    let unreadable = |e: &dyn std::fmt::Display| {
        format!("cannot read CA certificates {}: {e}", ca_file.display())
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| unreadable(&e))? {
        roots
            .add(cert.map_err(|e| unreadable(&e))?)
            .map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"no certificate in it"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to the archive: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_and_errors_are_read_from_s3_xml() {
        let xml = "<ListBucketResult><IsTruncated>true</IsTruncated>\
            <Contents><Key>a&amp;b/000001.jsonl</Key><Size>42</Size></Contents>\
            <Contents><Key>c</Key><Size>7</Size></Contents>\
            <NextContinuationToken>t1</NextContinuationToken></ListBucketResult>";
        let keys: Vec<String> = elements(xml, "Contents")
            .map(|c| unescape_xml(elements(c, "Key").next().unwrap()))
            .collect();
        assert_eq!(keys, ["a&b/000001.jsonl", "c"]);
        assert_eq!(elements(xml, "IsTruncated").next(), Some("true"));
        let answer = Answer {
            status: StatusCode::FORBIDDEN,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"<Error><Code>AccessDenied</Code></Error>"),
        };
        assert_eq!(refused(&answer).to_string(), "refused: 403 AccessDenied");
    }

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        let creds = || Credentials {
            access_key_id: "id".into(),
            secret_access_key: "secret".into(),
        };
        let none = std::path::Path::new("/nonexistent");
        let bucket = Bucket::new("http://127.0.0.1:8333", "us-east-1", "b", creds(), none).unwrap();
        assert_eq!((bucket.host.as_str(), bucket.port), ("127.0.0.1", 8333));
        let bucket = Bucket::new("http://s3.internal/", "us-east-1", "b", creds(), none).unwrap();
        assert_eq!((bucket.host.as_str(), bucket.port), ("s3.internal", 80));
        for bad in [
            "ftp://x",
            "http://",
            "http://a/b",
            "http://u@h",
            "http://h:port",
        ] {
            assert!(
                Bucket::new(bad, "us-east-1", "b", creds(), none).is_err(),
                "{bad}"
            );
        }
        // https needs readable CA certificates.
        let err = Bucket::new("https://s3.internal", "us-east-1", "b", creds(), none).unwrap_err();
        assert!(err.contains("/nonexistent"), "{err}");
    }
}
