//! The model registry: what each model accepts, what it costs, and the generator that runs it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::ports::Generator;

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
    pub name: &'static str,
    /// Type and bounds.
    pub kind: ParamKind,
    /// What it does.
    pub description: &'static str,
}

/// How a task is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// A fixed price per task.
    Flat(u64),
    /// A price per second of `duration`.
    PerSecond(u64),
}

/// Everything the API knows about a model.
#[derive(Clone)]
pub struct ModelSpec {
    /// Name clients send as `model`.
    pub name: &'static str,
    /// One line for docs.
    pub description: &'static str,
    /// Accepted `action` values; the first is the default when it is not `generate`.
    pub actions: &'static [&'static str],
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
    pub generator: Arc<dyn Generator>,
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
            let Some(spec) = self.params.iter().find(|p| p.name == name) else {
                let known: Vec<_> = self.params.iter().map(|p| p.name).collect();
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

    /// A JSON description for docs and `GET /v1/models`.
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
                (p.name.to_string(), v)
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
        })
    }
}

/// The set of models the API serves.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    models: BTreeMap<&'static str, ModelSpec>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a model.
    pub fn register(&mut self, spec: ModelSpec) -> &mut Self {
        self.models.insert(spec.name, spec);
        self
    }

    /// Looks a model up by name.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.get(name)
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.models.keys().copied().collect()
    }

    /// All models, sorted by name.
    pub fn models(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.values()
    }
}
