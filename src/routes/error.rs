//! The one place where an error becomes an HTTP answer: status, `error` code and JSON body of
//! SPEC §3, plus `Retry-After` / `WWW-Authenticate` where they belong.

use std::time::Duration;

use serde::Serialize;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

use crate::auth::AuthError;
use crate::deliver::DeliveryError;
use crate::publish::Oversized;
use crate::webhook::PayloadError;

/// Everything the webhook route can refuse a request for.
#[derive(Debug)]
pub enum ApiError {
    NotFound,
    MethodNotAllowed,
    BodyTooLarge {
        limit: u64,
    },
    RequestTimeout,
    /// The body could not be read or decompressed; the code follows the media type.
    BodyUnreadable {
        json: bool,
        message: String,
    },
    /// A `Content-Encoding` other than gzip, deflate or identity.
    UnsupportedEncoding(String),
    Payload(PayloadError),
    Auth(AuthError),
    Busy {
        retry_after: Duration,
    },
    /// The in-flight byte budget (`server.max_in_flight_bytes`) cannot take the request now.
    OverBudget {
        retry_after: Duration,
    },
    Delivery {
        error: DeliveryError,
        retry_after: Duration,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    result: &'static str,
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
}

impl ApiError {
    /// Status and `error` code.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::BodyUnreadable { json: true, .. } => {
                (StatusCode::BAD_REQUEST, "malformed_json")
            }
            ApiError::BodyUnreadable { json: false, .. } => {
                (StatusCode::BAD_REQUEST, "malformed_form")
            }
            ApiError::UnsupportedEncoding(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Payload(e) => match e {
                PayloadError::UnsupportedMediaType(_) => {
                    (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
                }
                PayloadError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
                PayloadError::MalformedForm(_) => (StatusCode::BAD_REQUEST, "malformed_form"),
                PayloadError::Invalid { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid_payload")
                }
                PayloadError::TooManyEntries { .. } => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
                }
            },
            ApiError::Auth(AuthError::Forbidden) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Auth(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Busy { .. } | ApiError::OverBudget { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Delivery {
                error: DeliveryError::TooLarge(_),
                ..
            } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Delivery { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::NotFound => "no such path".into(),
            ApiError::MethodNotAllowed => "only POST is accepted on this path".into(),
            ApiError::BodyTooLarge { limit } => {
                format!("the body is larger than server.max_body_bytes ({limit} bytes)")
            }
            ApiError::RequestTimeout => {
                "the request was not received within server.request_timeout".into()
            }
            ApiError::BodyUnreadable { message, .. } => {
                format!("the body could not be read: {message}")
            }
            ApiError::UnsupportedEncoding(coding) => format!(
                "unsupported Content-Encoding {coding:?}: send the body as is, gzip or deflate"
            ),
            ApiError::Payload(e) => e.to_string(),
            ApiError::Auth(e) => e.to_string(),
            ApiError::Busy { .. } => "too many requests in flight; retry later".into(),
            ApiError::OverBudget { .. } => {
                "too many bytes in flight (server.max_in_flight_bytes); retry later".into()
            }
            ApiError::Delivery { error, .. } => error.to_string(),
        }
    }

    fn index(&self) -> Option<usize> {
        match self {
            ApiError::Payload(e) => e.index(),
            ApiError::Delivery {
                error: DeliveryError::TooLarge(Oversized { index, .. }),
                ..
            } => Some(*index),
            _ => None,
        }
    }

    /// The JSON error response.
    pub fn into_response(self) -> Response {
        let (status, code) = self.status();
        let message = self.message();
        let body = ErrorBody {
            result: "error",
            error: code,
            message: &message,
            index: self.index(),
        };
        let mut response = json_response(status, &body);
        let headers = response.headers_mut();
        match &self {
            ApiError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            ApiError::RequestTimeout | ApiError::BodyTooLarge { .. } => {
                // The rest of the body is not read: the connection cannot be reused.
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Auth(e) if e.challenges_basic() => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"cmc-forwarder\""),
                );
            }
            ApiError::Busy { retry_after }
            | ApiError::OverBudget { retry_after }
            | ApiError::Delivery { retry_after, .. }
                if status == StatusCode::SERVICE_UNAVAILABLE =>
            {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            _ => {}
        }
        response
    }
}

/// A JSON response with the given status.
pub fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(bytes.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Auth(e)
    }
}
