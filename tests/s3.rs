//! The audit archive's S3 client against a real S3-compatible service (SeaweedFS, started by
//! `scripts/s3.sh`, which `bash scripts/pg.sh run cargo test` runs): create-only writes,
//! checksums the service verifies, Object Lock in COMPLIANCE mode, listings, and refusals
//! of a wrong signature.
//!
//! Needs `PAYGATE_TEST_S3_ENDPOINT`, `PAYGATE_TEST_S3_ACCESS_KEY` and
//! `PAYGATE_TEST_S3_SECRET_KEY`. Each test works in a bucket of its own.

use bytes::Bytes;
use http::Method;
use paygate::s3::{Bucket, Credentials, Listed, Put, S3Error};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with `bash scripts/pg.sh run cargo test`, which starts SeaweedFS (scripts/s3.sh)")
    })
}

fn credentials() -> Credentials {
    Credentials {
        access_key_id: env("PAYGATE_TEST_S3_ACCESS_KEY"),
        secret_access_key: env("PAYGATE_TEST_S3_SECRET_KEY"),
    }
}

fn bucket_named(name: &str, credentials: Credentials) -> Bucket {
    let ca = std::path::Path::new("/etc/ssl/certs/ca-certificates.crt");
    Bucket::new(
        &env("PAYGATE_TEST_S3_ENDPOINT"),
        "us-east-1",
        name,
        credentials,
        ca,
    )
    .unwrap()
}

/// A new bucket, with Object Lock (and so versioning) when `locked`.
async fn new_bucket(locked: bool) -> Bucket {
    let name = format!(
        "paygate-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let bucket = bucket_named(&name, credentials());
    let lock = [("x-amz-bucket-object-lock-enabled", "true".to_owned())];
    let headers = if locked { &lock[..] } else { &[][..] };
    let created = bucket
        .send(Method::PUT, "", &[], headers, Bytes::new())
        .await
        .unwrap();
    assert!(created.status.is_success(), "{created:?}");
    bucket
}

fn in_a_day() -> i64 {
    paygate::time::now_millis() + 86_400_000
}

#[tokio::test]
async fn a_segment_is_stored_once_listed_and_read_back() {
    let bucket = new_bucket(false).await;
    let key = "audit/node-a/1/000001.jsonl";
    let body = Bytes::from_static(b"{\"seq\":1}\n{\"seq\":2}\n");
    assert!(matches!(
        bucket.put_new(key, body.clone(), None).await.unwrap(),
        Put::Created { .. }
    ));
    // Create-only: the same key again writes nothing, whatever the body.
    let other = Bytes::from_static(b"{\"seq\":9}\n");
    assert_eq!(bucket.put_new(key, other, None).await.unwrap(), Put::Exists);
    assert_eq!(bucket.get(key).await.unwrap(), Some(body.clone()));
    assert_eq!(bucket.get("audit/none").await.unwrap(), None);
    bucket
        .put_new(
            "audit/node-a/1/000002.jsonl",
            Bytes::from_static(b"x\n"),
            None,
        )
        .await
        .unwrap();
    bucket
        .put_new("other/000001.jsonl", Bytes::from_static(b"y\n"), None)
        .await
        .unwrap();
    assert_eq!(
        bucket.list("audit/").await.unwrap(),
        [
            Listed {
                key: key.into(),
                size: body.len() as u64
            },
            Listed {
                key: "audit/node-a/1/000002.jsonl".into(),
                size: 2
            }
        ]
    );
}

#[tokio::test]
async fn the_service_refuses_a_body_that_does_not_match_its_checksum() {
    let bucket = new_bucket(false).await;
    let sent = bucket
        .send(
            Method::PUT,
            "audit/x",
            &[],
            &[(
                "x-amz-checksum-sha256",
                // The SHA-256 of something else.
                "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".to_owned(),
            )],
            Bytes::from_static(b"tampered in transit"),
        )
        .await
        .unwrap();
    assert_eq!(sent.status.as_u16(), 400, "{sent:?}");
    assert_eq!(bucket.get("audit/x").await.unwrap(), None);
}

#[tokio::test]
async fn a_locked_segment_cannot_be_deleted_or_its_retention_shortened() {
    let bucket = new_bucket(true).await;
    let key = "audit/node-a/1/000001.jsonl";
    let body = Bytes::from_static(b"{\"seq\":1}\n");
    let Put::Created {
        version: Some(version),
    } = bucket
        .put_new(key, body.clone(), Some(in_a_day()))
        .await
        .unwrap()
    else {
        panic!("no version id from a versioned bucket");
    };
    // Deleting the version itself is refused while it is retained.
    let deleted = bucket
        .send(
            Method::DELETE,
            key,
            &[("versionId", &version)],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(deleted.status.as_u16(), 403, "{deleted:?}");
    // So is shortening COMPLIANCE retention.
    let sooner = paygate::time::format_rfc3339_millis(paygate::time::now_millis() + 60_000);
    let retention = format!(
        "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
         <RetainUntilDate>{sooner}</RetainUntilDate></Retention>"
    );
    let shortened = bucket
        .send(
            Method::PUT,
            key,
            &[("retention", ""), ("versionId", &version)],
            &[],
            Bytes::from(retention),
        )
        .await
        .unwrap();
    assert_eq!(shortened.status.as_u16(), 403, "{shortened:?}");
    // Against a version without retention in the same bucket, the same delete works: the
    // refusal above is the lock's.
    let Put::Created {
        version: Some(free),
    } = bucket
        .put_new("audit/unlocked", Bytes::from_static(b"x"), None)
        .await
        .unwrap()
    else {
        panic!("no version id from a versioned bucket");
    };
    let deleted = bucket
        .send(
            Method::DELETE,
            "audit/unlocked",
            &[("versionId", &free)],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert!(deleted.status.is_success(), "{deleted:?}");
    // The version is still there, unchanged.
    let read = bucket
        .send(
            Method::GET,
            key,
            &[("versionId", &version)],
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(read.body, body);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_never_shown() {
    let bucket = new_bucket(false).await;
    let wrong = Credentials {
        access_key_id: credentials().access_key_id,
        secret_access_key: "not the secret".into(),
    };
    let impostor = bucket_named(bucket.name(), wrong);
    let refused = impostor
        .put_new("audit/x", Bytes::from_static(b"x"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, S3Error::Refused { status: 403, .. }),
        "{refused}"
    );
    assert!(!format!("{refused} {impostor:?}").contains("not the secret"));
    assert_eq!(bucket.get("audit/x").await.unwrap(), None);
}
