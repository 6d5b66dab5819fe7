//! What every pgevents binary shares, kept out of `event-store` so that an application appending
//! events through the libraries does not build an HTTP server or an argument parser:
//!
//! - [`config`]: the command-line pieces (database URL, log level, HTTP address, the NOTIFY
//!   channel), each with its environment twin, and how `main` ends ([`config::exit_code`]).
//! - [`telemetry`]: logging, set up from `--log-level`.
//! - [`ops`]: the `/healthz` + `/metrics` endpoint and the health board behind it.
//! - [`shutdown`]: SIGTERM/SIGINT as a cancellation token.
//!
//! The `migrate` binary (`src/bin/migrate.rs`) lives here too, as the one binary of the schema.

pub mod config;
pub mod ops;
pub mod shutdown;
pub mod telemetry;
