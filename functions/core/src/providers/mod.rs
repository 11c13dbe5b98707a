//! Providers: what runs a model, behind the [`crate::ports::Generator`] port (in the worker)
//! or the [`crate::ports::Upstream`] port (elsewhere).
//!
//! - [`demo`]: the built-in demo models (`veo3`, `demo-image`, `echo`), the default catalog.
//! - [`cog`]: a Cog model server (the HTTP prediction API), how teams package their own models.
//! - [`replicate`]: Replicate's hosted predictions API.
//! - [`fal`]: fal.ai's queue API (ED25519-signed webhooks).
//! - [`veo`]: Veo video models on Google's Gemini API (long-running operations).

use std::sync::Arc;
use std::time::Duration;

use crate::ports::Upstream;

pub mod cog;
pub mod demo;
pub mod fal;
pub mod replicate;
pub mod veo;

pub use demo::builtin_registry;

/// The upstream providers [`upstream`] builds.
pub const UPSTREAM_PROVIDERS: [&str; 4] = ["cog", "fal", "replicate", "veo"];

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
    /// The secret the provider signs its webhooks with (Replicate's `whsec_…`), read from the
    /// environment variable the catalog's `webhook_secret_env` names. Never logged or shown.
    pub webhook_secret: Option<String>,
    /// Where the provider publishes the keys its webhooks are signed with (fal's JWKS), when
    /// the catalog's `jwks_url` overrides the provider's default.
    pub jwks_url: Option<url::Url>,
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
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwks_url", &self.jwks_url.as_ref().map(url::Url::as_str))
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// The environment variable holding a provider's credential when its catalog entry names
/// none in `api_key_env` (the variable the provider's own SDK reads).
pub fn default_api_key_env(provider: &str) -> Option<&'static str> {
    match provider {
        "fal" => Some(fal::DEFAULT_API_KEY_ENV),
        "replicate" => Some(replicate::DEFAULT_API_KEY_ENV),
        "veo" => Some(veo::DEFAULT_API_KEY_ENV),
        _ => None,
    }
}

/// Builds the upstream a catalog entry describes; `Err` names the field that is wrong.
pub fn upstream(settings: &UpstreamSettings) -> Result<Arc<dyn Upstream>, (String, String)> {
    match settings.provider.as_str() {
        "cog" => Ok(Arc::new(cog::Cog::new(settings)?)),
        "fal" => Ok(Arc::new(fal::Fal::new(settings)?)),
        "replicate" => Ok(Arc::new(replicate::Replicate::new(settings)?)),
        "veo" => Ok(Arc::new(veo::Veo::new(settings)?)),
        other => Err((
            "provider".to_string(),
            format!(
                "unknown provider {other:?}; one of: demo, {}",
                UPSTREAM_PROVIDERS.join(", ")
            ),
        )),
    }
}

/// An upstream that did not answer: `who` (e.g. "Replicate") timed out or could not be reached.
/// Retried; never names an address or a credential.
pub(crate) fn unreachable(who: &str, e: &reqwest::Error) -> crate::ports::UpstreamError {
    crate::ports::UpstreamError::Unavailable(if e.is_timeout() {
        format!("{who} did not answer in time")
    } else {
        format!("{who} could not be reached")
    })
}

/// The HTTP client of a provider's API: each request bounded by `timeout`, no redirects
/// followed (a credential never travels to where a redirect points).
pub(crate) fn api_client(timeout: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tasklane/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}
