//! One suite, both backends: every test below runs against the SQLite store (a data
//! directory) and the PostgreSQL store (a database of its own on the cluster
//! `PAYGATE_TEST_DATABASE` names; `bash scripts/pg.sh run cargo test` provides one). The
//! body of each test is written once and expanded for each backend, so a difference in
//! answers between them is a failure.
//!
//! "Nodes" are separate store handles on one database (for SQLite, on one data
//! directory): what one writes, the other must see and respect.
//!
//! Covered so far: users, opaque sessions, JWT revocation and TOTP state.

use paygate::domain::{Role, Username};
use paygate::store::{NewUser, UserInsert};

fn new_user(name: &str, role: Option<Role>) -> NewUser {
    NewUser {
        username: Username::parse("username", name).unwrap(),
        password_hash: format!("$argon2id$dummy-{name}"),
        role,
    }
}

/// An hour from now, in milliseconds.
fn later() -> i64 {
    paygate::time::now_millis() + 3_600_000
}

macro_rules! conformance {
    ($(async fn $name:ident($backend:ident) $body:block)*) => {
        mod sqlite {
            use super::*;
            use paygate::store::Store;

            /// A data directory the nodes share.
            pub struct Backend(std::path::PathBuf);

            impl Backend {
                fn new() -> Backend {
                    Backend(std::env::temp_dir().join(format!(
                        "paygate-conformance-{}",
                        uuid::Uuid::new_v4()
                    )))
                }

                async fn node(&self) -> Store {
                    Store::open(&self.0).unwrap()
                }
            }

            impl Drop for Backend {
                fn drop(&mut self) {
                    let _ = std::fs::remove_dir_all(&self.0);
                }
            }

            $(
                #[tokio::test]
                async fn $name() {
                    let $backend = Backend::new();
                    $body
                }
            )*
        }

        mod postgres {
            use super::*;
            use paygate::store::postgres::{DatabaseUrl, PgStore};
            use paygate::store::sealing::TotpKeys;
            use std::sync::Arc;

            /// A database the nodes share, and the sealing key they all hold.
            pub struct Backend {
                url: String,
                keys: std::path::PathBuf,
            }

            impl Backend {
                async fn new() -> Backend {
                    let base = std::env::var("PAYGATE_TEST_DATABASE").expect(
                        "PAYGATE_TEST_DATABASE is not set: run the tests as \
                         `bash scripts/pg.sh run cargo test`",
                    );
                    let (client, connection) =
                        tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(connection);
                    let name = format!("c_{}", uuid::Uuid::new_v4().simple());
                    client
                        .batch_execute(&format!("CREATE DATABASE {name}"))
                        .await
                        .unwrap();
                    let (prefix, _) = base.rsplit_once('/').unwrap();
                    let keys = std::env::temp_dir()
                        .join(format!("paygate-conformance-keys-{}", uuid::Uuid::new_v4()));
                    std::fs::create_dir_all(&keys).unwrap();
                    Backend {
                        url: format!("{prefix}/{name}"),
                        keys,
                    }
                }

                async fn node(&self) -> PgStore {
                    let keys = Arc::new(TotpKeys::load_or_create(&self.keys).unwrap());
                    let url = DatabaseUrl::parse(&self.url).unwrap();
                    PgStore::open(&url, 4, keys, paygate::time::Clock::system())
                        .await
                        .unwrap()
                }
            }

            impl Drop for Backend {
                fn drop(&mut self) {
                    let _ = std::fs::remove_dir_all(&self.keys);
                }
            }

            $(
                #[tokio::test]
                async fn $name() {
                    let $backend = Backend::new().await;
                    $body
                }
            )*
        }
    };
}

conformance! {
    async fn usernames_are_unique_and_roles_round_trip(backend) {
        let store = backend.node().await;
        let UserInsert::Created(alice) = store.create_user(new_user("alice", None)).await.unwrap()
        else {
            panic!("alice is new")
        };
        assert!(matches!(
            store.create_user(new_user("alice", Some(Role::Admin))).await.unwrap(),
            UserInsert::UsernameTaken
        ));
        let UserInsert::Created(carol) = store
            .create_user(new_user("carol", Some(Role::Auditor)))
            .await
            .unwrap()
        else {
            panic!("carol is new")
        };
        assert_ne!(alice.id, carol.id);
        let found = store.user_by_name("carol".into()).await.unwrap().unwrap();
        assert_eq!(
            (found.id, found.role, found.disabled, found.password_hash.as_str()),
            (carol.id, Some(Role::Auditor), false, "$argon2id$dummy-carol")
        );
        assert!(found.totp_secret.is_none());
        assert!(store.user_by_name("nobody".into()).await.unwrap().is_none());
        let subject = store.subject(alice.id).await.unwrap().unwrap();
        assert_eq!((subject.username.as_str(), subject.role), ("alice", None));
        assert!(store.subject(alice.id + 1000).await.unwrap().is_none());
    }

    async fn disabling_a_user_ends_their_sessions_on_every_node(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let UserInsert::Created(alice) = a.create_user(new_user("alice", None)).await.unwrap()
        else {
            panic!("alice is new")
        };
        a.create_session([1; 32], alice.id, "pwd".into(), later()).await.unwrap();
        a.create_session([2; 32], alice.id, "pwd otp".into(), later()).await.unwrap();
        let row = b.session([2; 32]).await.unwrap().unwrap();
        assert_eq!((row.subject.username.as_str(), row.amr.as_str()), ("alice", "pwd otp"));
        assert!(b.session([3; 32]).await.unwrap().is_none());

        assert!(b.end_session([1; 32]).await.unwrap());
        assert!(!a.end_session([1; 32]).await.unwrap(), "ended once");
        assert!(a.session([1; 32]).await.unwrap().is_none());

        assert!(b.disable_user("alice".into()).await.unwrap());
        assert!(!b.disable_user("nobody".into()).await.unwrap());
        assert!(a.session([2; 32]).await.unwrap().is_none(), "sessions end with the user");
        assert!(a.subject(alice.id).await.unwrap().unwrap().disabled);
        assert!(a.user_by_name("alice".into()).await.unwrap().unwrap().disabled);
    }

    async fn a_revoked_jwt_id_is_revoked_on_every_node(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        a.create_user(new_user("alice", None)).await.unwrap();
        let (subject, revoked) =
            b.jwt_subject("alice".into(), "j-1".into()).await.unwrap().unwrap();
        assert!(!revoked && !subject.disabled);
        a.revoke_jti("j-1".into(), later()).await.unwrap();
        a.revoke_jti("j-1".into(), later()).await.unwrap();
        let (_, revoked) = b.jwt_subject("alice".into(), "j-1".into()).await.unwrap().unwrap();
        assert!(revoked);
        let (_, other) = b.jwt_subject("alice".into(), "j-2".into()).await.unwrap().unwrap();
        assert!(!other);
        assert!(b.jwt_subject("nobody".into(), "j-1".into()).await.unwrap().is_none());
    }

    async fn totp_enrolment_and_each_code_step_used_once(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let UserInsert::Created(alice) = a.create_user(new_user("alice", None)).await.unwrap()
        else {
            panic!("alice is new")
        };
        let id = alice.id;
        assert_eq!(a.totp_state(id).await.unwrap(), Default::default());
        assert!(!a.use_totp_step(id, 10).await.unwrap(), "no secret, no step");

        a.set_pending_totp(id, b"first secret".to_vec()).await.unwrap();
        a.set_pending_totp(id, b"second secret".to_vec()).await.unwrap();
        let state = b.totp_state(id).await.unwrap();
        assert_eq!(state.pending.as_deref(), Some(&b"second secret"[..]));
        assert!(state.active.is_none());
        assert!(
            !b.confirm_totp(id, b"first secret".to_vec(), 100).await.unwrap(),
            "a replaced enrolment cannot be confirmed"
        );
        assert!(b.confirm_totp(id, b"second secret".to_vec(), 100).await.unwrap());
        assert!(!a.confirm_totp(id, b"second secret".to_vec(), 101).await.unwrap());
        let state = a.totp_state(id).await.unwrap();
        assert_eq!(
            (state.active.as_deref(), state.pending, state.last_step),
            (Some(&b"second secret"[..]), None, Some(100))
        );
        assert_eq!(
            a.user_by_name("alice".into()).await.unwrap().unwrap().totp_secret.as_deref(),
            Some(&b"second secret"[..])
        );

        assert!(!a.use_totp_step(id, 100).await.unwrap(), "the confirming step is used");
        assert!(a.use_totp_step(id, 101).await.unwrap());
        assert!(!b.use_totp_step(id, 101).await.unwrap(), "replayed on another node");
        assert!(!b.use_totp_step(id, 99).await.unwrap(), "older than the last");
        // The same new step offered to two nodes at once: exactly one accepts it.
        let (x, y) = tokio::join!(a.use_totp_step(id, 102), b.use_totp_step(id, 102));
        assert_eq!([x.unwrap(), y.unwrap()].iter().filter(|ok| **ok).count(), 1);
    }
}
