//! # tasklane-core
//!
//! Everything tasklane is, apart from where it runs. No AWS SDK, no Lambda types:
//!
//! - [`task`]: the task, its closed set of states and the one function ([`task::apply`]) that
//!   changes it, refunds included.
//! - [`account`]: accounts, API keys (stored as hashes) and webhook secrets.
//! - [`validate`]: request parsing; a [`validate::SubmitRequest`] only exists when valid.
//! - [`ports`]: the traits adapters and providers implement (task store, work queue, blob
//!   store, generator).
//! - [`registry`]: what each model accepts and costs, and which generator runs it.
//! - [`providers`]: the generators; today the built-in demo models (`veo3`, `demo-image`,
//!   `echo`). Dependencies run one way: ports ← registry ← providers.
//! - [`catalog`]: the operator's model catalog (TOML, `TASKLANE_MODELS`) turned into a
//!   registry, instead of the built-in demo models.
//! - [`api`]: request handling for every endpoint over `http` types, for any runtime.
//! - [`processor`]: runs queued work (generation, webhook delivery) idempotently.
//! - [`webhook`]: Standard Webhooks signing and a sender that refuses non-public targets.
//! - [`error`]: the one error enum and its mapping to the API error shape.
//! - Seams for fault injection, which lives in `tasklane-testkit` (the core injects no fault
//!   itself): the worker scope ([`processor::in_worker`]) and [`ports::PortError::Halted`].
//! - [`sweeper`]: re-enqueues work a task waits on when its message was lost.
//! - [`limits`]: per-account rate limiting; [`logging`]: log output (text or JSON, colour only
//!   on a terminal); [`metrics`]: CloudWatch embedded-metric-format lines at each decision.
//! - [`view`], [`events`], [`config`]: the task object, in-process wake-ups, settings.

pub mod account;
pub mod api;
pub mod catalog;
pub mod config;
pub mod error;
pub mod events;
pub mod limits;
pub mod logging;
pub mod media;
pub mod metrics;
pub mod ports;
pub mod processor;
pub mod providers;
pub mod registry;
pub mod result_urls;
pub mod sweeper;
pub mod task;
pub mod upstream;
pub mod validate;
pub mod view;
pub mod webhook;

use std::sync::{Arc, Mutex};

pub use config::Config;
pub use error::ApiError;

/// The dependencies every handler and the processor share: adapters, registry, settings.
pub struct App {
    /// Task store adapter.
    pub store: Arc<dyn ports::TaskStore>,
    /// Work queue adapter.
    pub queue: Arc<dyn ports::WorkQueue>,
    /// Blob store adapter.
    pub blobs: Arc<dyn ports::BlobStore>,
    /// Models.
    pub registry: registry::Registry,
    /// Settings.
    pub config: Config,
    /// In-process wake-ups for sync waiters.
    pub events: events::TaskEvents,
    /// Per-account rate limiter, when [`Config::rate_limit`] is set.
    pub limiter: Option<limits::RateLimiter>,
    ids: Mutex<ulid::Generator>,
}

impl App {
    /// Assembles the shared dependencies.
    pub fn new(
        store: Arc<dyn ports::TaskStore>,
        queue: Arc<dyn ports::WorkQueue>,
        blobs: Arc<dyn ports::BlobStore>,
        registry: registry::Registry,
        config: Config,
    ) -> Arc<Self> {
        Arc::new(App {
            limiter: config.rate_limit.map(limits::RateLimiter::new),
            store,
            queue,
            blobs,
            registry,
            config,
            events: events::TaskEvents::default(),
            ids: Mutex::new(ulid::Generator::new()),
        })
    }

    /// A new task id: `task_` + a ULID, monotonic within this process.
    pub fn new_task_id(&self) -> String {
        let id = self
            .ids
            .lock()
            .ok()
            .and_then(|mut g| g.generate().ok())
            .unwrap_or_else(|| ulid::Ulid::from_datetime(std::time::SystemTime::now()));
        format!("task_{id}")
    }
}

/// Whether `s` has the shape of a task id (`task_` + 26 Crockford base-32 characters).
pub fn is_task_id(s: &str) -> bool {
    s.strip_prefix("task_")
        .is_some_and(|u| u.len() == 26 && ulid::Ulid::from_string(u).is_ok())
}
