//! The model registry: what each model accepts, what it costs, and what runs it.
//!
//! The built-in demo models ([`crate::providers::builtin_registry`]) are the default; an
//! operator's catalog ([`crate::catalog`]) replaces them with models served by upstream
//! providers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::ports::{Generator, Upstream};

/// Limits on a model's `duration`, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationRule {
    /// Smallest accepted.
    pub min: u32,
    /// Largest accepted.
    pub max: u32,
    /// Used when the request has none.
    pub default: u32,
}

/// The type and bounds of one model parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamKind {
    /// An integer in `min..=max`.
    Int {
        /// Smallest accepted.
        min: i64,
        /// Largest accepted.
        max: i64,
    },
    /// A string of at most `max_chars` characters.
    Str {
        /// Longest accepted.
        max_chars: usize,
    },
    /// `true` or `false`.
    Bool,
}

/// One accepted parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Name inside `params`.
    pub name: String,
    /// Type and bounds.
    pub kind: ParamKind,
    /// What it does.
    pub description: String,
}

/// How a task is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// A fixed price per task.
    Flat(u64),
    /// A price per second of `duration`.
    PerSecond(u64),
}

/// What runs a model's tasks.
#[derive(Clone)]
pub enum Runner {
    /// A generator inside the worker, which holds the task's lease while it runs (the demo
    /// models).
    Local(Arc<dyn Generator>),
    /// An upstream service: the worker starts the job and lets go; the upstream's callback or
    /// a later check finishes the task ([`crate::upstream`]).
    Upstream(Arc<dyn Upstream>),
}

impl Runner {
    /// The provider's name, as `GET /v1/models` shows it: the upstream's (`cog`, ...), or
    /// `demo` for a generator in the worker.
    pub fn provider(&self) -> &'static str {
        match self {
            Runner::Local(_) => "demo",
            Runner::Upstream(u) => u.provider(),
        }
    }
}

/// Everything the API knows about a model.
#[derive(Clone)]
pub struct ModelSpec {
    /// Name clients send as `model`.
    pub name: String,
    /// One line for docs.
    pub description: String,
    /// Accepted `action` values; the first is the default when it is not `generate`.
    pub actions: Vec<String>,
    /// Whether `prompt` must be present and non-empty.
    pub prompt_required: bool,
    /// Longest accepted prompt, in characters.
    pub max_prompt_chars: usize,
    /// `duration` rule; `None` when the model takes no duration.
    pub duration: Option<DurationRule>,
    /// Accepted `params`.
    pub params: Vec<ParamSpec>,
    /// Price.
    pub pricing: Pricing,
    /// Runs the task.
    pub runner: Runner,
    /// How long a task may run upstream before it is cancelled there and fails (`timeout`).
    pub timeout: Duration,
    /// Hosts whose output URLs are fetched even when they resolve to private addresses (an
    /// operator's own model server or bucket); every other output URL must be public.
    pub trusted_hosts: Vec<String>,
    /// Largest output file accepted from the upstream, in bytes.
    pub max_output_bytes: u64,
    /// How many jobs the upstream runs at once (a Cog server runs one), when the operator
    /// said; `None`: not limited by tasklane.
    pub concurrency: Option<u32>,
}

/// The timeout of a model that does not set one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The output size cap of a model that does not set one.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 512 * 1024 * 1024;

impl ModelSpec {
    /// A model run in the worker by `generator`, with the default timeout and output cap and
    /// no params (set the other fields after).
    pub fn local(name: &str, description: &str, generator: Arc<dyn Generator>) -> ModelSpec {
        ModelSpec {
            name: name.to_string(),
            description: description.to_string(),
            actions: vec!["generate".to_string()],
            prompt_required: false,
            max_prompt_chars: 2000,
            duration: None,
            params: Vec::new(),
            pricing: Pricing::Flat(1),
            runner: Runner::Local(generator),
            timeout: DEFAULT_TIMEOUT,
            trusted_hosts: Vec::new(),
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            concurrency: None,
        }
    }
}

impl std::fmt::Debug for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ModelSpec {
    /// Credits a task with this `duration` costs.
    pub fn cost(&self, duration: Option<u32>) -> u64 {
        match self.pricing {
            Pricing::Flat(c) => c,
            Pricing::PerSecond(c) => c * u64::from(duration.unwrap_or(1)),
        }
    }

    /// Checks `params` against the spec; the error names the offending `params.<name>`.
    pub fn check_params(&self, params: &Map<String, Value>) -> Result<(), (String, String)> {
        for (name, value) in params {
            let param = format!("params.{name}");
            let Some(spec) = self.params.iter().find(|p| p.name == *name) else {
                let known: Vec<_> = self.params.iter().map(|p| p.name.as_str()).collect();
                let msg = if known.is_empty() {
                    format!("model {} takes no params", self.name)
                } else {
                    format!(
                        "unknown param {name:?}; model {} accepts: {}",
                        self.name,
                        known.join(", ")
                    )
                };
                return Err((param, msg));
            };
            let ok = match &spec.kind {
                ParamKind::Int { min, max } => {
                    value.as_i64().is_some_and(|v| (*min..=*max).contains(&v))
                }
                ParamKind::Str { max_chars } => value
                    .as_str()
                    .is_some_and(|s| s.chars().count() <= *max_chars),
                ParamKind::Bool => value.is_boolean(),
            };
            if !ok {
                let expected = match &spec.kind {
                    ParamKind::Int { min, max } => format!("an integer from {min} to {max}"),
                    ParamKind::Str { max_chars } => {
                        format!("a string of at most {max_chars} characters")
                    }
                    ParamKind::Bool => "true or false".to_string(),
                };
                return Err((param, format!("{name} must be {expected}")));
            }
        }
        Ok(())
    }

    /// A JSON description for docs and `GET /v1/models`: what a client may send and what it
    /// costs, the provider's name and the timeout; never where the model runs nor its
    /// credentials.
    pub fn describe(&self) -> Value {
        let params: Map<String, Value> = self
            .params
            .iter()
            .map(|p| {
                let kind = match &p.kind {
                    ParamKind::Int { min, max } => {
                        json!({"type": "integer", "minimum": min, "maximum": max})
                    }
                    ParamKind::Str { max_chars } => {
                        json!({"type": "string", "max_length": max_chars})
                    }
                    ParamKind::Bool => json!({"type": "boolean"}),
                };
                let mut v = kind;
                v["description"] = json!(p.description);
                (p.name.clone(), v)
            })
            .collect();
        json!({
            "id": self.name,
            "description": self.description,
            "actions": self.actions,
            "prompt": {"required": self.prompt_required, "max_length": self.max_prompt_chars},
            "duration": self.duration.map(|d| json!({"min": d.min, "max": d.max, "default": d.default})),
            "params": params,
            "pricing": match self.pricing {
                Pricing::Flat(c) => json!({"credits_per_task": c}),
                Pricing::PerSecond(c) => json!({"credits_per_second": c}),
            },
            "provider": self.runner.provider(),
            "timeout": self.timeout.as_secs(),
        })
    }
}

/// The set of models the API serves.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    models: BTreeMap<String, ModelSpec>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a model.
    pub fn register(&mut self, spec: ModelSpec) -> &mut Self {
        self.models.insert(spec.name.clone(), spec);
        self
    }

    /// Looks a model up by name.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.get(name)
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }

    /// All models, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.values()
    }
}
