//! The API's routes: which (method, path) pairs exist, what each one is, and what access it
//! needs. Resolving a route is pure string matching — no I/O, no identity — so it can run
//! before the filter chain and let every stage know what is being asked for.
//!
//! A path that matches nothing, a known path with the wrong method and a malformed id all
//! resolve to [`Route::Reject`], which the chain treats like any other route: the request is
//! still authenticated and (later) audited before its 404/405 is sent.

use http::Method;
use uuid::Uuid;

use crate::domain::Perm;
use crate::http::ApiError;

/// One API operation, with the ids parsed from its path.
#[derive(Debug)]
pub enum Route {
    ApiStatus,
    CreateUser,
    GetUser(String),
    /// `GET /users/me`: the caller.
    GetMe,
    Login,
    Logout,
    EnrolTotp,
    ConfirmTotp,
    /// `GET /audit`: recent audit records.
    ReadAudit,
    CreateAccount,
    ListAccounts,
    GetAccount(Uuid),
    GrantMember(Uuid),
    /// `DELETE /accounts/{id}/members/{username}`.
    RemoveMember(Uuid, String),
    ListPayments(Uuid),
    CreatePayment(Uuid),
    GetPayment(Uuid, Uuid),
    CancelPayment(Uuid, Uuid),
    MintCapability(Uuid, Uuid),
    ListCapabilities(Uuid),
    DeriveCapability,
    RevokeCapability(Uuid),
    /// `POST /users/{name}/disable`.
    DisableUser(String),
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `GET /openapi.yaml`: this API's description.
    OpenApi,
    /// No such route; answered with this error after the chain has seen the request.
    Reject(ApiError),
}

/// What a route requires of the caller; access control enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// Anyone, with or without credentials.
    Public,
    /// Any authenticated user.
    Authenticated,
    /// A user who proved their password (and TOTP code, if enrolled) in this request.
    Password,
    /// A user authenticated by a Bearer token (the token is what the route acts on).
    Token,
    /// The user named here, or a global admin or auditor.
    SelfOrStaff(String),
    /// A global admin or auditor.
    Staff,
    /// A grant on the account that includes the permission.
    Account(Uuid, Perm),
    /// The permission on one payment: by a grant on its account, or by a capability for
    /// exactly that payment.
    Payment(Uuid, Uuid, Perm),
    /// Any grant on the account (what the grant allows is the handler's question).
    Member(Uuid),
    /// The global admin role.
    Admin,
    /// The admin role, or a client on a loopback address (a local scraper).
    AdminOrLoopback,
}

impl Route {
    pub fn requirement(&self) -> Requirement {
        use Route::*;
        match self {
            ApiStatus | OpenApi | CreateUser | DeriveCapability | Reject(_) => Requirement::Public,
            DisableUser(_) => Requirement::Admin,
            Metrics => Requirement::AdminOrLoopback,
            MintCapability(account, _) => Requirement::Member(*account),
            ListCapabilities(account) => Requirement::Account(*account, Perm::Admin),
            RevokeCapability(_) => Requirement::Authenticated,
            GetUser(name) => Requirement::SelfOrStaff(name.clone()),
            Login => Requirement::Password,
            ReadAudit => Requirement::Staff,
            Logout => Requirement::Token,
            GetMe | EnrolTotp | ConfirmTotp | CreateAccount | ListAccounts => {
                Requirement::Authenticated
            }
            GrantMember(account) | RemoveMember(account, _) => {
                Requirement::Account(*account, Perm::Admin)
            }
            GetAccount(account) | ListPayments(account) => {
                Requirement::Account(*account, Perm::Read)
            }
            GetPayment(account, payment) => Requirement::Payment(*account, *payment, Perm::Read),
            CreatePayment(account) => Requirement::Account(*account, Perm::Write),
            CancelPayment(account, payment) => {
                Requirement::Payment(*account, *payment, Perm::Delete)
            }
        }
    }
}

impl Route {
    /// The route's name in metrics: method and path template, never an id (bounded
    /// cardinality).
    pub fn label(&self) -> &'static str {
        use Route::*;
        match self {
            ApiStatus => "GET /apiStatus",
            CreateUser => "POST /users",
            GetUser(_) => "GET /users/{name}",
            GetMe => "GET /users/me",
            Login => "POST /sessions",
            Logout => "DELETE /sessions",
            EnrolTotp => "POST /users/me/totp",
            ConfirmTotp => "POST /users/me/totp/confirm",
            ReadAudit => "GET /audit",
            CreateAccount => "POST /accounts",
            ListAccounts => "GET /accounts",
            GetAccount(_) => "GET /accounts/{id}",
            GrantMember(_) => "POST /accounts/{id}/members",
            RemoveMember(..) => "DELETE /accounts/{id}/members/{username}",
            ListPayments(_) => "GET /accounts/{id}/payments",
            CreatePayment(_) => "POST /accounts/{id}/payments",
            GetPayment(..) => "GET /accounts/{id}/payments/{pid}",
            CancelPayment(..) => "DELETE /accounts/{id}/payments/{pid}",
            MintCapability(..) => "POST /accounts/{id}/payments/{pid}/capabilities",
            ListCapabilities(_) => "GET /accounts/{id}/capabilities",
            DeriveCapability => "POST /capabilities/derive",
            RevokeCapability(_) => "DELETE /capabilities/{id}",
            DisableUser(_) => "POST /users/{name}/disable",
            Metrics => "GET /metrics",
            OpenApi => "GET /openapi.yaml",
            Reject(_) => "unmatched",
        }
    }
}

/// Finds the route for a request.
pub fn resolve(method: &Method, path: &str) -> Route {
    let Some(rest) = path.strip_prefix('/') else {
        return not_found();
    };
    // No route has more than five segments; a longer path is unknown (and costs no
    // allocation to find out).
    let mut segments = [""; 5];
    let mut count = 0;
    for segment in rest.split('/') {
        if count == segments.len() {
            return not_found();
        }
        segments[count] = segment;
        count += 1;
    }
    match &segments[..count] {
        ["apiStatus"] => by_method(method, &[Method::GET], |_| Route::ApiStatus),
        ["users"] => by_method(method, &[Method::POST], |_| Route::CreateUser),
        ["users", "me"] => by_method(method, &[Method::GET], |_| Route::GetMe),
        ["users", "me", "totp"] => by_method(method, &[Method::POST], |_| Route::EnrolTotp),
        ["users", "me", "totp", "confirm"] => {
            by_method(method, &[Method::POST], |_| Route::ConfirmTotp)
        }
        ["audit"] => by_method(method, &[Method::GET], |_| Route::ReadAudit),
        ["metrics"] => by_method(method, &[Method::GET], |_| Route::Metrics),
        ["openapi.yaml"] => by_method(method, &[Method::GET], |_| Route::OpenApi),
        ["sessions"] => by_method(method, &[Method::POST, Method::DELETE], |m| {
            if m == Method::POST {
                Route::Login
            } else {
                Route::Logout
            }
        }),
        ["users", name, "disable"] if !name.is_empty() => {
            let name = (*name).to_owned();
            by_method(method, &[Method::POST], |_| Route::DisableUser(name))
        }
        ["capabilities", "derive"] => {
            by_method(method, &[Method::POST], |_| Route::DeriveCapability)
        }
        ["capabilities", id] => with_id(id, "capability", |id| {
            by_method(method, &[Method::DELETE], |_| Route::RevokeCapability(id))
        }),
        ["accounts", account, "capabilities"] => with_id(account, "account", |account| {
            by_method(method, &[Method::GET], |_| Route::ListCapabilities(account))
        }),
        ["accounts", account, "payments", payment, "capabilities"] => {
            with_id(account, "account", |account| {
                with_id(payment, "payment", |payment| {
                    by_method(method, &[Method::POST], |_| {
                        Route::MintCapability(account, payment)
                    })
                })
            })
        }
        ["users", name] if !name.is_empty() => {
            let name = (*name).to_owned();
            by_method(method, &[Method::GET], |_| Route::GetUser(name))
        }
        ["accounts"] => by_method(method, &[Method::GET, Method::POST], |m| {
            if m == Method::GET {
                Route::ListAccounts
            } else {
                Route::CreateAccount
            }
        }),
        ["accounts", account] => with_id(account, "account", |account| {
            by_method(method, &[Method::GET], |_| Route::GetAccount(account))
        }),
        ["accounts", account, "members"] => with_id(account, "account", |account| {
            by_method(method, &[Method::POST], |_| Route::GrantMember(account))
        }),
        ["accounts", account, "members", name] if !name.is_empty() => {
            with_id(account, "account", |account| {
                let name = (*name).to_owned();
                by_method(method, &[Method::DELETE], |_| {
                    Route::RemoveMember(account, name)
                })
            })
        }
        ["accounts", account, "payments"] => with_id(account, "account", |account| {
            by_method(method, &[Method::GET, Method::POST], |m| {
                if m == Method::GET {
                    Route::ListPayments(account)
                } else {
                    Route::CreatePayment(account)
                }
            })
        }),
        ["accounts", account, "payments", payment] => with_id(account, "account", |account| {
            with_id(payment, "payment", |payment| {
                by_method(method, &[Method::GET, Method::DELETE], |m| {
                    if m == Method::GET {
                        Route::GetPayment(account, payment)
                    } else {
                        Route::CancelPayment(account, payment)
                    }
                })
            })
        }),
        _ => not_found(),
    }
}

fn not_found() -> Route {
    Route::Reject(ApiError::NotFound("no such resource".into()))
}

fn by_method(
    method: &Method,
    allowed: &'static [Method],
    route: impl FnOnce(Method) -> Route,
) -> Route {
    if allowed.contains(method) {
        route(method.clone())
    } else {
        Route::Reject(ApiError::MethodNotAllowed(allowed))
    }
}

/// Ids are canonical hyphenated UUIDs; anything else names nothing.
fn with_id(raw: &str, what: &str, route: impl FnOnce(Uuid) -> Route) -> Route {
    match Uuid::try_parse(raw) {
        Ok(id) if raw.len() == 36 => route(id),
        _ => Route::Reject(ApiError::NotFound(format!("no {what} has the id {raw:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f";
    const P: &str = "0190f3a2-7c1e-7d2a-9b4e-aaaaaaaaaaaa";

    fn status_of(route: Route) -> u16 {
        match route {
            Route::Reject(e) => e.status().as_u16(),
            _ => 200,
        }
    }

    #[test]
    fn every_route_resolves_with_its_requirement() {
        let a: Uuid = A.parse().unwrap();
        let p: Uuid = P.parse().unwrap();
        let cases = [
            (Method::GET, "/apiStatus".to_owned(), Requirement::Public),
            (Method::POST, "/users".to_owned(), Requirement::Public),
            (
                Method::GET,
                "/users/bob".to_owned(),
                Requirement::SelfOrStaff("bob".into()),
            ),
            (
                Method::GET,
                "/accounts".to_owned(),
                Requirement::Authenticated,
            ),
            (
                Method::GET,
                "/users/me".to_owned(),
                Requirement::Authenticated,
            ),
            (Method::POST, "/sessions".to_owned(), Requirement::Password),
            (Method::DELETE, "/sessions".to_owned(), Requirement::Token),
            (
                Method::POST,
                "/users/me/totp".to_owned(),
                Requirement::Authenticated,
            ),
            (
                Method::POST,
                "/users/me/totp/confirm".to_owned(),
                Requirement::Authenticated,
            ),
            (
                Method::POST,
                "/accounts".to_owned(),
                Requirement::Authenticated,
            ),
            (
                Method::GET,
                format!("/accounts/{A}"),
                Requirement::Account(a, Perm::Read),
            ),
            (
                Method::POST,
                format!("/accounts/{A}/members"),
                Requirement::Account(a, Perm::Admin),
            ),
            (
                Method::DELETE,
                format!("/accounts/{A}/members/bob"),
                Requirement::Account(a, Perm::Admin),
            ),
            (
                Method::GET,
                format!("/accounts/{A}/payments"),
                Requirement::Account(a, Perm::Read),
            ),
            (
                Method::POST,
                format!("/accounts/{A}/payments"),
                Requirement::Account(a, Perm::Write),
            ),
            (
                Method::GET,
                format!("/accounts/{A}/payments/{P}"),
                Requirement::Payment(a, p, Perm::Read),
            ),
            (
                Method::DELETE,
                format!("/accounts/{A}/payments/{P}"),
                Requirement::Payment(a, p, Perm::Delete),
            ),
            (
                Method::POST,
                format!("/accounts/{A}/payments/{P}/capabilities"),
                Requirement::Member(a),
            ),
            (
                Method::GET,
                format!("/accounts/{A}/capabilities"),
                Requirement::Account(a, Perm::Admin),
            ),
            (
                Method::POST,
                "/capabilities/derive".to_owned(),
                Requirement::Public,
            ),
            (
                Method::DELETE,
                format!("/capabilities/{P}"),
                Requirement::Authenticated,
            ),
            (
                Method::POST,
                "/users/bob/disable".to_owned(),
                Requirement::Admin,
            ),
        ];
        for (method, path, requirement) in cases {
            let route = resolve(&method, &path);
            assert!(!matches!(route, Route::Reject(_)), "{method} {path}");
            assert_eq!(route.requirement(), requirement, "{method} {path}");
        }
    }

    /// The operations `openapi.yaml` describes: `METHOD /template` for each method under each
    /// path (the file's layout: paths at two spaces, methods at four).
    fn described_operations() -> Vec<String> {
        let spec = include_str!("../openapi.yaml");
        let paths = spec
            .split("\ncomponents:")
            .next()
            .and_then(|head| head.split("\npaths:\n").nth(1))
            .expect("openapi.yaml has paths before components");
        let mut operations = Vec::new();
        let mut current = "";
        for line in paths.lines() {
            if let Some(path) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                current = path;
            } else if let Some(method) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
            {
                if ["get", "post", "delete", "put", "patch"].contains(&method) {
                    operations.push(format!("{} /{current}", method.to_uppercase()));
                }
            }
        }
        operations
    }

    /// Every route label `label()` can return, read from this file's source, so a new route
    /// cannot be left out of the check below.
    fn route_labels() -> Vec<String> {
        include_str!("routes.rs")
            .lines()
            .filter_map(|line| line.trim().split_once(" => \""))
            .filter_map(|(_, rest)| rest.strip_suffix("\","))
            .filter(|label| label.contains(" /"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn openapi_yaml_describes_exactly_the_routes_that_exist() {
        let described = described_operations();
        let mut labels = route_labels();
        assert!(labels.len() >= 24, "{labels:?}");
        labels.sort();
        let mut sorted = described.clone();
        sorted.sort();
        assert_eq!(sorted, labels, "openapi.yaml and Route::label disagree");
        // And each described template resolves to the route with that label.
        for operation in described {
            let (method, template) = operation.split_once(' ').unwrap();
            let path = template
                .replace("{id}", A)
                .replace("{pid}", P)
                .replace("{name}", "bob");
            let route = resolve(&method.parse().unwrap(), &path);
            assert_eq!(route.label(), operation, "{method} {path}");
        }
    }

    #[test]
    fn unknown_paths_wrong_methods_and_bad_ids_are_rejected() {
        assert_eq!(status_of(resolve(&Method::GET, "/nope")), 404);
        assert_eq!(status_of(resolve(&Method::GET, "/accounts/")), 404);
        assert_eq!(status_of(resolve(&Method::GET, "/apiStatus/")), 404);
        assert_eq!(status_of(resolve(&Method::GET, "*")), 404);
        let deep = format!("/accounts/{A}/payments/{P}/capabilities/extra");
        assert_eq!(status_of(resolve(&Method::GET, &deep)), 404);
        assert_eq!(status_of(resolve(&Method::DELETE, "/apiStatus")), 405);
        assert_eq!(
            status_of(resolve(&Method::PUT, &format!("/accounts/{A}/payments"))),
            405
        );
        assert_eq!(
            status_of(resolve(&Method::GET, "/accounts/123/payments")),
            404
        );
        // Only the canonical hyphenated form names an account.
        let simple = A.replace('-', "");
        assert_eq!(
            status_of(resolve(
                &Method::GET,
                &format!("/accounts/{simple}/payments")
            )),
            404
        );
        assert_eq!(
            status_of(resolve(&Method::GET, &format!("/accounts/{A}/payments/x"))),
            404
        );
        let Route::Reject(ApiError::MethodNotAllowed(allowed)) =
            resolve(&Method::PATCH, "/accounts")
        else {
            panic!("405 expected")
        };
        assert_eq!(allowed, &[Method::GET, Method::POST]);
    }
}
