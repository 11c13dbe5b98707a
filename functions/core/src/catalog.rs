//! The model catalog: a TOML file an operator edits to choose the models tasklane serves,
//! without rebuilding. [`load_file`] (or [`parse`]) turns it into a [`Registry`] that replaces
//! the built-in demo models; the runtimes read it at start (`TASKLANE_MODELS`).
//!
//! ```toml
//! [models.veo3]
//! provider = "cog"                        # "demo", or one of providers::UPSTREAM_PROVIDERS
//! description = "Video from a prompt, on our Cog server"
//! endpoint = "http://127.0.0.1:5055"      # the provider's base URL
//! price = { per_second = 10 }             # or { per_task = 5 }
//! duration = { min = 1, max = 8, default = 5 }
//! [models.veo3.params.fps]
//! type = "integer"
//! min = 1
//! max = 24
//! ```
//!
//! Every error names the model and the field (`model "veo3": field "price": ...`). The file
//! holds no secret: `api_key_env` names the environment variable that holds the provider's
//! credential, read when the catalog is loaded, never logged nor shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::providers::demo::{DEMO_KINDS, demo_generator};
use crate::providers::{self, UPSTREAM_PROVIDERS, UpstreamSettings};
use crate::registry::{
    DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_TIMEOUT, DurationRule, ModelSpec, ParamKind, ParamSpec,
    Pricing, Registry, Runner,
};

/// Per-request limit on calls to a provider when the entry sets no `request_timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest prompt when the entry's `prompt` sets no `max_length`.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 2000;
/// Longest string param when its `max_length` is not set.
pub const DEFAULT_MAX_PARAM_CHARS: usize = 2000;

/// Why a catalog was refused. Its message names the file, the model and the field where
/// they are known: `models.toml: model "veo3": field "price": give exactly one of ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogError {
    /// The catalog file, when it was read from one.
    pub path: Option<PathBuf>,
    /// The model whose entry is wrong.
    pub model: Option<String>,
    /// The field of the entry that is wrong (`price`, `params.fps.min`, ...).
    pub field: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for CatalogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        if let Some(m) = &self.model {
            write!(f, "model {m:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field {field:?}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for CatalogError {}

impl CatalogError {
    fn document(field: Option<&str>, message: impl Into<String>) -> Self {
        CatalogError {
            path: None,
            model: None,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    fn model(model: &str, field: Option<&str>, message: impl Into<String>) -> Self {
        CatalogError {
            path: None,
            model: Some(model.to_string()),
            field: field.map(str::to_string),
            message: message.into(),
        }
    }
}

/// One `[models.<name>]` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    provider: String,
    description: Option<String>,
    endpoint: Option<String>,
    upstream_model: Option<String>,
    api_key_env: Option<String>,
    webhook_secret_env: Option<String>,
    jwks_url: Option<String>,
    demo: Option<String>,
    actions: Option<Vec<String>>,
    prompt: Option<RawPrompt>,
    duration: Option<RawDuration>,
    price: Option<RawPrice>,
    timeout: Option<u64>,
    request_timeout: Option<u64>,
    concurrency: Option<u32>,
    trusted_hosts: Option<Vec<String>>,
    max_output_bytes: Option<u64>,
    params: Option<BTreeMap<String, RawParam>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    required: Option<bool>,
    max_length: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDuration {
    min: u32,
    max: u32,
    default: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    per_second: Option<u64>,
    per_task: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParam {
    #[serde(rename = "type")]
    kind: String,
    min: Option<i64>,
    max: Option<i64>,
    max_length: Option<usize>,
    description: Option<String>,
}

/// Whether `name` may name a model: `[a-z0-9][a-z0-9._-]{0,63}`, URL-safe and within the 64
/// characters the API accepts as a model id.
pub fn is_model_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

/// Whether `name` may name a param: a letter or `_`, then letters, digits or `_`; at most 64.
fn is_param_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether `name` may name an environment variable: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Reads the catalog file at `path` (`TASKLANE_MODELS`): [`parse`] with the process
/// environment. Errors name the file.
pub fn load_file(path: &Path, demo_time_scale: f64) -> Result<Registry, CatalogError> {
    let with_path = |mut e: CatalogError| {
        e.path = Some(path.to_path_buf());
        e
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        with_path(CatalogError::document(
            None,
            format!("cannot read the model catalog: {e}"),
        ))
    })?;
    parse(&text, &|name| std::env::var(name).ok(), demo_time_scale).map_err(with_path)
}

/// Parses a catalog document into a registry. `env` looks up the environment variables
/// entries name in `api_key_env`; `demo_time_scale` is passed to demo generators (see
/// [`providers::demo::builtin_registry`]).
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    demo_time_scale: f64,
) -> Result<Registry, CatalogError> {
    let doc: toml::Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    let mut models = None;
    for (key, value) in doc {
        if key != "models" {
            return Err(CatalogError::document(
                Some(&key),
                "unknown top-level key; a catalog holds only [models.<name>] tables",
            ));
        }
        models = Some(value);
    }
    let models = match models {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => {
            return Err(CatalogError::document(
                Some("models"),
                "must be a table of [models.<name>] entries",
            ));
        }
    };
    if models.is_empty() {
        return Err(CatalogError::document(
            Some("models"),
            "the catalog has no models; add a [models.<name>] table",
        ));
    }
    let mut registry = Registry::new();
    for (name, value) in models {
        if !is_model_name(&name) {
            return Err(CatalogError::model(
                &name,
                None,
                "invalid model name: 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a \
                 letter or digit",
            ));
        }
        if !value.is_table() {
            return Err(CatalogError::model(
                &name,
                None,
                "must be a table: [models.<name>] with its fields",
            ));
        }
        let raw: RawModel = value.try_into().map_err(|e| field_error(&name, &e))?;
        registry.register(build(&name, raw, env, demo_time_scale)?);
    }
    Ok(registry)
}

/// A document that is not TOML: where, and what.
fn syntax_error(text: &str, e: &toml::de::Error) -> CatalogError {
    let at = e.span().map(|s| {
        let before = &text[..s.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    CatalogError::document(
        None,
        format!("invalid TOML: {}{}", at.unwrap_or_default(), e.message()),
    )
}

/// A serde error on one entry, with the field it is about: toml appends ``in `<path>` `` to
/// errors below the entry's top level; an unknown or missing key names itself.
fn field_error(model: &str, e: &toml::de::Error) -> CatalogError {
    let message = e.message().trim().to_string();
    let shown = e.to_string();
    let path = shown
        .trim_end()
        .rsplit_once("\nin `")
        .and_then(|(_, p)| p.strip_suffix('`'))
        .map(str::to_string);
    let key = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split_once('`'))
        .map(|(k, _)| k.to_string());
    let field = match (path, key) {
        (Some(p), Some(k)) => Some(format!("{p}.{k}")),
        (Some(p), None) => Some(p),
        (None, k) => k,
    };
    CatalogError::model(model, field.as_deref(), message)
}

/// The model `name` an entry describes, checked field by field.
fn build(
    name: &str,
    raw: RawModel,
    env: &dyn Fn(&str) -> Option<String>,
    demo_time_scale: f64,
) -> Result<ModelSpec, CatalogError> {
    let err = |field: &str, message: String| CatalogError::model(name, Some(field), message);
    let is_demo = raw.provider == "demo";
    if !is_demo && !UPSTREAM_PROVIDERS.contains(&raw.provider.as_str()) {
        return Err(err(
            "provider",
            format!(
                "unknown provider {:?}; one of: demo, {}",
                raw.provider,
                UPSTREAM_PROVIDERS.join(", ")
            ),
        ));
    }
    if is_demo {
        let upstream_only = [
            ("endpoint", raw.endpoint.is_some()),
            ("upstream_model", raw.upstream_model.is_some()),
            ("api_key_env", raw.api_key_env.is_some()),
            ("webhook_secret_env", raw.webhook_secret_env.is_some()),
            ("jwks_url", raw.jwks_url.is_some()),
            ("request_timeout", raw.request_timeout.is_some()),
            ("concurrency", raw.concurrency.is_some()),
            ("trusted_hosts", raw.trusted_hosts.is_some()),
            ("max_output_bytes", raw.max_output_bytes.is_some()),
        ];
        if let Some((field, _)) = upstream_only.iter().find(|(_, set)| *set) {
            return Err(err(
                field,
                "only for upstream providers; a demo model runs in the worker".to_string(),
            ));
        }
    } else if raw.demo.is_some() {
        return Err(err(
            "demo",
            format!(
                "only for provider = \"demo\" (this model's provider is {:?})",
                raw.provider
            ),
        ));
    }

    let actions = raw.actions.unwrap_or_else(|| vec!["generate".to_string()]);
    if actions.is_empty() {
        return Err(err("actions", "give at least one action".to_string()));
    }
    for (i, a) in actions.iter().enumerate() {
        if a.trim().is_empty() || a.chars().count() > 64 {
            return Err(err(
                "actions",
                format!("action {a:?} must be 1 to 64 characters"),
            ));
        }
        if actions[..i].contains(a) {
            return Err(err("actions", format!("action {a:?} is listed twice")));
        }
    }

    let (prompt_required, max_prompt_chars) = match raw.prompt {
        None => (false, DEFAULT_MAX_PROMPT_CHARS),
        Some(p) => (
            p.required.unwrap_or(false),
            p.max_length.unwrap_or(DEFAULT_MAX_PROMPT_CHARS),
        ),
    };
    if max_prompt_chars == 0 {
        return Err(err("prompt.max_length", "must be at least 1".to_string()));
    }

    let duration = match raw.duration {
        None => None,
        Some(d) => {
            let default = d.default.unwrap_or(d.min);
            if d.min < 1 {
                return Err(err("duration", "min must be at least 1".to_string()));
            }
            if !(d.min <= default && default <= d.max) {
                return Err(err(
                    "duration",
                    format!(
                        "needs min <= default <= max (min {}, default {default}, max {})",
                        d.min, d.max
                    ),
                ));
            }
            Some(DurationRule {
                min: d.min,
                max: d.max,
                default,
            })
        }
    };

    let pricing = match raw.price {
        None => {
            return Err(err(
                "price",
                "required: { per_second = N } or { per_task = N }".to_string(),
            ));
        }
        Some(RawPrice {
            per_second: Some(c),
            per_task: None,
        }) => {
            if duration.is_none() {
                return Err(err(
                    "price",
                    "per_second needs a duration range (duration = { min, max, default })"
                        .to_string(),
                ));
            }
            Pricing::PerSecond(c)
        }
        Some(RawPrice {
            per_second: None,
            per_task: Some(c),
        }) => Pricing::Flat(c),
        Some(_) => {
            return Err(err(
                "price",
                "give exactly one of per_second or per_task".to_string(),
            ));
        }
    };

    let mut params = Vec::new();
    for (pname, p) in raw.params.unwrap_or_default() {
        params.push(param(&pname, p).map_err(|(field, message)| {
            CatalogError::model(name, Some(&format!("params.{pname}{field}")), message)
        })?);
    }

    let secs = |field: &str, v: Option<u64>, default: Duration| match v {
        None => Ok(default),
        Some(0) => Err(err(field, "must be at least 1 second".to_string())),
        Some(s) => Ok(Duration::from_secs(s)),
    };
    let timeout = secs("timeout", raw.timeout, DEFAULT_TIMEOUT)?;
    let request_timeout = secs(
        "request_timeout",
        raw.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
    )?;
    if raw.concurrency == Some(0) {
        return Err(err("concurrency", "must be at least 1".to_string()));
    }
    let max_output_bytes = match raw.max_output_bytes {
        Some(0) => return Err(err("max_output_bytes", "must be at least 1".to_string())),
        v => v.unwrap_or(DEFAULT_MAX_OUTPUT_BYTES),
    };
    let mut trusted_hosts = Vec::new();
    for h in raw.trusted_hosts.unwrap_or_default() {
        let host = h.trim().to_ascii_lowercase();
        if host.is_empty() || url::Host::parse(&host).is_err() {
            return Err(err(
                "trusted_hosts",
                format!("{h:?} is not a host name or address (no scheme, port or path)"),
            ));
        }
        trusted_hosts.push(host);
    }

    let description = raw.description.unwrap_or_default();
    let runner = if is_demo {
        let kind = raw.demo.ok_or_else(|| {
            err(
                "demo",
                format!(
                    "required for provider = \"demo\": one of {}",
                    DEMO_KINDS.join(", ")
                ),
            )
        })?;
        let generator = demo_generator(&kind, demo_time_scale).ok_or_else(|| {
            err(
                "demo",
                format!("unknown demo {kind:?}; one of {}", DEMO_KINDS.join(", ")),
            )
        })?;
        Runner::Local(generator)
    } else {
        let endpoint = raw
            .endpoint
            .as_deref()
            .map(|e| endpoint(e).map_err(|m| err("endpoint", m)))
            .transpose()?;
        let jwks_url = match raw.jwks_url.as_deref() {
            None => None,
            Some(_) if raw.provider != "fal" => {
                return Err(err(
                    "jwks_url",
                    format!(
                        "only for provider = \"fal\" (this model's provider is {:?})",
                        raw.provider
                    ),
                ));
            }
            Some(u) => Some(self::endpoint(u).map_err(|m| err("jwks_url", m))?),
        };
        // A secret named by `field`: the variable must be set (and not empty).
        let secret = |field: &str, var: Option<&str>, default: Option<&str>| match var {
            None => match default {
                None => Ok(None),
                Some(var) => env(var).filter(|v| !v.is_empty()).map(Some).ok_or_else(|| {
                    err(
                        field,
                        format!(
                            "not given, and environment variable {var} (the default for provider \
                             {:?}) is not set",
                            raw.provider
                        ),
                    )
                }),
            },
            Some(var) if !is_env_name(var) => Err(err(
                field,
                format!(
                    "{var:?} is not an environment variable name; give the variable's NAME, \
                     never the secret itself"
                ),
            )),
            Some(var) => env(var)
                .filter(|v| !v.is_empty())
                .map(Some)
                .ok_or_else(|| err(field, format!("environment variable {var} is not set"))),
        };
        let api_key = secret(
            "api_key_env",
            raw.api_key_env.as_deref(),
            providers::default_api_key_env(&raw.provider),
        )?;
        let webhook_secret = secret(
            "webhook_secret_env",
            raw.webhook_secret_env.as_deref(),
            None,
        )?;
        let settings = UpstreamSettings {
            provider: raw.provider.clone(),
            endpoint,
            model: raw.upstream_model.clone(),
            api_key,
            webhook_secret,
            jwks_url,
            request_timeout,
        };
        Runner::Upstream(
            providers::upstream(&settings).map_err(|(field, message)| err(&field, message))?,
        )
    };

    Ok(ModelSpec {
        name: name.to_string(),
        description,
        actions,
        prompt_required,
        max_prompt_chars,
        duration,
        params,
        pricing,
        runner,
        timeout,
        trusted_hosts,
        max_output_bytes,
        concurrency: raw.concurrency,
    })
}

/// A provider's base URL: `http` or `https`, with no credentials in it.
fn endpoint(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http or https URL, not {}:",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry credentials; put them in the environment variable api_key_env \
             names"
                .to_string(),
        );
    }
    if url.host().is_none() {
        return Err("must name a host".to_string());
    }
    Ok(url)
}

/// One `[models.<m>.params.<name>]` entry; `Err` has the field below the param (`""`,
/// `.min`, ...) and the message.
fn param(name: &str, p: RawParam) -> Result<ParamSpec, (String, String)> {
    let fail = |field: &str, m: &str| Err((field.to_string(), m.to_string()));
    if !is_param_name(name) {
        return fail(
            "",
            "invalid param name: 1 to 64 of letters, digits and '_', not starting with a digit",
        );
    }
    let kind = match p.kind.as_str() {
        "integer" => {
            if p.max_length.is_some() {
                return fail(".max_length", "only for type = \"string\"");
            }
            let (min, max) = (p.min.unwrap_or(i64::MIN), p.max.unwrap_or(i64::MAX));
            if min > max {
                return Err((".min".to_string(), format!("min {min} is above max {max}")));
            }
            ParamKind::Int { min, max }
        }
        "string" => {
            if p.min.is_some() {
                return fail(".min", "only for type = \"integer\"");
            }
            if p.max.is_some() {
                return fail(".max", "only for type = \"integer\"");
            }
            let max_chars = p.max_length.unwrap_or(DEFAULT_MAX_PARAM_CHARS);
            if max_chars == 0 {
                return fail(".max_length", "must be at least 1");
            }
            ParamKind::Str { max_chars }
        }
        "boolean" => {
            for (field, set) in [
                (".min", p.min.is_some()),
                (".max", p.max.is_some()),
                (".max_length", p.max_length.is_some()),
            ] {
                if set {
                    return fail(field, "not for type = \"boolean\"");
                }
            }
            ParamKind::Bool
        }
        other => {
            return Err((
                ".type".to_string(),
                format!("unknown type {other:?}; one of integer, string, boolean"),
            ));
        }
    };
    Ok(ParamSpec {
        name: name.to_string(),
        kind,
        description: p.description.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_err(text: &str) -> String {
        match parse(text, &no_env, 0.0) {
            Ok(r) => panic!("accepted: {:?}", r.names()),
            Err(e) => e.to_string(),
        }
    }

    const DEMO: &str =
        "[models.m]\nprovider = \"demo\"\ndemo = \"echo\"\nprice = { per_task = 1 }\n";

    #[test]
    fn a_mixed_catalog_builds_demo_and_cog_models_with_their_specs() {
        let text = r#"
[models.clip]
provider = "demo"
demo = "video"
description = "A demo clip"
actions = ["generate", "extend"]
prompt = { required = true, max_length = 500 }
duration = { min = 2, max = 8, default = 4 }
price = { per_second = 7 }
timeout = 90

[models.clip.params.fps]
type = "integer"
min = 1
max = 24
description = "frames per second"

[models.clip.params.style]
type = "string"
max_length = 40

[models.clip.params.loop]
type = "boolean"

[models.veo3]
provider = "cog"
description = "Video from a prompt, on our Cog server"
endpoint = "http://127.0.0.1:5055"
api_key_env = "COG_TOKEN"
price = { per_task = 25 }
request_timeout = 10
concurrency = 1
trusted_hosts = ["127.0.0.1", "Cog.Internal"]
max_output_bytes = 1048576
"#;
        let env = |k: &str| (k == "COG_TOKEN").then(|| "s3cret-token".to_string());
        let r = parse(text, &env, 0.0).unwrap();
        assert_eq!(r.names(), ["clip", "veo3"]);

        let clip = r.get("clip").unwrap();
        assert_eq!(clip.description, "A demo clip");
        assert_eq!(clip.actions, ["generate", "extend"]);
        assert!(clip.prompt_required);
        assert_eq!(clip.max_prompt_chars, 500);
        assert_eq!(
            clip.duration,
            Some(DurationRule {
                min: 2,
                max: 8,
                default: 4
            })
        );
        assert_eq!(clip.pricing, Pricing::PerSecond(7));
        assert_eq!(clip.cost(Some(3)), 21);
        assert_eq!(clip.timeout, Duration::from_secs(90));
        assert_eq!(clip.max_output_bytes, DEFAULT_MAX_OUTPUT_BYTES);
        assert_eq!(clip.concurrency, None);
        assert!(clip.trusted_hosts.is_empty());
        assert!(matches!(clip.runner, Runner::Local(_)));
        assert_eq!(clip.runner.provider(), "demo");
        let params: Vec<_> = clip
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.kind))
            .collect();
        assert_eq!(
            params,
            [
                ("fps", &ParamKind::Int { min: 1, max: 24 }),
                ("loop", &ParamKind::Bool),
                ("style", &ParamKind::Str { max_chars: 40 }),
            ]
        );
        assert_eq!(clip.params[0].description, "frames per second");

        let veo = r.get("veo3").unwrap();
        assert_eq!(veo.actions, ["generate"]);
        assert!(!veo.prompt_required);
        assert_eq!(veo.max_prompt_chars, DEFAULT_MAX_PROMPT_CHARS);
        assert_eq!(veo.duration, None);
        assert_eq!(veo.pricing, Pricing::Flat(25));
        assert_eq!(veo.cost(None), 25);
        assert_eq!(veo.timeout, DEFAULT_TIMEOUT);
        assert_eq!(veo.concurrency, Some(1));
        assert_eq!(veo.trusted_hosts, ["127.0.0.1", "cog.internal"]);
        assert_eq!(veo.max_output_bytes, 1_048_576);
        assert!(matches!(veo.runner, Runner::Upstream(_)));
        assert_eq!(veo.runner.provider(), "cog");
        assert!(veo.params.is_empty());

        // What clients see: the provider and timeout, never the endpoint nor the credential.
        let shown = veo.describe();
        assert_eq!(shown["provider"], "cog");
        assert_eq!(shown["timeout"], 600);
        let text = shown.to_string();
        assert!(
            !text.contains("s3cret-token") && !text.contains("5055"),
            "{text}"
        );
        assert_eq!(clip.describe()["provider"], "demo");
        assert_eq!(clip.describe()["timeout"], 90);
    }

    #[test]
    fn price_needs_exactly_one_of_per_second_or_per_task() {
        let both = "[models.veo3]\nprovider = \"demo\"\ndemo = \"video\"\n\
                    duration = { min = 1, max = 8 }\nprice = { per_second = 1, per_task = 2 }\n";
        assert_eq!(
            parse_err(both),
            "model \"veo3\": field \"price\": give exactly one of per_second or per_task"
        );
        let none = "[models.veo3]\nprovider = \"demo\"\ndemo = \"video\"\nprice = {}\n";
        assert!(parse_err(none).contains("field \"price\": give exactly one"));
        let missing = "[models.veo3]\nprovider = \"demo\"\ndemo = \"video\"\n";
        assert!(parse_err(missing).starts_with("model \"veo3\": field \"price\": required"));
        let per_second_without_duration =
            "[models.veo3]\nprovider = \"demo\"\ndemo = \"video\"\nprice = { per_second = 1 }\n";
        assert!(
            parse_err(per_second_without_duration)
                .starts_with("model \"veo3\": field \"price\": per_second needs a duration")
        );
    }

    #[test]
    fn unknown_fields_name_the_model_and_the_key() {
        let top = format!("{DEMO}colour = \"red\"\n");
        let e = parse_err(&top);
        assert!(
            e.starts_with("model \"m\": field \"colour\": unknown field `colour`"),
            "{e}"
        );
        let nested =
            "[models.m]\nprovider = \"demo\"\ndemo = \"echo\"\nprice = { per_secnd = 1 }\n";
        let e = parse_err(nested);
        assert!(
            e.starts_with("model \"m\": field \"price.per_secnd\": unknown field"),
            "{e}"
        );
        let in_param = format!("{DEMO}[models.m.params.fps]\ntype = \"integer\"\nmaximum = 3\n");
        let e = parse_err(&in_param);
        assert!(
            e.starts_with("model \"m\": field \"params.fps.maximum\": unknown field"),
            "{e}"
        );
        let wrong_type = format!("{DEMO}timeout = \"ten\"\n");
        let e = parse_err(&wrong_type);
        assert!(
            e.starts_with("model \"m\": field \"timeout\": invalid type"),
            "{e}"
        );
        let no_provider = "[models.m]\ndemo = \"echo\"\nprice = { per_task = 1 }\n";
        let e = parse_err(no_provider);
        assert!(
            e.starts_with("model \"m\": field \"provider\": missing field"),
            "{e}"
        );
        let top_level = format!("{DEMO}[model.x]\nprovider = \"demo\"\n");
        let e = parse_err(&top_level);
        assert!(
            e.starts_with("field \"model\": unknown top-level key"),
            "{e}"
        );
    }

    #[test]
    fn provider_errors_name_the_field() {
        let unknown = "[models.m]\nprovider = \"magic\"\nprice = { per_task = 1 }\n";
        assert!(parse_err(unknown).starts_with(
            "model \"m\": field \"provider\": unknown provider \"magic\"; one of: demo, cog"
        ));
        let no_endpoint = "[models.m]\nprovider = \"cog\"\nprice = { per_task = 1 }\n";
        let e = parse_err(no_endpoint);
        assert!(e.starts_with("model \"m\": field \"endpoint\": "), "{e}");
        let bad_endpoint =
            "[models.m]\nprovider = \"cog\"\nendpoint = \"not a url\"\nprice = { per_task = 1 }\n";
        assert!(parse_err(bad_endpoint).starts_with("model \"m\": field \"endpoint\": not a URL"));
        let ftp = "[models.m]\nprovider = \"cog\"\nendpoint = \"ftp://127.0.0.1\"\n\
                   price = { per_task = 1 }\n";
        assert!(parse_err(ftp).starts_with("model \"m\": field \"endpoint\": must be an http"));
        let userinfo = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://u:hunter2@127.0.0.1\"\n\
                        price = { per_task = 1 }\n";
        let e = parse_err(userinfo);
        assert!(
            e.contains("field \"endpoint\": must not carry credentials"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let no_kind = "[models.m]\nprovider = \"demo\"\nprice = { per_task = 1 }\n";
        assert!(parse_err(no_kind).starts_with("model \"m\": field \"demo\": required"));
        let bad_kind =
            "[models.m]\nprovider = \"demo\"\ndemo = \"audio\"\nprice = { per_task = 1 }\n";
        assert!(
            parse_err(bad_kind).starts_with("model \"m\": field \"demo\": unknown demo \"audio\"")
        );
        let demo_endpoint = format!("{DEMO}endpoint = \"http://127.0.0.1:1\"\n");
        assert!(
            parse_err(&demo_endpoint)
                .starts_with("model \"m\": field \"endpoint\": only for upstream")
        );
        let cog_demo = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://127.0.0.1:1\"\n\
                        demo = \"echo\"\nprice = { per_task = 1 }\n";
        assert!(parse_err(cog_demo).starts_with("model \"m\": field \"demo\": only for provider"));
    }

    #[test]
    fn a_missing_credential_names_the_variable_and_never_shows_a_value() {
        let text = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://127.0.0.1:5055\"\n\
                    api_key_env = \"REPLICATE_API_TOKEN\"\nprice = { per_task = 1 }\n";
        assert_eq!(
            parse_err(text),
            "model \"m\": field \"api_key_env\": environment variable REPLICATE_API_TOKEN is not set"
        );
        let empty = |_: &str| Some(String::new());
        assert!(
            parse(text, &empty, 0.0).is_err(),
            "an empty credential is no credential"
        );
        let set = |k: &str| (k == "REPLICATE_API_TOKEN").then(|| "r8_secret".to_string());
        assert!(parse(text, &set, 0.0).is_ok());
        let literal = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://127.0.0.1:5055\"\n\
                       api_key_env = \"r8-abc def\"\nprice = { per_task = 1 }\n";
        let e = parse_err(literal);
        assert!(e.starts_with("model \"m\": field \"api_key_env\": "), "{e}");
        assert!(e.contains("NAME"), "{e}");
    }

    #[test]
    fn a_replicate_model_reads_its_token_from_replicate_api_token_unless_told_otherwise() {
        let text = "[models.m]\nprovider = \"replicate\"\n\
                    upstream_model = \"black-forest-labs/flux-schnell\"\nprice = { per_task = 1 }\n";
        assert_eq!(
            parse_err(text),
            "model \"m\": field \"api_key_env\": not given, and environment variable \
             REPLICATE_API_TOKEN (the default for provider \"replicate\") is not set"
        );
        let env = |k: &str| match k {
            "REPLICATE_API_TOKEN" => Some("r8_default".to_string()),
            "HOOK" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()),
            "PLAIN" => Some("not-a-whsec".to_string()),
            _ => None,
        };
        let r = parse(text, &env, 0.0).unwrap();
        assert_eq!(r.get("m").unwrap().runner.provider(), "replicate");
        let signed = format!("{text}webhook_secret_env = \"HOOK\"\n");
        assert!(parse(&signed, &env, 0.0).is_ok());
        let missing = format!("{text}webhook_secret_env = \"NOPE\"\n");
        assert_eq!(
            parse(&missing, &env, 0.0).unwrap_err().to_string(),
            "model \"m\": field \"webhook_secret_env\": environment variable NOPE is not set"
        );
        let malformed = format!("{text}webhook_secret_env = \"PLAIN\"\n");
        let e = parse(&malformed, &env, 0.0).unwrap_err().to_string();
        assert!(
            e.starts_with("model \"m\": field \"webhook_secret_env\": ") && !e.contains("not-a"),
            "{e}"
        );
        let no_model = "[models.m]\nprovider = \"replicate\"\nprice = { per_task = 1 }\n";
        let e = parse(no_model, &env, 0.0).unwrap_err().to_string();
        assert!(
            e.starts_with("model \"m\": field \"upstream_model\": "),
            "{e}"
        );
        let demo = format!("{DEMO}webhook_secret_env = \"HOOK\"\n");
        assert!(
            parse_err(&demo).starts_with("model \"m\": field \"webhook_secret_env\": only for")
        );
    }

    #[test]
    fn duration_must_start_at_1_and_hold_its_default() {
        let with = |d: &str| {
            format!(
                "[models.m]\nprovider = \"demo\"\ndemo = \"video\"\nduration = {d}\nprice = {{ per_task = 1 }}\n"
            )
        };
        let e = parse_err(&with("{ min = 0, max = 5 }"));
        assert_eq!(e, "model \"m\": field \"duration\": min must be at least 1");
        let e = parse_err(&with("{ min = 2, max = 5, default = 9 }"));
        assert!(
            e.starts_with("model \"m\": field \"duration\": needs min <= default <= max"),
            "{e}"
        );
        let e = parse_err(&with("{ min = 6, max = 5 }"));
        assert!(
            e.starts_with("model \"m\": field \"duration\": needs min <= default <= max"),
            "{e}"
        );
        let e = parse_err(&with("{ min = 1 }"));
        assert!(
            e.starts_with("model \"m\": field \"duration.max\": missing field"),
            "{e}"
        );
        let r = parse(&with("{ min = 2, max = 5 }"), &no_env, 0.0).unwrap();
        assert_eq!(
            r.get("m").unwrap().duration.unwrap().default,
            2,
            "default: min"
        );
    }

    #[test]
    fn params_are_checked_by_type_and_bounds() {
        let with = |p: &str| format!("{DEMO}[models.m.params.x]\n{p}\n");
        let e = parse_err(&with("type = \"integer\"\nmin = 5\nmax = 1"));
        assert_eq!(
            e,
            "model \"m\": field \"params.x.min\": min 5 is above max 1"
        );
        let e = parse_err(&with("type = \"float\""));
        assert!(
            e.starts_with("model \"m\": field \"params.x.type\": unknown type \"float\""),
            "{e}"
        );
        let e = parse_err(&with("type = \"string\"\nmin = 1"));
        assert!(
            e.starts_with("model \"m\": field \"params.x.min\": only for type"),
            "{e}"
        );
        let e = parse_err(&with("type = \"integer\"\nmax_length = 1"));
        assert!(
            e.starts_with("model \"m\": field \"params.x.max_length\""),
            "{e}"
        );
        let e = parse_err(&with("type = \"boolean\"\nmax = 1"));
        assert!(e.starts_with("model \"m\": field \"params.x.max\""), "{e}");
        let e = parse_err(&with("min = 1"));
        assert!(
            e.starts_with("model \"m\": field \"params.x.type\": missing field"),
            "{e}"
        );
        let bad_name = format!("{DEMO}[models.m.params.\"a b\"]\ntype = \"boolean\"\n");
        assert!(
            parse_err(&bad_name)
                .starts_with("model \"m\": field \"params.a b\": invalid param name")
        );
        let r = parse(&with("type = \"integer\""), &no_env, 0.0).unwrap();
        assert_eq!(
            r.get("m").unwrap().params[0].kind,
            ParamKind::Int {
                min: i64::MIN,
                max: i64::MAX
            }
        );
    }

    #[test]
    fn other_fields_are_checked_and_named() {
        let cog = "[models.m]\nprovider = \"cog\"\nendpoint = \"http://127.0.0.1:5055\"\n\
                   price = { per_task = 1 }\n";
        for (extra, field) in [
            ("timeout = 0", "timeout"),
            ("request_timeout = 0", "request_timeout"),
            ("concurrency = 0", "concurrency"),
            ("max_output_bytes = 0", "max_output_bytes"),
            ("trusted_hosts = [\"http://x/\"]", "trusted_hosts"),
            ("trusted_hosts = [\"\"]", "trusted_hosts"),
            ("actions = []", "actions"),
            ("actions = [\"a\", \"a\"]", "actions"),
            ("prompt = { max_length = 0 }", "prompt.max_length"),
        ] {
            let e = parse_err(&format!("{cog}{extra}\n"));
            assert!(
                e.starts_with(&format!("model \"m\": field \"{field}\": ")),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn the_catalog_needs_models_with_url_safe_names() {
        assert_eq!(
            parse_err(""),
            "field \"models\": the catalog has no models; add a [models.<name>] table"
        );
        assert!(parse_err("[models]\n").contains("the catalog has no models"));
        assert!(parse_err("models = 3\n").starts_with("field \"models\": must be a table"));
        for bad in [
            "Veo3",
            "-veo",
            "veo 3",
            "veo/3",
            "v\u{e9}o",
            &"a".repeat(65),
        ] {
            let text = DEMO.replace("models.m]", &format!("models.\"{bad}\"]"));
            let e = parse_err(&text);
            assert!(
                e.starts_with(&format!("model {bad:?}: invalid model name")),
                "{bad}: {e}"
            );
        }
        for good in ["veo3", "0a", "flux-1.1_pro", &"a".repeat(64)] {
            let text = DEMO.replace("models.m]", &format!("models.\"{good}\"]"));
            assert!(parse(&text, &no_env, 0.0).is_ok(), "{good}");
        }
        let e = parse_err("[models.m]\nprovider = \"demo\"\nprovider = \"cog\"\n");
        assert!(e.starts_with("invalid TOML: line 3, column 1: "), "{e}");
    }

    #[test]
    fn load_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tasklane-catalog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.toml");
        let e = load_file(&missing, 0.0).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}: cannot read the model catalog",
                missing.display()
            )),
            "{e}"
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[models.m]\nprovider = \"demo\"\ndemo = \"echo\"\n").unwrap();
        let e = load_file(&bad, 0.0).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: model \"m\": field \"price\": required: {{ per_second = N }} or {{ per_task = N }}",
                bad.display()
            )
        );
        let good = dir.join("good.toml");
        std::fs::write(&good, DEMO).unwrap();
        assert_eq!(load_file(&good, 0.0).unwrap().names(), ["m"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
