//! Counts the AWS requests the adapters send and get an answer to, per service and operation
//! (retries included; presigning sends nothing and is not counted):
//! the measurement behind "how many requests does each API operation make".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeDeserializationInterceptorContextRef,
    BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// An SDK interceptor counting requests on the wire, keyed `Service.Operation`.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Every call with its request and response bodies (for `--cost`: item sizes).
    calls: Arc<Mutex<Vec<Call>>>,
    /// The body of the request in flight (the bench sends one request at a time).
    pending: Arc<Mutex<Vec<u8>>>,
}

/// One request on the wire, with its bodies (empty when streamed).
#[derive(Debug, Clone)]
pub struct Call {
    /// `Service.Operation`.
    pub op: String,
    /// The request body.
    pub request: Vec<u8>,
    /// The response body.
    pub response: Vec<u8>,
}

impl RequestCounter {
    /// Returns the counts so far and starts again from zero.
    pub fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Returns the calls so far, with their bodies, and starts again from none.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn op_key(cfg: &ConfigBag) -> String {
    match cfg.load::<Metadata>() {
        Some(m) => format!("{}.{}", m.service(), m.name()),
        None => "unknown".to_string(),
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    // After transmit: presigning runs the request pipeline too, but sends nothing.
    fn read_after_transmit(
        &self,
        _context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let key = op_key(cfg);
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
        Ok(())
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context
            .request()
            .body()
            .bytes()
            .unwrap_or_default()
            .to_vec();
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = body;
        Ok(())
    }

    // The response body is buffered once deserialized (no streaming output is counted).
    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let response = context
            .response()
            .body()
            .bytes()
            .unwrap_or_default()
            .to_vec();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Call {
                op: op_key(cfg),
                request,
                response,
            });
        Ok(())
    }
}
