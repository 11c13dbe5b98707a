//! Log output for every runtime: one line per event on stdout, filtered by `RUST_LOG`
//! (default `info`), as text or JSON (`TASKLANE_LOG_FORMAT`).
//!
//! Text is coloured only when stdout is a terminal and `NO_COLOR` is unset, so a log written
//! to a file or a pipe carries no escape codes. JSON is the default inside AWS Lambda (an RFC
//! 3339 `timestamp` lets Lambda's JSON log format honour each line's level).

use std::io::IsTerminal;

use crate::config::ConfigError;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// `TASKLANE_LOG_FORMAT` (`text` or `json`); unset: JSON inside Lambda, text elsewhere.
    pub fn from_env() -> Result<LogFormat, ConfigError> {
        match std::env::var("TASKLANE_LOG_FORMAT") {
            Ok(v) if !v.trim().is_empty() => match v.trim().to_ascii_lowercase().as_str() {
                "text" => Ok(LogFormat::Text),
                "json" => Ok(LogFormat::Json),
                _ => Err(ConfigError(format!(
                    "TASKLANE_LOG_FORMAT={v:?} is not valid: use text or json"
                ))),
            },
            _ if std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some() => Ok(LogFormat::Json),
            _ => Ok(LogFormat::Text),
        }
    }
}

/// Whether text logs get colours: stdout is a terminal and `NO_COLOR` is unset or empty.
pub fn colours() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the process's log subscriber (once; later calls change nothing). An invalid
/// `TASKLANE_LOG_FORMAT` is an error naming the variable; `RUST_LOG` that does not parse
/// falls back to `info`.
pub fn init() -> Result<(), ConfigError> {
    let format = LogFormat::from_env()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_ansi(colours()).try_init(),
    };
    Ok(())
}

/// [`init`], or exits with status 2 and a message naming the variable (for a program's start).
pub fn init_or_exit() {
    if let Err(e) = init() {
        eprintln!("tasklane: {e}");
        std::process::exit(2);
    }
}
