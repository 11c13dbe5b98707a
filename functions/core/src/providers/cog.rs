//! Cog: the HTTP prediction API of a Cog model server (coglet), how teams package their own
//! models.

use async_trait::async_trait;

use super::UpstreamSettings;
use crate::ports::{CallbackRequest, Job, Upstream, UpstreamError, UpstreamReport, UpstreamState};

/// A Cog model server.
#[derive(Debug, Clone)]
pub struct Cog {
    base: url::Url,
    client: reqwest::Client,
}

impl Cog {
    /// A Cog server at `settings.endpoint` (required); `Err` names the field.
    pub fn new(settings: &UpstreamSettings) -> Result<Cog, (String, String)> {
        let base = settings.endpoint.clone().ok_or_else(|| {
            (
                "endpoint".to_string(),
                "a cog model needs the model server's base URL, e.g. http://127.0.0.1:5000"
                    .to_string(),
            )
        })?;
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ("endpoint".to_string(), e.to_string()))?;
        Ok(Cog { base, client })
    }
}

#[async_trait]
impl Upstream for Cog {
    fn provider(&self) -> &'static str {
        "cog"
    }

    async fn start(&self, _job: Job<'_>, _callback: &str) -> Result<String, UpstreamError> {
        let _ = (&self.base, &self.client);
        Err(UpstreamError::Unavailable("not implemented yet".into()))
    }

    async fn check(
        &self,
        _job: Job<'_>,
        _id: &str,
        _callback: &str,
    ) -> Result<UpstreamState, UpstreamError> {
        Err(UpstreamError::Unavailable("not implemented yet".into()))
    }

    async fn cancel(&self, _id: &str) -> Result<(), UpstreamError> {
        Ok(())
    }

    fn read_callback(&self, _req: CallbackRequest<'_>) -> Result<UpstreamReport, String> {
        Err("not implemented yet".into())
    }

    fn callback_is_authoritative(&self) -> bool {
        true
    }
}
