//! One suite, both backends: every test below runs, through the `Store` seam the server
//! uses, against the SQLite store (a data directory) and the PostgreSQL store (a database
//! of its own on the cluster
//! `PAYGATE_TEST_DATABASE` names; `bash scripts/pg.sh run cargo test` provides one). The
//! body of each test is written once and expanded for each backend, so a difference in
//! answers between them is a failure.
//!
//! "Nodes" are separate store handles on one database (for SQLite, on one data
//! directory): what one writes, the other must see and respect.
//!
//! Covered so far: users, opaque sessions, JWT revocation, TOTP state, accounts and
//! grants, payments and idempotency keys, capabilities, the sweeps, the change log.

use paygate::domain::{Currency, Perm, Perms, Role, Username};
use paygate::store::{
    CancelOutcome, CapabilityInsert, Change, ChangesSince, EarlierUse, KeyedRequest, MemberRemoval,
    MemberUpsert, NewCapability, NewUser, Payment, PaymentCreation, PaymentStatus, Refusal,
    StoreError, StoredResponse, UserInsert, MAX_DERIVATION_DEPTH, MAX_PER_ROOT,
};

fn new_user(name: &str, role: Option<Role>) -> NewUser {
    NewUser {
        username: Username::parse("username", name).unwrap(),
        password_hash: format!("$argon2id$dummy-{name}"),
        role,
    }
}

fn perms(letters: &str) -> Perms {
    Perms::parse("perms", letters).unwrap()
}

fn eur() -> Currency {
    Currency::parse("currency", "EUR").unwrap()
}

/// Creates the user `name` through `store` and returns their id.
macro_rules! user {
    ($store:expr, $name:expr) => {
        match $store.create_user(new_user($name, None)).await.unwrap() {
            UserInsert::Created(user) => user.id,
            UserInsert::UsernameTaken => panic!("{} exists", $name),
        }
    };
}

/// A payment of `amount` on `account`, as a handler hands it to the store (id and time
/// are the store's to assign).
fn payment(account: uuid::Uuid, amount: i64) -> Payment {
    Payment {
        id: uuid::Uuid::nil(),
        account_id: account,
        payee: "ACME".into(),
        amount_minor: amount,
        currency: "EUR".into(),
        reference: format!("invoice {amount}"),
        status: PaymentStatus::Pending,
        created_by: String::new(),
        created_at: 0,
        cancelled_at: None,
    }
}

/// The response a key replays: here, the payment's id and time.
fn answer(payment: &Payment) -> Result<StoredResponse, StoreError> {
    Ok(StoredResponse {
        status: 201,
        body: format!("{} {}", payment.id, payment.created_at),
        location: Some(format!("/payments/{}", payment.id)),
    })
}

fn keyed(user: i64, key: &str, hash: u8) -> Option<KeyedRequest> {
    Some(KeyedRequest {
        user,
        key: key.into(),
        request_hash: [hash; 32],
    })
}

/// A capability on `payment` minted by `minter`, derived from `parent` if given.
fn capability(
    hash: u8,
    account: uuid::Uuid,
    payment: uuid::Uuid,
    minter: i64,
    parent: Option<uuid::Uuid>,
    expires_at: i64,
) -> NewCapability {
    NewCapability {
        token_hash: [hash; 32],
        account_id: account,
        payment_id: payment,
        perms: Perms::READ_ONLY,
        minted_by: minter,
        parent_id: parent,
        expires_at,
    }
}

/// Creates a payment through `store` and returns its id.
macro_rules! new_payment {
    ($store:expr, $account:expr, $user:expr) => {
        match $store
            .create_payment(payment($account, 100), $user, None, answer)
            .await
            .unwrap()
        {
            PaymentCreation::Created(response) => response
                .body
                .split_once(' ')
                .unwrap()
                .0
                .parse::<uuid::Uuid>()
                .unwrap(),
            other => panic!("{other:?}"),
        }
    };
}

/// Mints `new` through `store`, which must accept it; its id.
macro_rules! mint {
    ($store:expr, $new:expr) => {
        match $store.create_capability($new).await.unwrap() {
            CapabilityInsert::Created(created) => created.id,
            other => panic!("{other:?}"),
        }
    };
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

                /// Another process's view of the rate-limit buckets.
                async fn rate_node(&self) -> paygate::store::RateStore {
                    paygate::store::RateStore::open(&self.0).unwrap()
                }

                /// The change log after `seen`, as a worker's cache reads it.
                async fn changes(&self, seen: i64) -> paygate::store::ChangesSince {
                    paygate::store::DataVersion::open(&self.0)
                        .unwrap()
                        .changes_since(seen)
                        .unwrap()
                }

                /// Deletes the change log's rows up to `upto`, as the sweep does.
                async fn prune_changes(&self, upto: i64) {
                    rusqlite::Connection::open(self.0.join("paygate.db"))
                        .unwrap()
                        .execute("DELETE FROM changes WHERE seq <= ?1", [upto])
                        .unwrap();
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
            use paygate::store::Store;
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

                /// A node, through the seam the server uses.
                async fn node(&self) -> Store {
                    Store::Postgres(self.pg_node().await)
                }

                /// Another node's view of the rate-limit buckets.
                async fn rate_node(&self) -> paygate::store::RateStore {
                    let url = DatabaseUrl::parse(&self.url).unwrap();
                    paygate::store::RateStore::Postgres(
                        paygate::store::postgres::PgRateStore::open(&url, 4).await.unwrap(),
                    )
                }

                async fn pg_node(&self) -> PgStore {
                    let keys = Arc::new(TotpKeys::load_or_create(&self.keys).unwrap());
                    let url = DatabaseUrl::parse(&self.url).unwrap();
                    PgStore::open(&url, 4, keys, paygate::time::Clock::system())
                        .await
                        .unwrap()
                }

                /// The change log after `seen`, as a node's cache reads it.
                async fn changes(&self, seen: i64) -> paygate::store::ChangesSince {
                    self.pg_node().await.changes_since(seen).await.unwrap()
                }

                /// Deletes the change log's rows up to `upto`, as the sweep does.
                async fn prune_changes(&self, upto: i64) {
                    let (client, connection) =
                        tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(connection);
                    client
                        .execute("DELETE FROM changes WHERE seq <= $1", &[&upto])
                        .await
                        .unwrap();
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

    async fn accounts_list_newest_first_a_page_at_a_time(backend) {
        let store = backend.node().await;
        let alice = user!(store, "alice");
        let carol = user!(store, "carol");
        let mut ids = Vec::new();
        for name in ["one", "two", "three"] {
            let account = store.create_account(alice, name.into(), eur()).await.unwrap();
            assert_eq!((account.name.as_str(), account.currency.as_str()), (name, "EUR"));
            ids.push(account.id);
        }
        let first = store.memberships(alice, false, 2, None).await.unwrap();
        let names: Vec<_> = first.items.iter().map(|m| m.account.name.as_str()).collect();
        assert_eq!(names, ["three", "two"]);
        assert!(first.items.iter().all(|m| m.perms == Perms::ALL), "the creator manages");
        let next = first.next_seq.expect("a third account follows");
        let rest = store.memberships(alice, false, 2, Some(next)).await.unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.items[0].account.id, ids[0]);
        assert_eq!(rest.next_seq, None);

        assert!(store.memberships(carol, false, 10, None).await.unwrap().items.is_empty());
        let every = store.memberships(carol, true, 10, None).await.unwrap();
        assert_eq!(every.items.len(), 3, "every account, for an auditor's listing");
        assert!(every.items.iter().all(|m| m.perms == Perms::READ_ONLY));

        let membership = store.membership(alice, ids[1]).await.unwrap().unwrap();
        assert_eq!(membership.account.name, "two");
        assert!(store.membership(carol, ids[1]).await.unwrap().is_none());
        let account = store.account(ids[2]).await.unwrap().unwrap();
        assert_eq!(account.name, "three");
        assert!(store.account(uuid::Uuid::now_v7()).await.unwrap().is_none());
    }

    async fn grants_follow_the_managers_rules_on_every_node(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let alice = user!(a, "alice");
        let bob = user!(a, "bob");
        user!(a, "carol");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;

        assert!(matches!(
            b.upsert_member(account, "carol".into(), perms("r"), bob).await.unwrap(),
            MemberUpsert::Refused(Refusal::NotManager(p)) if p == Perms::NONE
        ));
        assert!(matches!(
            b.upsert_member(account, "nobody".into(), perms("r"), alice).await.unwrap(),
            MemberUpsert::UnknownUser
        ));
        assert!(matches!(
            b.upsert_member(account, "bob".into(), perms("rwa"), alice).await.unwrap(),
            MemberUpsert::Created
        ));
        assert!(matches!(
            a.upsert_member(account, "carol".into(), perms("rwd"), bob).await.unwrap(),
            MemberUpsert::Refused(Refusal::BeyondOwn { .. })
        ));
        assert!(matches!(
            a.upsert_member(account, "carol".into(), perms("rw"), bob).await.unwrap(),
            MemberUpsert::Created
        ));
        assert!(matches!(
            a.upsert_member(account, "carol".into(), perms("r"), bob).await.unwrap(),
            MemberUpsert::Updated
        ));
        assert!(matches!(
            b.upsert_member(account, "alice".into(), perms("r"), bob).await.unwrap(),
            MemberUpsert::Refused(Refusal::MorePrivileged { .. })
        ));
        let carol_sees = b.membership(b.user_by_name("carol".into()).await.unwrap().unwrap().id, account).await.unwrap();
        assert_eq!(carol_sees.unwrap().perms, perms("r"));

        assert!(matches!(
            a.remove_member(account, "nobody".into(), alice).await.unwrap(),
            MemberRemoval::NotMember
        ));
        assert!(matches!(
            a.remove_member(account, "carol".into(), alice).await.unwrap(),
            MemberRemoval::Removed
        ));
        assert!(b.membership(b.user_by_name("carol".into()).await.unwrap().unwrap().id, account).await.unwrap().is_none());
        assert!(matches!(
            b.remove_member(account, "alice".into(), bob).await.unwrap(),
            MemberRemoval::Refused(Refusal::MorePrivileged { .. })
        ));
        assert!(matches!(
            a.remove_member(account, "bob".into(), alice).await.unwrap(),
            MemberRemoval::Removed
        ));
        assert!(matches!(
            a.remove_member(account, "alice".into(), alice).await.unwrap(),
            MemberRemoval::LastManager
        ));
    }

    async fn two_managers_removing_each_other_at_once_leave_one(backend) {
        for round in 0..5 {
            let (a, b) = (backend.node().await, backend.node().await);
            let alice = user!(a, &format!("alice{round}"));
            let bob = user!(a, &format!("bob{round}"));
            let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
            a.upsert_member(account, format!("bob{round}"), Perms::ALL, alice).await.unwrap();
            let (x, y) = tokio::join!(
                a.remove_member(account, format!("bob{round}"), alice),
                b.remove_member(account, format!("alice{round}"), bob),
            );
            let removed = [x.unwrap(), y.unwrap()]
                .iter()
                .filter(|r| matches!(r, MemberRemoval::Removed))
                .count();
            assert_eq!(removed, 1, "round {round}");
            let left = a.membership(alice, account).await.unwrap().map(|m| m.perms)
                .into_iter()
                .chain(a.membership(bob, account).await.unwrap().map(|m| m.perms))
                .filter(|p| p.contains(Perm::Admin))
                .count();
            assert_eq!(left, 1, "round {round}: one manager remains");
        }
    }

    async fn payments_are_created_listed_and_cancelled_once(backend) {
        let store = backend.node().await;
        let alice = user!(store, "alice");
        let account = store.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let other = store.create_account(alice, "Other".into(), eur()).await.unwrap().id;
        let mut created = Vec::new();
        for amount in [100, 200, 300] {
            let PaymentCreation::Created(response) =
                store.create_payment(payment(account, amount), alice, None, answer).await.unwrap()
            else {
                panic!("no key, no earlier use")
            };
            let (id, at) = response.body.split_once(' ').unwrap();
            created.push((id.parse::<uuid::Uuid>().unwrap(), at.parse::<i64>().unwrap()));
        }
        assert!(created.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let page = store.payments(account, 2, None).await.unwrap();
        let ids: Vec<_> = page.items.iter().map(|p| p.id).collect();
        assert_eq!(ids, [created[2].0, created[1].0], "newest first");
        let rest = store.payments(account, 2, page.next_seq).await.unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.next_seq, None);
        let first = store.payment(account, created[0].0).await.unwrap().unwrap();
        assert_eq!(
            (first.amount_minor, first.created_by.as_str(), first.status, first.created_at),
            (100, "alice", PaymentStatus::Pending, created[0].1)
        );
        assert!(store.payment(other, created[0].0).await.unwrap().is_none());
        assert!(store.payment_exists(account, created[0].0).await.unwrap());
        assert!(!store.payment_exists(other, created[0].0).await.unwrap());

        let CancelOutcome::Cancelled(cancelled) =
            store.cancel_payment(account, created[0].0).await.unwrap()
        else {
            panic!("a pending payment is cancelled")
        };
        assert_eq!(cancelled.status, PaymentStatus::Cancelled);
        assert!(cancelled.cancelled_at.is_some());
        assert!(matches!(
            store.cancel_payment(account, created[0].0).await.unwrap(),
            CancelOutcome::NotPending(_)
        ));
        assert!(matches!(
            store.cancel_payment(other, created[0].0).await.unwrap(),
            CancelOutcome::NotFound
        ));
    }

    async fn one_idempotency_key_sent_to_two_nodes_at_once_makes_one_payment(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let alice = user!(a, "alice");
        let bob = user!(a, "bob");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        a.upsert_member(account, "bob".into(), perms("rw"), alice).await.unwrap();
        let send = |node: u8| {
            let store = if node == 0 { &a } else { &b };
            store.create_payment(payment(account, 500), alice, keyed(alice, "k-1", 1), answer)
        };
        let (r0, r1, r2, r3, r4, r5) = tokio::join!(send(0), send(1), send(0), send(1), send(0), send(1));
        let mut bodies = Vec::new();
        let mut created = 0;
        for outcome in [r0, r1, r2, r3, r4, r5] {
            match outcome.unwrap() {
                PaymentCreation::Created(response) => {
                    created += 1;
                    bodies.push(response.body);
                }
                PaymentCreation::Earlier(EarlierUse::Replay(response)) => {
                    assert_eq!(response.status, 201);
                    bodies.push(response.body);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(created, 1, "one payment for one key");
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every answer is the first one");
        assert_eq!(b.payments(account, 10, None).await.unwrap().items.len(), 1);

        // The same key with another request: refused, on either node.
        assert!(matches!(
            b.create_payment(payment(account, 999), alice, keyed(alice, "k-1", 2), answer)
                .await
                .unwrap(),
            PaymentCreation::Earlier(EarlierUse::Mismatch)
        ));
        // Keys belong to their user: bob's "k-1" is another key.
        assert!(matches!(
            b.create_payment(payment(account, 500), bob, keyed(bob, "k-1", 1), answer)
                .await
                .unwrap(),
            PaymentCreation::Created(_)
        ));
        assert_eq!(a.payments(account, 10, None).await.unwrap().items.len(), 2);
    }

    async fn payments_from_two_nodes_at_once_all_commit_in_one_order(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let alice = user!(a, "alice");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                store.create_payment(payment(account, 1 + i), alice, None, answer).await
            }));
        }
        for task in tasks {
            assert!(matches!(task.await.unwrap().unwrap(), PaymentCreation::Created(_)));
        }
        let listed = a.payments(account, 100, None).await.unwrap().items;
        assert_eq!(listed.len(), 40);
        // Listed newest first by commit position: ids and times descend with it.
        assert!(listed.windows(2).all(|w| w[0].id > w[1].id && w[0].created_at >= w[1].created_at));
        let mut amounts: Vec<_> = listed.iter().map(|p| p.amount_minor).collect();
        amounts.sort();
        assert_eq!(amounts, (1..=40).collect::<Vec<_>>());
    }

    async fn a_payment_the_database_refuses_fails_alone_and_its_batch_commits(backend) {
        let a = backend.node().await;
        let alice = user!(a, "alice");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        // Sent together, so that they share batches: one names an account that does not
        // exist, one a creator, one a key's owner, which the database refuses.
        let nobody = alice + 1000;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = a.clone();
            let target = if i == 7 { uuid::Uuid::new_v4() } else { account };
            let creator = if i == 11 { nobody } else { alice };
            let key = if i == 15 { keyed(nobody, "k-15", 1) } else { keyed(alice, &format!("k-{i}"), 1) };
            tasks.push(tokio::spawn(async move {
                store.create_payment(payment(target, 1 + i), creator, key, answer).await
            }));
        }
        let mut refused = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(PaymentCreation::Created(_)) => {}
                Err(StoreError::Database(_) | StoreError::Sqlite(_) | StoreError::CommitFailed(_)) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 3);
        assert_eq!(a.payments(account, 100, None).await.unwrap().items.len(), 17);
        // Nothing was left half done: the next payment commits.
        assert!(matches!(
            a.create_payment(payment(account, 99), alice, None, answer).await.unwrap(),
            PaymentCreation::Created(_)
        ));
    }

    async fn rate_limit_steps_from_many_nodes_never_spend_more_than_the_burst(backend) {
        use paygate::token_bucket::Limit;
        let limit = Limit { burst: 20, interval_ns: 3_600_000_000_000 };
        let now = 1_000_000_000_000_i64;
        let mut nodes = Vec::new();
        for _ in 0..4 {
            nodes.push(backend.rate_node().await);
        }
        // Every node asks for up to 3 tokens at a time, 10 times, all at once: 120 asked,
        // 20 in the bucket.
        let mut steps = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for _ in 0..10 {
                let node = node.clone();
                steps.push(tokio::spawn(async move {
                    let change = move |bucket: &mut paygate::token_bucket::TokenBucket, _| {
                        let taken = bucket.take_up_to(limit, now, 3);
                        (taken, taken)
                    };
                    node.step("r".into(), "k".into(), None, format!("node-{n}"), now, now + 1, change)
                        .await
                        .unwrap()
                }));
            }
        }
        let mut granted = 0;
        for step in steps {
            granted += step.await.unwrap();
        }
        assert_eq!(granted, 20, "exactly the burst, across four nodes");
        // A key without a bucket draws from the overflow bucket when one stands in.
        let take_one = |node: &paygate::store::RateStore, key: &'static str| {
            let node = node.clone();
            async move {
                let change = move |bucket: &mut paygate::token_bucket::TokenBucket, _| {
                    (0, bucket.take_up_to(Limit { burst: 2, ..limit }, now, 1))
                };
                node.step("r".into(), key.into(), Some("overflow"), "node-0".into(), now, now, change)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(take_one(&nodes[0], "a").await, 1);
        assert_eq!(take_one(&nodes[1], "b").await, 1);
        assert_eq!(take_one(&nodes[2], "c").await, 0, "the shared overflow bucket is spent");
        // The sweep keeps the buckets that are not full yet ("k" and the overflow).
        assert_eq!(nodes[3].sweep(now + 2).await.unwrap(), 2);
    }

    async fn password_guess_budgets_are_shared_by_every_node(backend) {
        use paygate::ratelimit::{Limiter, Refusal};
        use paygate::token_bucket::Limit;
        let clock = paygate::time::Clock::manual(1_000_000_000_000_000);
        let mut nodes = Vec::new();
        for _ in 0..2 {
            nodes.push(Limiter::new(
                Vec::new(),
                Some(Limit::new(3, 60_000_000_000, 3)),
                None,
                backend.rate_node().await,
                clock.clone(),
            ));
        }
        // Correct passwords give their guess back, whichever node checked them.
        for n in 0..6 {
            let ticket = nodes[n % 2].reserve_guess("alice").await.unwrap().unwrap();
            nodes[n % 2].refund_guess(ticket).await.unwrap();
        }
        // Three wrong ones, on alternating nodes, spend the budget of both.
        for n in 0..3 {
            let ticket = nodes[n % 2].reserve_guess("alice").await.unwrap().unwrap();
            nodes[n % 2].release_guess(ticket).await.unwrap();
        }
        for node in &nodes {
            assert!(
                matches!(node.reserve_guess("alice").await, Err(Refusal::Limited { .. })),
                "the budget is spent on every node"
            );
        }
        assert!(nodes[1].reserve_guess("bob").await.is_ok(), "per username");
    }

    async fn capabilities_derive_within_limits_and_revoke_with_their_tree(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let alice = user!(a, "alice");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let pay = new_payment!(a, account, alice);
        let root = mint!(a, capability(1, account, pay, alice, None, later()));
        let child = mint!(b, capability(2, account, pay, alice, Some(root), later()));
        let grandchild = mint!(a, capability(3, account, pay, alice, Some(child), later()));

        let state = b.capability_by_hash([3; 32]).await.unwrap().unwrap();
        assert_eq!(state.capability.id, grandchild);
        assert_eq!(state.capability.parent_id, Some(child));
        assert!(!state.minter_disabled && !state.ancestor_revoked);
        assert_eq!(state.minter_perms, Some(Perms::ALL));
        assert!(b.capability_by_hash([9; 32]).await.unwrap().is_none());
        assert_eq!(a.capability(root).await.unwrap().unwrap().perms, Perms::READ_ONLY);

        assert_eq!(b.revoke_capability(child).await.unwrap(), 2, "the child and its own");
        assert_eq!(a.revoke_capability(child).await.unwrap(), 0, "once");
        assert!(a.capability_by_hash([3; 32]).await.unwrap().unwrap().capability.revoked_at.is_some());
        assert!(a.capability_by_hash([1; 32]).await.unwrap().unwrap().capability.revoked_at.is_none());
        let live = a.live_capabilities(account, 10, None).await.unwrap();
        assert_eq!(live.items.iter().map(|c| c.id).collect::<Vec<_>>(), [root]);
        assert!(matches!(
            a.create_capability(capability(4, account, pay, alice, Some(grandchild), later()))
                .await
                .unwrap(),
            CapabilityInsert::ParentUnusable
        ));
        assert!(matches!(
            a.create_capability(capability(5, account, pay, alice, Some(uuid::Uuid::new_v4()), later()))
                .await
                .unwrap(),
            CapabilityInsert::ParentUnusable
        ));

        // A chain no deeper than the limit.
        let mut parent = root;
        for depth in 1..=MAX_DERIVATION_DEPTH {
            parent = mint!(a, capability(10 + depth as u8, account, pay, alice, Some(parent), later()));
        }
        assert!(matches!(
            b.create_capability(capability(99, account, pay, alice, Some(parent), later()))
                .await
                .unwrap(),
            CapabilityInsert::TooDeep
        ));

        // A disabled minter disables what they minted.
        a.disable_user("alice".into()).await.unwrap();
        assert!(b.capability_by_hash([1; 32]).await.unwrap().unwrap().minter_disabled);
    }

    async fn a_tree_holds_at_most_its_share_even_when_two_nodes_derive_at_once(backend) {
        let (a, b) = (backend.node().await, backend.node().await);
        let alice = user!(a, "alice");
        let account = a.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let pay = new_payment!(a, account, alice);
        let root = mint!(a, capability(0, account, pay, alice, None, later()));
        // The root counts; fill the tree to one short of the limit.
        let mut hash = [0u8; 32];
        for n in 1..MAX_PER_ROOT - 1 {
            hash[..8].copy_from_slice(&n.to_be_bytes());
            let mut new = capability(0, account, pay, alice, Some(root), later());
            new.token_hash = hash;
            mint!(a, new);
        }
        // Two nodes derive the last place at once: one gets it.
        let mut x = capability(0, account, pay, alice, Some(root), later());
        x.token_hash = [0xAA; 32];
        let mut y = capability(0, account, pay, alice, Some(root), later());
        y.token_hash = [0xBB; 32];
        let (x, y) = tokio::join!(a.create_capability(x), b.create_capability(y));
        let outcomes = [x.unwrap(), y.unwrap()];
        assert_eq!(
            outcomes.iter().filter(|o| matches!(o, CapabilityInsert::Created(_))).count(),
            1,
            "{outcomes:?}"
        );
        assert!(outcomes.iter().any(|o| matches!(o, CapabilityInsert::TooMany)));
    }

    async fn the_sweep_removes_only_what_expired(backend) {
        let store = backend.node().await;
        let alice = user!(store, "alice");
        let now = paygate::time::now_millis();
        store.create_session([1; 32], alice, "pwd".into(), now - 1).await.unwrap();
        store.create_session([2; 32], alice, "pwd".into(), now + 60_000).await.unwrap();
        store.revoke_jti("old".into(), now / 1000 - 1).await.unwrap();
        store.revoke_jti("new".into(), now / 1000 + 60).await.unwrap();
        let account = store.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let pay = new_payment!(store, account, alice);
        let root = mint!(store, capability(1, account, pay, alice, None, now + 60_000));
        mint!(store, capability(2, account, pay, alice, Some(root), now + 60_000));
        assert_eq!(store.sweep_expired().await.unwrap(), 2, "a session and a revocation");
        assert!(store.session([2; 32]).await.unwrap().is_some());
        let (_, revoked) = store.jwt_subject("alice".into(), "new".into()).await.unwrap().unwrap();
        assert!(revoked);
        assert!(store.capability_by_hash([2; 32]).await.unwrap().is_some(), "not expired yet");
        assert_eq!(store.sweep_idempotency_keys().await.unwrap(), 0);
    }

    async fn every_change_a_cache_depends_on_is_logged_alike(backend) {
        let store = backend.node().await;
        let alice = user!(store, "alice");
        let bob = user!(store, "bob");
        let ChangesSince::Changes(none, start) = backend.changes(0).await else {
            panic!("nothing pruned")
        };
        assert!(none.is_empty());
        // A new account gives its creator a grant: logged, as every grant given is.
        let account = store.create_account(alice, "Ops".into(), eur()).await.unwrap().id;
        let start = start + 1;
        assert_eq!(
            backend.changes(start - 1).await,
            ChangesSince::Changes(vec![Change::Membership { user: alice, account }], start)
        );
        // Other new rows log nothing: nothing absent is ever cached.
        let pay = new_payment!(store, account, alice);
        store.create_session([1; 32], alice, "pwd".into(), later()).await.unwrap();
        store.create_session([2; 32], alice, "pwd".into(), later()).await.unwrap();
        let root = mint!(store, capability(1, account, pay, alice, None, later()));
        mint!(store, capability(2, account, pay, alice, Some(root), later()));
        assert_eq!(backend.changes(start).await, ChangesSince::Changes(vec![], start));

        store.end_session([1; 32]).await.unwrap();
        store.revoke_jti("j-1".into(), later()).await.unwrap();
        store.upsert_member(account, "bob".into(), perms("r"), alice).await.unwrap();
        store.upsert_member(account, "bob".into(), perms("rw"), alice).await.unwrap();
        store.remove_member(account, "bob".into(), alice).await.unwrap();
        store.revoke_capability(root).await.unwrap();
        store.cancel_payment(account, pay).await.unwrap();
        store.disable_user("alice".into()).await.unwrap();
        let membership = Change::Membership { user: bob, account };
        let expected = vec![
            Change::Session([1; 32]),
            Change::Jwt("j-1".into()),
            membership.clone(),
            membership.clone(),
            membership,
            Change::Capability { account },
            Change::Capability { account },
            Change::Payment { account, payment: pay },
            Change::User(alice),
            Change::Session([2; 32]),
        ];
        let last = start + expected.len() as i64;
        assert_eq!(backend.changes(start).await, ChangesSince::Changes(expected, last));
        assert_eq!(backend.changes(last).await, ChangesSince::Changes(vec![], last));

        // A reader whose next rows were pruned is told it fell behind.
        backend.prune_changes(start + 2).await;
        assert_eq!(backend.changes(start).await, ChangesSince::FellBehind(last));
        assert!(matches!(backend.changes(start + 2).await, ChangesSince::Changes(c, l) if c.len() == 8 && l == last));
        backend.prune_changes(last).await;
        assert_eq!(backend.changes(start + 5).await, ChangesSince::FellBehind(last));
    }
}
