//! The HTTP side of the proxy: serving clients, routing, forwarding.

pub mod body;
pub mod forward;
pub mod route;
pub mod server;
