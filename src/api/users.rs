//! `POST /users` (registration) and `GET /users/{name}`.

use crate::http::RequestBody;
use http::{header, HeaderValue, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::domain::{check_password, Role, Username};
use crate::http::{json, read_json, ApiError, Body, Conflict};
use crate::store::{NewUser, User, UserInsert};
use crate::time::format_rfc3339_millis;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    username: String,
    password: String,
}

/// A user as the API shows it; never the hash.
#[derive(Serialize)]
struct UserBody {
    username: String,
    role: Option<&'static str>,
    created_at: String,
}

impl From<User> for UserBody {
    fn from(user: User) -> Self {
        UserBody {
            username: user.username,
            role: user.role.map(Role::as_str),
            created_at: format_rfc3339_millis(user.created_at),
        }
    }
}

pub async fn create(
    app: &App,
    request: Request<impl RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let body: Registration =
        read_json(request, app.config.max_body, app.config.client_timeout).await?;
    let username = Username::parse("username", &body.username)?;
    check_password(&username, &body.password)?;
    let password_hash = app
        .passwords
        .hash(body.password)
        .await
        .map_err(|_| ApiError::PasswordChecksBusy)?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let new = NewUser {
        username,
        password_hash,
        role: None,
    };
    match app.store.create_user(new).await? {
        UserInsert::UsernameTaken => Err(ApiError::Conflict(
            Conflict::UsernameTaken,
            "that username is taken".into(),
        )),
        UserInsert::Created(user) => {
            let location = format!("/users/{}", user.username);
            let mut response = json(StatusCode::CREATED, &UserBody::from(user))?;
            set_location(&mut response, &location);
            Ok(response)
        }
    }
}

pub async fn get(app: &App, name: String) -> Result<Response<Body>, ApiError> {
    match app.store.user_by_name(name).await? {
        Some(user) => json(StatusCode::OK, &UserBody::from(user)),
        None => Err(ApiError::NotFound("no such user".into())),
    }
}

/// Sets `Location`; paths built here from validated ids are always valid header values.
pub(super) fn set_location(response: &mut Response<Body>, location: &str) {
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
}

/// `POST /users/{name}/disable` (admin): the user's password, sessions, tokens and the
/// capabilities they minted stop working at once.
pub async fn disable(app: &App, name: String) -> Result<Response<Body>, ApiError> {
    if app.store.disable_user(name).await? {
        Ok(crate::http::response_with(
            StatusCode::NO_CONTENT,
            Vec::new(),
        ))
    } else {
        Err(ApiError::NotFound("no such user".into()))
    }
}
