//! OpenAI-style API errors: `{"error": {"message", "type", "param", "code"}}` with the
//! matching HTTP status. Every failure a client can cause ends here, never in a panic.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after_secs: None,
        }
    }

    /// An unknown model name: 400 (as our API promises) with OpenAI's `model_not_found` code.
    pub fn unknown_model(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            code: Some("model_not_found"),
            ..Self::bad_request(message, param)
        }
    }

    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key (send Authorization: Bearer <key>)".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after_secs: None,
        }
    }

    pub fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body is larger than {limit} bytes"),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
            retry_after_secs: None,
        }
    }

    /// The client did not send its request body in time.
    pub fn timeout(limit: std::time::Duration) -> Self {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {} s", limit.as_secs()),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after_secs: None,
        }
    }

    pub fn overloaded(waiting: usize) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("the server is overloaded ({waiting} requests waiting); retry later"),
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
            retry_after_secs: Some(1),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
