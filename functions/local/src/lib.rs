//! # tasklane-local
//!
//! tasklane on a laptop: the core's API and processor with embedded backends.
//!
//! - [`sqlite`]: the task store and work queue in one SQLite file (durable across restarts).
//! - [`files`]: the results folder, handed out as URLs signed and served by this server.
//! - [`config`]: the settings, from the `TASKLANE_*` variables.
//! - [`embedded`]: the embedded backends under the data directory, and crash recovery at
//!   start-up; [`dev_account`]: the development account.
//! - [`server`]: composes the API, in-process workers and the sweeper, and shuts down
//!   gracefully; [`http`]: serves the API and the signed result URLs.

pub mod config;
pub mod dev_account;
pub mod embedded;
pub mod files;
pub mod http;
pub mod server;
pub mod sqlite;

pub use config::LocalConfig;
pub use server::{Backends, Hooks, Running, start, start_on, start_with};

pub use tasklane_core::logging::init_or_exit as init_tracing;
