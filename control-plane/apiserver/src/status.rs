//! API errors as Kubernetes `Status` objects with the HTTP code and reason clients expect.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{resources::Resource, storage::StorageError};

/// A field-level cause of a 422 Invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// e.g. `FieldValueInvalid`, `FieldValueRequired`.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The field path, e.g. `metadata.name`.
    pub field: String,
}

/// An error answered as a `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: StatusCode,
    /// Machine-readable reason (`NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, …).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` of the Status, if any.
    pub details: Option<Value>,
}

/// Result of API handlers.
pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, r: &Resource, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": r.group, "kind": r.plural}));
        self
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 404 for an object.
    pub fn not_found(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", r.qualified()),
        )
        .with_details(r, name)
    }

    /// 404 for a path that serves nothing.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409 for a create of an existing object.
    pub fn already_exists(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", r.qualified()),
        )
        .with_details(r, name)
    }

    /// 409 for a write against a stale resourceVersion.
    pub fn conflict(r: &Resource, name: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                r.qualified()
            ),
        )
        .with_details(r, name)
    }

    /// 422 with field causes.
    pub fn invalid(r: &Resource, name: &str, causes: Vec<Cause>) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {}",
                r.kind,
                if summary.len() == 1 {
                    summary[0].clone()
                } else {
                    format!("[{}]", summary.join(", "))
                }
            ),
        );
        e.details = Some(json!({
            "name": name, "group": r.group, "kind": r.kind,
            "causes": causes.iter().map(|c| json!({
                "reason": c.reason, "message": c.message, "field": c.field
            })).collect::<Vec<_>>(),
        }));
        e
    }

    /// 422 for invalid options of a request (e.g. `DeleteOptions`), which are not stored
    /// objects: `<kind>.meta.k8s.io "" is invalid: …`, as Kubernetes words it.
    pub fn invalid_options(kind: &str, cause: Cause) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "{kind}.meta.k8s.io \"\" is invalid: {}: {}",
                cause.field, cause.message
            ),
        );
        e.details = Some(json!({
            "group": "meta.k8s.io", "kind": kind,
            "causes": [{"reason": cause.reason, "message": cause.message, "field": cause.field}],
        }));
        e
    }

    /// 410 Gone: a resourceVersion older than the history kept.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    /// 401 Unauthorized.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
    }

    /// 403 Forbidden.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 405 Method Not Allowed.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 413 Request Entity Too Large.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 415 Unsupported Media Type.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format: {content_type}"),
        )
    }

    /// 500, with the cause.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    /// Maps a store error on object `name` of `r`.
    pub fn from_storage(e: StorageError, r: &Resource, name: &str) -> Self {
        match e {
            StorageError::AlreadyExists(_) => Self::already_exists(r, name),
            StorageError::NotFound(_) => Self::not_found(r, name),
            StorageError::Conflict { .. } => Self::conflict(r, name),
            StorageError::Compacted { requested, oldest } => {
                Self::gone(format!("too old resource version: {requested} ({oldest})"))
            }
            StorageError::Unavailable(m) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                format!("the store is unavailable: {m}"),
            ),
            StorageError::Transform(m) => Self::internal(m),
        }
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, axum::Json(self.to_status())).into_response()
    }
}
