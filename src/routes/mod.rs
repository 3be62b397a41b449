//! HTTP routes: the public webhook and the admin endpoints, as warp filters. The error
//! rendering shared by both lives in [`error`].

pub mod admin;
pub mod error;
pub mod inbound;
pub mod webhook;
