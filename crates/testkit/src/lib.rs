//! # tasklane-testkit
//!
//! What the suites in `tests/`, the soak run and the tools (`tasklane-tools`) share to test and
//! measure tasklane. The product crates use it only as a dev-dependency, so no release binary
//! contains any of it.
//!
//! - [`intercept`]: port wrappers that run a hook before each call (fail, delay or hold it).
//! - [`chaos`]: seeded fault injection (failed and delayed store and queue calls, duplicate
//!   messages, workers halted between two steps) on the core's seams.
//! - [`soak`]: the soak run (many clients, injected faults, every answer recorded) and its
//!   history check, one function per property.
//! - [`dynamo_proxy`]: a proxy that gives the emulator's DynamoDB the real service's atomic
//!   transactions and its `TransactionConflict` for overlapping ones (binary
//!   `tasklane-dynamo-proxy`, which the test command puts in front of moto).
//! - [`memory`]: small in-memory adapters (store, queue, blobs) for volume, e.g. the API fuzzer.
//! - [`provision`]: creates the resources `template.yaml` declares on an AWS emulator.
//! - [`runtime_api`]: a Lambda Runtime API emulator that runs a function binary as Lambda does.
//! - [`cog`]: the real Cog prediction server (coglet) on loopback running a predictor of
//!   `tests/cog/`, and what it was observed to do (the Cog provider adapter relies on it).
//! - [`replicate`]: a fake of Replicate's predictions API on loopback (time-driven lifecycle,
//!   signed webhooks, protected output files) with switches for throttling, 5xx and lost webhooks.
//! - [`fal`]: a fake of fal.ai's queue API on loopback (queue, status with logs, results,
//!   cancel, ED25519-signed webhooks with a published JWKS, a public CDN) with switches for
//!   gateway errors, skewed or lost webhooks.
//! - [`veo`]: a fake of Google's Gemini API for Veo (operations, key check, downloads that
//!   redirect to storage, quota, safety and server errors) on loopback, with counters.
//! - [`TaskBuilder`]: a task for a test, as submit would store it unless told otherwise.

pub mod chaos;
pub mod cog;
pub mod dynamo_proxy;
pub mod fal;
pub mod intercept;
pub mod memory;
pub mod provision;
pub mod replicate;
pub mod runtime_api;
pub mod soak;
pub mod task;
pub mod veo;

pub use task::TaskBuilder;
