//! What a command prints: ordered fields on stdout (as `name: value` lines, or one JSON object
//! with `--json`), and a note for people on stderr (not with `--json`).

use serde_json::{Map, Value, json};
use tasklane_core::account::Account;

/// A command's result.
pub struct Report {
    /// The fields, in the order they are printed.
    pub fields: Vec<(&'static str, Value)>,
    /// A note for people, printed on stderr after the fields unless `--json`.
    pub note: Option<&'static str>,
}

impl Report {
    /// The fields of an account as `show` and `grant` print them (never its key).
    pub fn account(a: &Account) -> Report {
        Report {
            fields: vec![
                ("account_id", json!(a.id)),
                ("credits", json!(a.credits)),
                ("granted", json!(a.granted)),
                ("created_at", json!(a.created_at.to_rfc3339())),
            ],
            note: None,
        }
    }

    /// The text for stdout: one JSON object when `as_json`, else one aligned `name: value`
    /// line per field.
    pub fn render(&self, as_json: bool) -> String {
        if as_json {
            let map: Map<String, Value> = self
                .fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            return format!("{}\n", Value::Object(map));
        }
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        self.fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!("{:<width$} {v}\n", format!("{k}:"))
            })
            .collect()
    }
}
