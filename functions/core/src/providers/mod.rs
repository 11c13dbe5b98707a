//! Providers: what runs a model behind the [`crate::ports::Generator`] port.
//!
//! - [`demo`]: the built-in demo models (`veo3`, `demo-image`, `echo`), the default catalog.

pub mod demo;

pub use demo::builtin_registry;
