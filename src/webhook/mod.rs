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
//! 2. [`Decoded::validate`]: check `event_type`, `server_composition`, the `event` object and
//!    every entry, all-or-nothing, into a [`Batch`].
//! 3. [`Batch::to_outgoing`]: render subject, body and headers of every entry.

mod decode;
mod error;
pub mod json;
mod split;
mod validate;

pub use decode::{decode, Decoded, Encoding};
pub use error::PayloadError;
pub use split::{HeaderValue, Outgoing, OutgoingBatch};
pub use validate::{Batch, Entry, EventType, Status};
