//! Providers: what runs a model, behind the [`crate::ports::Generator`] port (in the worker)
//! or the [`crate::ports::Upstream`] port (elsewhere).
//!
//! - [`demo`]: the built-in demo models (`veo3`, `demo-image`, `echo`), the default catalog.
//! - [`cog`]: a Cog model server (the HTTP prediction API), how teams package their own models.

use std::sync::Arc;
use std::time::Duration;

use crate::ports::Upstream;

pub mod cog;
pub mod demo;

pub use demo::builtin_registry;

/// The upstream providers [`upstream`] builds.
pub const UPSTREAM_PROVIDERS: [&str; 1] = ["cog"];

/// How to reach one upstream model, from a catalog entry ([`crate::catalog`]).
#[derive(Clone)]
pub struct UpstreamSettings {
    /// Provider name, one of [`UPSTREAM_PROVIDERS`].
    pub provider: String,
    /// Base URL of the provider's API (a Cog server's address; for hosted providers their
    /// public API unless overridden).
    pub endpoint: Option<url::Url>,
    /// The provider's name of the model (`owner/name` on Replicate, an app path on fal, a
    /// model id on Veo); unused by Cog.
    pub model: Option<String>,
    /// The provider's API credential, read from the environment. Never logged or shown.
    pub api_key: Option<String>,
    /// Limit on each HTTP request to the provider.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("provider", &self.provider)
            .field("endpoint", &self.endpoint.as_ref().map(url::Url::as_str))
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Builds the upstream a catalog entry describes; `Err` names the field that is wrong.
pub fn upstream(settings: &UpstreamSettings) -> Result<Arc<dyn Upstream>, (String, String)> {
    match settings.provider.as_str() {
        "cog" => Ok(Arc::new(cog::Cog::new(settings)?)),
        other => Err((
            "provider".to_string(),
            format!(
                "unknown provider {other:?}; one of: demo, {}",
                UPSTREAM_PROVIDERS.join(", ")
            ),
        )),
    }
}
