//! What can go wrong, the exit status and error code of each, and how a failure is reported
//! on stderr: clap's message for a usage error, one `tasklane-admin: ...` line otherwise, or a
//! JSON object `{"error": {"code", "message"}}` with `--json`.

use std::io::Write;
use std::process::ExitCode;

use serde_json::json;

/// What went wrong, and so which exit status and error code to report.
#[derive(Debug)]
pub enum Failure {
    /// The command line is wrong; nothing was attempted (exit status 2).
    Usage(clap::Error),
    /// The account does not exist (exit status 1).
    NotFound(String),
    /// The backend could not be opened or refused the operation (exit status 1).
    Backend(String),
}

impl Failure {
    /// The exit status: 2 for a usage error, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::NotFound(_) | Failure::Backend(_) => 1,
        }
    }

    /// The error code in the JSON report.
    pub fn code(&self) -> &'static str {
        match self {
            Failure::Usage(_) => "usage",
            Failure::NotFound(_) => "not_found",
            Failure::Backend(_) => "backend",
        }
    }

    /// The message alone: for a usage error, clap's message without its `error: ` prefix,
    /// usage and tips.
    pub fn message(&self) -> String {
        match self {
            Failure::Usage(e) => {
                let text = e.render().to_string();
                let text = text.strip_prefix("error: ").unwrap_or(&text);
                text.split("\n\n")
                    .next()
                    .unwrap_or_default()
                    .trim_end()
                    .to_string()
            }
            Failure::NotFound(m) | Failure::Backend(m) => m.clone(),
        }
    }

    /// Prints the failure on stderr, as JSON when `as_json`, and gives the exit status.
    pub fn report(&self, as_json: bool) -> ExitCode {
        if as_json {
            let text = json!({"error": {"code": self.code(), "message": self.message()}});
            let _ = writeln!(std::io::stderr(), "{text}");
        } else if let Failure::Usage(e) = self {
            // Usage errors go to stderr; with the usage line and the pointer to --help.
            let _ = e.print();
        } else {
            let _ = writeln!(std::io::stderr(), "tasklane-admin: {}", self.message());
        }
        ExitCode::from(self.exit_code())
    }
}
