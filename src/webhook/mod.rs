//! The pure core: a CMC Event Webhook request body in, one outgoing message per entry out.
//!
//! The route hands this module the body bytes and the `Content-Type`; it returns either a
//! typed [`PayloadError`] or an [`OutgoingBatch`] ready to publish. Nothing here touches a
//! socket, a clock or NATS, so every rule of SPEC §1–§2 is unit- and property-tested here.
//!
//! The steps, in the order the route calls them:
//! 1. [`decode`]: choose the encoding by media type, decode the form or JSON envelope, and
//!    extract the top-level parameters (`api_key` included, so the route can check it before
//!    anything else is looked at).
//! 2. [`Decoded::validate_with`]: check `event_type`, `server_composition`, the `event` object
//!    and every entry into a [`Batch`]: all-or-nothing by default, or keeping invalid entries
//!    aside for the dead-letter subject ([`InvalidEntries::DeadLetter`]).
//! 3. [`Batch::render`]: subject, body and headers of every entry, dead letters included, in
//!    entry order, with the batch's `traceparent`.

mod decode;
mod error;
pub mod json;
mod outgoing;
mod validate;

pub use decode::{decode, form_component, Decoded, Encoding};
pub use error::PayloadError;
pub use outgoing::{HeaderShape, HeaderValue, Headers, Outgoing, OutgoingBatch, Render};
pub use validate::{Batch, Entry, EventType, InvalidEntries, InvalidEntry, Status};
