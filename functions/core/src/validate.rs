//! Parsing and validation of request input. A [`SubmitRequest`] only exists when every field
//! is within what `openapi.yaml` and the model registry accept.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::registry::{ModelSpec, Registry};

/// At most this many metadata entries.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest metadata key, in characters.
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// Longest metadata value, in characters.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;
/// Longest `callback_url`.
pub const MAX_CALLBACK_URL_CHARS: usize = 2048;
/// Longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

const FIELDS: &[&str] = &[
    "model",
    "action",
    "prompt",
    "duration",
    "params",
    "callback_url",
    "metadata",
];

/// A validated submit body.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmitRequest {
    /// Registered model.
    pub model: String,
    /// One of the model's actions.
    pub action: String,
    /// Prompt within the model's limit.
    pub prompt: Option<String>,
    /// Duration within the model's range (defaulted).
    pub duration: Option<u32>,
    /// Params accepted by the model.
    pub params: Map<String, Value>,
    /// Webhook target.
    pub callback_url: Option<String>,
    /// Client metadata.
    pub metadata: BTreeMap<String, String>,
    /// Sync wait in seconds (only on the sync endpoint); not part of the idempotency hash.
    pub timeout: Option<f64>,
    /// SHA-256 of the canonical body without `timeout`, for idempotency.
    pub request_hash: String,
}

/// Options of submit validation that come from configuration.
#[derive(Debug, Clone, Copy)]
pub struct SubmitRules {
    /// Accept `timeout` (sync endpoint).
    pub allow_timeout: bool,
    /// Accept `http` and private/loopback callback targets (local development).
    pub callback_allow_private: bool,
}

/// Parses and validates a submit body against the registry.
pub fn parse_submit(
    body: &[u8],
    registry: &Registry,
    rules: SubmitRules,
) -> Result<SubmitRequest, ApiError> {
    let value = parse_strict_json(body)?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid_body("request body must be a JSON object"));
    };
    let timeout = take_timeout(&mut obj, rules)?;
    if let Some(field) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(unknown(field));
    }
    let request_hash = hex::encode(Sha256::digest(
        Value::Object(obj.clone()).to_string().as_bytes(),
    ));
    let model = model_of(&obj, registry)?;
    let params = match obj.get("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(_) => return Err(ApiError::invalid("params", "params must be an object")),
    };
    model
        .check_params(&params)
        .map_err(|(param, msg)| ApiError::invalid(param, msg))?;
    let callback_url = optional_str(&obj, "callback_url")?
        .map(|u| check_callback_url(u, rules.callback_allow_private))
        .transpose()?;
    Ok(SubmitRequest {
        model: model.name.to_string(),
        action: action_of(&obj, model)?,
        prompt: prompt_of(&obj, model)?,
        duration: duration_of(&obj, model)?,
        params,
        callback_url,
        metadata: parse_metadata(obj.get("metadata"))?,
        timeout,
        request_hash,
    })
}

/// A string field, absent or null as `None`; anything else is a 400 naming it.
fn optional_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(name, format!("{name} must be a string"))),
    }
}

/// Removes `timeout` (seconds, sync submits only): it is not part of the task, nor of the
/// body an `Idempotency-Key` is compared on.
fn take_timeout(obj: &mut Map<String, Value>, rules: SubmitRules) -> Result<Option<f64>, ApiError> {
    match obj.remove("timeout") {
        None | Some(Value::Null) => Ok(None),
        Some(_) if !rules.allow_timeout => Err(unknown("timeout")),
        Some(v) => match v.as_f64() {
            Some(t) if t >= 0.0 && t.is_finite() => Ok(Some(t)),
            _ => Err(ApiError::invalid(
                "timeout",
                "timeout must be a number of seconds, 0 or more",
            )),
        },
    }
}

/// The model named by the required `model` field.
fn model_of<'r>(
    obj: &Map<String, Value>,
    registry: &'r Registry,
) -> Result<&'r ModelSpec, ApiError> {
    let name = optional_str(obj, "model")?
        .ok_or_else(|| ApiError::invalid("model", "model is required"))?;
    registry.get(name).ok_or_else(|| {
        ApiError::invalid(
            "model",
            format!(
                "unknown model {:?}; available: {}",
                truncate(name),
                registry.names().join(", ")
            ),
        )
    })
}

/// `action`, one of the model's (default: its first).
fn action_of(obj: &Map<String, Value>, model: &ModelSpec) -> Result<String, ApiError> {
    match optional_str(obj, "action")? {
        None => Ok(model.actions[0].to_string()),
        Some(a) if model.actions.iter().any(|x| x == a) => Ok(a.to_string()),
        Some(a) => Err(ApiError::invalid(
            "action",
            format!(
                "model {} does not support action {:?}; supported: {}",
                model.name,
                truncate(a),
                model.actions.join(", ")
            ),
        )),
    }
}

/// `prompt`, within the model's length, present and not blank where the model requires one.
fn prompt_of(obj: &Map<String, Value>, model: &ModelSpec) -> Result<Option<String>, ApiError> {
    let prompt = optional_str(obj, "prompt")?;
    match prompt {
        Some(p) if p.chars().count() > model.max_prompt_chars => Err(ApiError::invalid(
            "prompt",
            format!(
                "prompt is longer than {} characters",
                model.max_prompt_chars
            ),
        )),
        Some(p) if model.prompt_required && p.trim().is_empty() => {
            Err(ApiError::invalid("prompt", "prompt must not be empty"))
        }
        None if model.prompt_required => Err(ApiError::invalid(
            "prompt",
            format!("model {} requires a prompt", model.name),
        )),
        _ => Ok(prompt.map(str::to_string)),
    }
}

/// `duration` in whole seconds within the model's rule (default: the rule's), refused for a
/// model that takes none.
fn duration_of(obj: &Map<String, Value>, model: &ModelSpec) -> Result<Option<u32>, ApiError> {
    match (obj.get("duration"), model.duration) {
        (None | Some(Value::Null), rule) => Ok(rule.map(|r| r.default)),
        (Some(_), None) => Err(ApiError::invalid(
            "duration",
            format!("model {} takes no duration", model.name),
        )),
        (Some(v), Some(rule)) => match v.as_u64() {
            Some(d) if (u64::from(rule.min)..=u64::from(rule.max)).contains(&d) => {
                Ok(Some(d as u32))
            }
            _ => Err(ApiError::invalid(
                "duration",
                format!(
                    "duration must be a whole number of seconds from {} to {}",
                    rule.min, rule.max
                ),
            )),
        },
    }
}

/// A JSON value that refuses objects with a repeated key at any depth: two parsers that
/// resolve duplicates differently must never see two different requests.
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(integral(v)
            .unwrap_or_else(|| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                let k: String = k.chars().take(64).collect();
                return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// `v` as a JSON integer when it is a whole number in `i64` or `u64` range: JSON Schema (and
/// so openapi.yaml) counts `17.0` and `1.7e1` as the integer 17, and so does the API, for every
/// integer field (`duration`, integer `params`) and in the idempotency comparison.
fn integral(v: f64) -> Option<Value> {
    // 2^63 and 2^64, exactly representable, so the range checks below are exact.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if !v.is_finite() || v.fract() != 0.0 {
        return None;
    }
    if (0.0..U64_END).contains(&v) {
        Some(Value::from(v as u64))
    } else if (-I64_END..0.0).contains(&v) {
        Some(Value::from(v as i64))
    } else {
        None
    }
}

/// Parses a request body as JSON, refusing repeated keys. Whole numbers written with a
/// fraction or an exponent (`17.0`, `1.7e1`) come out as integers when they fit `i64` or `u64`.
pub fn parse_strict_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice::<Strict>(body)
        .map(|s| s.0)
        .map_err(|e| {
            let what = e.to_string();
            let what = what.split(" at line").next().unwrap_or("syntax error");
            ApiError::invalid_body(format!(
                "request body is not valid JSON: {what} (line {}, column {})",
                e.line(),
                e.column()
            ))
        })
}

fn unknown(field: &str) -> ApiError {
    ApiError::invalid(
        truncate(field),
        format!("unknown field {:?}", truncate(field)),
    )
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn parse_metadata(v: Option<&Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let obj = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be an object of strings",
            ));
        }
    };
    if obj.len() > MAX_METADATA_ENTRIES {
        return Err(ApiError::invalid(
            "metadata",
            format!("metadata has more than {MAX_METADATA_ENTRIES} entries"),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let param = format!("metadata.{}", truncate(k));
        if k.is_empty() || k.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(ApiError::invalid(
                param,
                format!("metadata keys must be 1 to {MAX_METADATA_KEY_CHARS} characters"),
            ));
        }
        let Value::String(s) = v else {
            return Err(ApiError::invalid(param, "metadata values must be strings"));
        };
        if s.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(ApiError::invalid(
                param,
                format!("metadata values must be at most {MAX_METADATA_VALUE_CHARS} characters"),
            ));
        }
        out.insert(k.clone(), s.clone());
    }
    Ok(out)
}

/// Checks a callback URL: absolute `https` (or `http` when private targets are allowed), a
/// host, no credentials, and, unless allowed, not a loopback, private or otherwise non-public
/// literal address. Names are checked again on the address actually connected to.
pub fn check_callback_url(raw: &str, allow_private: bool) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::invalid("callback_url", m.to_string());
    if raw.len() > MAX_CALLBACK_URL_CHARS {
        return Err(bad("callback_url is longer than 2048 characters"));
    }
    let url =
        url::Url::parse(raw).map_err(|_| bad("callback_url must be an absolute http(s) URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err(bad("callback_url must use https")),
        _ => return Err(bad("callback_url must be an absolute http(s) URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("callback_url must not contain credentials"));
    }
    let host = match url.host() {
        Some(h) => h,
        None => return Err(bad("callback_url must have a host")),
    };
    if !allow_private {
        let ip: Option<IpAddr> = match host {
            url::Host::Ipv4(a) => Some(a.into()),
            url::Host::Ipv6(a) => Some(a.into()),
            url::Host::Domain(d) if is_internal_name(d) => {
                return Err(bad("callback_url must point to a public address"));
            }
            url::Host::Domain(_) => None,
        };
        if ip.is_some_and(|ip| !crate::webhook::is_public(ip)) {
            return Err(bad("callback_url must point to a public address"));
        }
    }
    Ok(url.to_string())
}

/// Names only a local or internal resolver answers, refused without a lookup: single labels
/// (`vm`, `metadata`, found through /etc/hosts or search domains), `localhost` and the
/// special-use or internal suffixes. Any other name is checked on the addresses it resolves to
/// when the callback is sent.
fn is_internal_name(host: &str) -> bool {
    const SUFFIXES: &[&str] = &["localhost", "localdomain", "local", "internal", "arpa"];
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let last = name.rsplit('.').next().unwrap_or_default();
    !name.contains('.') || SUFFIXES.contains(&last)
}

/// Checks an `Idempotency-Key` header value.
pub fn check_idempotency_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_CHARS
        || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::builtin_registry;
    use serde_json::json;

    fn parse(body: &str) -> Result<SubmitRequest, ApiError> {
        parse_submit(
            body.as_bytes(),
            &builtin_registry(0.0),
            SubmitRules {
                allow_timeout: false,
                callback_allow_private: false,
            },
        )
    }

    fn param_of(body: &str) -> String {
        match parse(body) {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("{body} gave {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_is_accepted_with_defaults() {
        let r = parse(r#"{"model":"veo3","action":"generate","prompt":"A cat walking on the beach","duration":5}"#).unwrap();
        assert_eq!(r.duration, Some(5));
        let r = parse(r#"{"model":"veo3","prompt":"x"}"#).unwrap();
        assert_eq!((r.action.as_str(), r.duration), ("generate", Some(5)));
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(param_of(r#"{"prompt":"x"}"#), "model");
        assert_eq!(param_of(r#"{"model":"nope"}"#), "model");
        assert_eq!(param_of(r#"{"model":5}"#), "model");
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","action":"edit"}"#),
            "action"
        );
        assert_eq!(param_of(r#"{"model":"veo3"}"#), "prompt");
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","duration":21}"#),
            "duration"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","duration":0}"#),
            "duration"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","duration":2.5}"#),
            "duration"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","duration":"5"}"#),
            "duration"
        );
        assert_eq!(param_of(r#"{"model":"echo","duration":5}"#), "duration");
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","params":{"fps":99}}"#),
            "params.fps"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","params":{"bogus":1}}"#),
            "params.bogus"
        );
        assert_eq!(
            param_of(r#"{"model":"echo","metadata":{"a":1}}"#),
            "metadata.a"
        );
        assert_eq!(param_of(r#"{"model":"echo","colour":"red"}"#), "colour");
        assert_eq!(param_of(r#"{"model":"echo","timeout":3}"#), "timeout");
        let long = "x".repeat(2001);
        assert_eq!(
            param_of(&format!(r#"{{"model":"veo3","prompt":"{long}"}}"#)),
            "prompt"
        );
        let meta: Vec<String> = (0..17).map(|i| format!(r#""k{i}":"v""#)).collect();
        assert_eq!(
            param_of(&format!(
                r#"{{"model":"echo","metadata":{{{}}}}}"#,
                meta.join(",")
            )),
            "metadata"
        );
    }

    #[test]
    fn whole_numbers_with_a_zero_fraction_are_integers() {
        let r = parse(r#"{"model":"veo3","prompt":"x","duration":17.0,"params":{"fps":2e0,"seed":35912214.0}}"#).unwrap();
        assert_eq!(r.duration, Some(17));
        assert_eq!(r.params["fps"], json!(2));
        assert_eq!(r.params["seed"], json!(35912214));
        let same = parse(
            r#"{"model":"veo3","prompt":"x","duration":17,"params":{"fps":2,"seed":35912214}}"#,
        )
        .unwrap();
        assert_eq!(r.request_hash, same.request_hash);
        let r = parse(
            r#"{"model":"demo-image","prompt":"x","params":{"width":260.0,"height":-0.0e3}}"#,
        );
        assert!(
            matches!(&r, Err(ApiError::InvalidRequest { param: Some(p), .. }) if p == "params.height"),
            "{r:?}"
        );
        assert_eq!(
            parse(r#"{"model":"demo-image","prompt":"x","params":{"width":260.0}}"#)
                .unwrap()
                .params["width"],
            json!(260)
        );
        // Still refused: a fraction, and whole numbers beyond the parameter's range.
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","duration":17.5}"#),
            "duration"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","params":{"seed":9223372036854775808.0}}"#),
            "params.seed"
        );
        assert_eq!(
            param_of(r#"{"model":"veo3","prompt":"x","params":{"seed":1e300}}"#),
            "params.seed"
        );
    }

    #[test]
    fn callback_urls_must_be_public_https_unless_private_is_allowed() {
        for url in [
            "http://example.com/x",
            "https://127.0.0.1/x",
            "https://localhost/x",
            "https://10.1.2.3/",
            "https://[::1]/",
            "https://169.254.169.254/",
            "ftp://example.com/",
            "https://u:p@example.com/",
        ] {
            assert!(check_callback_url(url, false).is_err(), "{url} accepted");
        }
        assert!(check_callback_url("https://example.com/hook", false).is_ok());
        assert!(check_callback_url("https://[2606:4700:4700::1111]/hook", false).is_ok());
        assert!(check_callback_url("http://127.0.0.1:9/hook", true).is_ok());
    }

    #[test]
    fn numeric_encodings_of_private_addresses_are_refused() {
        for url in [
            "https://2130706433/",
            "https://017700000001/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://0x7f.1/",
            "https://127.1/",
            "https://10.1/",
            "https://0xa9.254.0251.0xfe/",
            "https://127.0.0.1./",
            "https://%31%32%37.0.0.1/",
            "https://\u{ff11}\u{ff12}\u{ff17}.0.0.1/",
            "https://0/",
            "https://[::ffff:7f00:1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[2002:a00:1::1]/",
            "https://[fd00:ec2::254]/",
        ] {
            assert!(check_callback_url(url, false).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn internal_names_are_refused_without_a_lookup() {
        for url in [
            "https://localhost./",
            "https://LOCALHOST/",
            "https://api.localhost/",
            "https://vm/",
            "https://metadata/computeMetadata/v1/",
            "https://metadata.google.internal/",
            "https://printer.local/",
            "https://localhost.localdomain/",
            "https://router.home.arpa/",
            "https://1.0.0.127.in-addr.arpa/",
        ] {
            assert!(check_callback_url(url, false).is_err(), "{url} accepted");
        }
        for url in ["https://hooks.example.com./x", "https://local.example.com/"] {
            assert!(check_callback_url(url, false).is_ok(), "{url} refused");
        }
    }

    #[test]
    fn the_accepted_url_is_the_normalized_form_the_sender_parses() {
        assert_eq!(
            check_callback_url("HTTPS://Example.COM:443/a/../hook", false).unwrap(),
            "https://example.com/hook"
        );
    }

    #[test]
    fn the_request_hash_ignores_key_order_and_timeout() {
        let rules = SubmitRules {
            allow_timeout: true,
            callback_allow_private: true,
        };
        let reg = builtin_registry(0.0);
        let a = parse_submit(br#"{"model":"echo","prompt":"a","timeout":3}"#, &reg, rules).unwrap();
        let b = parse_submit(br#"{"prompt":"a","model":"echo"}"#, &reg, rules).unwrap();
        let c = parse_submit(br#"{"prompt":"b","model":"echo"}"#, &reg, rules).unwrap();
        assert_eq!(a.request_hash, b.request_hash);
        assert_ne!(a.request_hash, c.request_hash);
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert_eq!(param_of(r#"{"model":"nope","model":"echo"}"#), "");
        assert_eq!(
            param_of(r#"{"model":"echo","params":{"sleep_ms":1,"sleep_ms":2}}"#),
            ""
        );
        assert!(parse(r#"{"model":"echo","metadata":{"a":"1","b":"1"}}"#).is_ok());
    }

    #[test]
    fn non_objects_and_broken_json_are_rejected() {
        for body in ["", "[]", "null", "{", "\"x\""] {
            assert!(
                matches!(parse(body), Err(ApiError::InvalidRequest { .. })),
                "{body}"
            );
        }
    }
}
