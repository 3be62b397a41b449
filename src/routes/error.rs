//! The one place where an error becomes an HTTP answer: status, `error` code and JSON body of
//! SPEC §3, plus `Retry-After` / `WWW-Authenticate` where they belong.

use std::time::Duration;

use serde::Serialize;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;

use crate::auth::AuthError;
use crate::deliver::DeliveryError;
use crate::inbound::receive::ReceiveError;
use crate::inbound::store::SinkError;
use crate::publish::Oversized;
use crate::webhook::PayloadError;

/// Everything either public route (events, inbound mail) can refuse a request for.
#[derive(Debug)]
pub enum ApiError {
    NotFound,
    MethodNotAllowed,
    /// The body is over `key` (`server.max_body_bytes`, `inbound.max_body_bytes`).
    BodyTooLarge {
        key: &'static str,
        limit: u64,
    },
    /// An inbound multipart field is over its own limit.
    FieldTooLarge(String),
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
    /// An inbound mail's files could not be kept on disk.
    Disk {
        error: std::io::Error,
        retry_after: Duration,
    },
    /// NATS cannot take an inbound mail (its objects or its message).
    Sink {
        error: SinkError,
        retry_after: Duration,
    },
    /// An inbound mail NATS could not take in time could not be spooled either.
    Spool {
        error: crate::spool::SpoolError,
        retry_after: Duration,
    },
}

impl ApiError {
    /// An inbound body's reading error, with the code of its media type (`json`) where the
    /// body was unreadable.
    pub fn receiving(error: ReceiveError, json: bool, retry_after: Duration) -> ApiError {
        match error {
            ReceiveError::Payload(e) => ApiError::Payload(e),
            ReceiveError::BodyTooLarge { limit } => ApiError::BodyTooLarge {
                key: "inbound.max_body_bytes",
                limit,
            },
            ReceiveError::FieldTooLarge(message) => ApiError::FieldTooLarge(message),
            ReceiveError::Unreadable(message) => ApiError::BodyUnreadable { json, message },
            ReceiveError::Disk(error) => ApiError::Disk { error, retry_after },
        }
    }
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
            ApiError::BodyTooLarge { .. }
            | ApiError::FieldTooLarge(_)
            | ApiError::Sink {
                error: SinkError::TooLarge(_),
                ..
            } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
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
            ApiError::Delivery { .. }
            | ApiError::Disk { .. }
            | ApiError::Sink { .. }
            | ApiError::Spool { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::NotFound => "no such path".into(),
            ApiError::MethodNotAllowed => "only POST is accepted on this path".into(),
            ApiError::BodyTooLarge { key, limit } => {
                format!("the body is larger than {key} ({limit} bytes)")
            }
            ApiError::FieldTooLarge(message) => message.clone(),
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
            ApiError::Disk { error, .. } => format!("cannot keep the attachments on disk: {error}"),
            ApiError::Sink {
                error: SinkError::TooLarge(e),
                ..
            } => e.to_string(),
            ApiError::Sink { error, .. } => format!("NATS cannot take the mail: {error}"),
            ApiError::Spool { error, .. } => format!("the mail could not be spooled: {error}"),
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
            ApiError::RequestTimeout
            | ApiError::BodyTooLarge { .. }
            | ApiError::FieldTooLarge(_)
            | ApiError::Sink { .. }
                if status != StatusCode::SERVICE_UNAVAILABLE =>
            {
                // The rest of the body may be unread: the connection cannot be reused.
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
            | ApiError::Disk { retry_after, .. }
            | ApiError::Sink { retry_after, .. }
            | ApiError::Spool { retry_after, .. }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn header(response: &Response, name: header::HeaderName) -> Option<&str> {
        response.headers().get(name).map(|v| v.to_str().unwrap())
    }

    /// Both routes render through here: the inbound refusals get the same codes, the
    /// `Retry-After` of every 503 and the `Connection: close` of a body left unread.
    #[test]
    fn inbound_refusals_render_like_the_event_routes() {
        let retry_after = Duration::from_secs(5);
        let too_large =
            ApiError::receiving(ReceiveError::BodyTooLarge { limit: 10 }, false, retry_after);
        assert!(too_large
            .message()
            .contains("inbound.max_body_bytes (10 bytes)"));
        let response = too_large.into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(header(&response, header::CONNECTION), Some("close"));

        let unreadable =
            ApiError::receiving(ReceiveError::Unreadable("cut".into()), true, retry_after);
        assert_eq!(
            unreadable.status(),
            (StatusCode::BAD_REQUEST, "malformed_json")
        );

        for error in [
            ApiError::receiving(
                ReceiveError::Disk(std::io::Error::other("full")),
                false,
                retry_after,
            ),
            ApiError::Sink {
                error: SinkError::Temporary("no connection".into()),
                retry_after,
            },
            ApiError::Spool {
                error: crate::spool::SpoolError::Full(1),
                retry_after,
            },
        ] {
            let response = error.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(header(&response, header::RETRY_AFTER), Some("5"));
            assert_eq!(header(&response, header::CONNECTION), None);
        }
    }
}
