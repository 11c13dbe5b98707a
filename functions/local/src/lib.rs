//! # tasklane-local
//!
//! tasklane on a laptop: the core's API and processor with embedded backends.
//!
//! - [`sqlite`]: the task store and work queue in one SQLite file (durable across restarts).
//! - [`files`]: the results folder, handed out as URLs signed and served by this server.
//! - [`server`]: configuration from the environment, the HTTP server, in-process workers,
//!   recovery at start-up and graceful shutdown.
//! - [`soak`]: the soak run (many clients, injected faults, every answer recorded) and its
//!   history check.

pub mod files;
pub mod server;
pub mod soak;
pub mod sqlite;

pub use server::{Backends, Hooks, LocalConfig, Running, start, start_on, start_with};

pub use tasklane_core::logging::init_or_exit as init_tracing;
