//! HTTP plumbing shared by every route: the error type and its single mapping to RFC 9457
//! problem responses, reading JSON request bodies safely, and building responses with the
//! headers every answer carries.

mod body;
mod problem;
mod response;

pub use body::{read_json, RequestBody};
pub use problem::{ApiError, Challenge, Conflict};
pub use response::{finish, insert_quota, json, response_with, Body};
