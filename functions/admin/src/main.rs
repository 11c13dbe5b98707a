//! `tasklane-admin`: creates accounts, grants credits, shows balances and rotates API keys, on
//! the local server's SQLite database (`--local`) or on the DynamoDB table (`--dynamodb`).
//!
//! API keys are printed once, when created or rotated; the store keeps only their SHA-256.
//! Exit codes: 0 done, 2 usage error (nothing was touched), 1 backend error or unknown account.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tasklane_aws::dynamo::DynamoStore;
use tasklane_core::account::{Account, generate_api_key, hash_api_key};
use tasklane_core::ports::{PortError, TaskStore};
use tasklane_local::sqlite::{Db, SqliteStore};

const USAGE: &str = "\
tasklane-admin: manage tasklane accounts, credits and API keys

Usage:
  tasklane-admin create-account --credits N [--key KEY]  BACKEND [--json]
  tasklane-admin grant --account ACCOUNT_ID --credits N   BACKEND [--json]
  tasklane-admin show --account ACCOUNT_ID                BACKEND [--json]
  tasklane-admin rotate-key --account ACCOUNT_ID          BACKEND [--json]
  tasklane-admin revoke-key --account ACCOUNT_ID          BACKEND [--json]

Commands:
  create-account  Create an account holding N credits. Prints its id, its API key and its
                  webhook secret. The key is shown this once: only its hash is stored.
                  --key KEY uses KEY (16 to 256 visible ASCII characters) instead of a
                  generated key.
  grant           Add N credits (at least 1) to an account; prints the new balance.
  show            Print an account's id, credits, credits ever granted and creation time
                  (never its key).
  rotate-key      Give an account a new API key, printed once; the old key stops working.
  revoke-key      Revoke an account's API key: every request with it answers 401 until
                  rotate-key gives the account a new one. Its tasks and credits stay.

BACKEND (exactly one):
  --local [DIR]   The local server's SQLite database, DIR/tasklane.db. DIR defaults to
                  $TASKLANE_DATA_DIR, else ./.tasklane (as for the `tasklane` server, which
                  may keep running meanwhile). Also --local=DIR.
  --dynamodb      The DynamoDB table named by --table NAME, else $TASKLANE_TABLE. Region,
                  credentials and endpoint come from the environment as for any AWS tool
                  (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL, ...).

Options:
  --json          Print a JSON object on stdout (errors: a JSON object on stderr).
  -h, --help      Print this help.
  --version       Print the version.

Every option also accepts the --name=VALUE form.
Exit status: 0 done, 2 usage error (nothing was changed), 1 backend error or unknown account.
";

/// The largest credit amount the stores hold (SQLite integers are signed 64-bit).
const MAX_CREDITS: u64 = i64::MAX as u64;
/// Bounds of a key given with `--key` (the API refuses keys longer than 256 characters).
const KEY_LEN: std::ops::RangeInclusive<usize> = 16..=256;

/// What went wrong, and so which exit code and error code to report.
#[derive(Debug)]
enum Failure {
    /// The command line is wrong; nothing was attempted.
    Usage(String),
    /// The account does not exist.
    NotFound(String),
    /// The backend could not be opened or refused the operation.
    Backend(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::NotFound(_) | Failure::Backend(_) => 1,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Failure::Usage(_) => "usage",
            Failure::NotFound(_) => "not_found",
            Failure::Backend(_) => "backend",
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::NotFound(m) | Failure::Backend(m) => m,
        }
    }
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    CreateAccount { credits: u64, key: Option<String> },
    Grant { account: String, credits: u64 },
    Show { account: String },
    RotateKey { account: String },
    RevokeKey { account: String },
}

const COMMANDS: [&str; 5] = [
    "create-account",
    "grant",
    "show",
    "rotate-key",
    "revoke-key",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    /// The data directory holding `tasklane.db`.
    Local(PathBuf),
    /// The table name.
    Dynamo(String),
}

#[derive(Debug)]
struct Invocation {
    command: Command,
    backend: Backend,
    json: bool,
}

#[derive(Debug)]
enum Parsed {
    Run(Invocation),
    Help,
    Version,
}

/// Options as they appear on the command line, before checking what each command accepts.
#[derive(Default)]
struct Raw {
    command: Option<String>,
    local: Option<Option<String>>,
    dynamodb: bool,
    table: Option<String>,
    credits: Option<String>,
    key: Option<String>,
    account: Option<String>,
    json: bool,
}

fn set_once(slot: &mut Option<String>, name: &str, value: String) -> Result<(), Failure> {
    if slot.is_some() {
        return Err(usage(format!("{name} is given more than once")));
    }
    *slot = Some(value);
    Ok(())
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn parse_credits(raw: &str, min: u64) -> Result<u64, Failure> {
    let n: u64 = raw.trim().parse().map_err(|_| {
        usage(format!(
            "--credits {raw:?} is not a whole number of credits"
        ))
    })?;
    if n < min {
        return Err(usage(format!("--credits must be at least {min}")));
    }
    if n > MAX_CREDITS {
        return Err(usage(format!("--credits must be at most {MAX_CREDITS}")));
    }
    Ok(n)
}

fn check_key(key: &str) -> Result<(), Failure> {
    if !KEY_LEN.contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(usage(format!(
            "--key must be {} to {} visible ASCII characters without spaces",
            KEY_LEN.start(),
            KEY_LEN.end()
        )));
    }
    Ok(())
}

/// Parses the arguments (without the program name).
fn parse(args: Vec<String>) -> Result<Parsed, Failure> {
    let mut raw = Raw::default();
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let no_value = |inline: &Option<String>| match inline {
            Some(_) => Err(usage(format!("{name} takes no value"))),
            None => Ok(()),
        };
        match name.as_str() {
            "-h" | "--help" | "help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--json" => {
                no_value(&inline)?;
                raw.json = true;
            }
            "--dynamodb" => {
                no_value(&inline)?;
                if raw.dynamodb {
                    return Err(usage("--dynamodb is given more than once"));
                }
                raw.dynamodb = true;
            }
            "--local" => {
                if raw.local.is_some() {
                    return Err(usage("--local is given more than once"));
                }
                // An optional value: the next argument is the directory unless it is an
                // option, or the command when none has been seen yet.
                let dir = match inline {
                    Some(v) if v.is_empty() => return Err(usage("--local= needs a directory")),
                    Some(v) => Some(v),
                    None => args.next_if(|next| {
                        let is_command = raw.command.is_none() && COMMANDS.contains(&next.as_str());
                        !next.starts_with('-') && !is_command
                    }),
                };
                raw.local = Some(dir);
            }
            "--table" | "--credits" | "--key" | "--account" => {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next_if(|next| !next.starts_with("--"))
                        .ok_or_else(|| usage(format!("{name} needs a value")))?,
                };
                if value.trim().is_empty() {
                    return Err(usage(format!("{name} needs a non-empty value")));
                }
                let slot = match name.as_str() {
                    "--table" => &mut raw.table,
                    "--credits" => &mut raw.credits,
                    "--key" => &mut raw.key,
                    _ => &mut raw.account,
                };
                set_once(slot, &name, value)?;
            }
            other if other.starts_with('-') => {
                return Err(usage(format!("unknown option {other}")));
            }
            other => {
                if let Some(cmd) = &raw.command {
                    return Err(usage(format!(
                        "unexpected argument {other:?} after the command {cmd}"
                    )));
                }
                if !COMMANDS.contains(&other) {
                    return Err(usage(format!(
                        "unknown command {other:?} (commands: {})",
                        COMMANDS.join(", ")
                    )));
                }
                raw.command = Some(other.to_string());
            }
        }
    }
    let command = command(&mut raw)?;
    let backend = backend(&raw)?;
    Ok(Parsed::Run(Invocation {
        command,
        backend,
        json: raw.json,
    }))
}

/// Checks the options the command needs and refuses those it does not take.
fn command(raw: &mut Raw) -> Result<Command, Failure> {
    let Some(name) = raw.command.clone() else {
        return Err(usage(format!(
            "no command given (commands: {})",
            COMMANDS.join(", ")
        )));
    };
    let refuse = |present: bool, option: &str| {
        if present {
            Err(usage(format!("{name} does not take {option}")))
        } else {
            Ok(())
        }
    };
    let need = |value: Option<String>, option: &str| {
        value.ok_or_else(|| usage(format!("{name} needs {option}")))
    };
    match name.as_str() {
        "create-account" => {
            refuse(raw.account.is_some(), "--account")?;
            let credits = parse_credits(&need(raw.credits.take(), "--credits N")?, 0)?;
            let key = raw.key.take();
            if let Some(k) = &key {
                check_key(k)?;
            }
            Ok(Command::CreateAccount { credits, key })
        }
        "grant" => {
            refuse(raw.key.is_some(), "--key")?;
            let account = need(raw.account.take(), "--account ACCOUNT_ID")?;
            let credits = parse_credits(&need(raw.credits.take(), "--credits N")?, 1)?;
            Ok(Command::Grant { account, credits })
        }
        _ => {
            refuse(raw.key.is_some(), "--key")?;
            refuse(raw.credits.is_some(), "--credits")?;
            let account = need(raw.account.take(), "--account ACCOUNT_ID")?;
            Ok(match name.as_str() {
                "show" => Command::Show { account },
                "revoke-key" => Command::RevokeKey { account },
                _ => Command::RotateKey { account },
            })
        }
    }
}

/// Picks the backend: exactly one of `--local` and `--dynamodb`.
fn backend(raw: &Raw) -> Result<Backend, Failure> {
    match (&raw.local, raw.dynamodb) {
        (Some(_), true) => Err(usage(
            "choose one backend: --local [DIR] or --dynamodb, not both",
        )),
        (None, false) => Err(usage(
            "no backend chosen: pass --local [DIR] (the local server's SQLite database) or --dynamodb (the DynamoDB table)",
        )),
        (Some(dir), false) => {
            if raw.table.is_some() {
                return Err(usage("--table only applies with --dynamodb"));
            }
            let dir = dir
                .clone()
                .or_else(|| {
                    std::env::var("TASKLANE_DATA_DIR")
                        .ok()
                        .filter(|d| !d.is_empty())
                })
                .unwrap_or_else(|| ".tasklane".to_string());
            Ok(Backend::Local(PathBuf::from(dir)))
        }
        (None, true) => raw
            .table
            .clone()
            .or_else(|| env_nonempty("TASKLANE_TABLE"))
            .map(Backend::Dynamo)
            .ok_or_else(|| {
                usage("--dynamodb needs a table: pass --table NAME or set TASKLANE_TABLE")
            }),
    }
}

/// An opened store and how to name it in messages.
struct Opened {
    store: Arc<dyn TaskStore>,
    name: String,
    dynamodb: bool,
}

async fn open(backend: &Backend, creating: bool) -> Result<Opened, Failure> {
    match backend {
        Backend::Local(dir) => {
            let path = dir.join("tasklane.db");
            let name = format!("the SQLite database {}", path.display());
            if creating {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Failure::Backend(format!(
                        "cannot create the data directory {}: {e}",
                        dir.display()
                    ))
                })?;
            } else if !path.is_file() {
                return Err(Failure::Backend(format!(
                    "no tasklane database at {} (the local server creates it on its first start, \
                     as does create-account; check --local DIR or TASKLANE_DATA_DIR)",
                    path.display()
                )));
            }
            let db = Db::open(&path)
                .map_err(|e| Failure::Backend(format!("cannot open {name}: {e:#}")))?;
            Ok(Opened {
                store: Arc::new(SqliteStore::new(db)),
                name,
                dynamodb: false,
            })
        }
        Backend::Dynamo(table) => {
            let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let Some(region) = config.region() else {
                return Err(Failure::Backend(
                    "no AWS region configured: set AWS_REGION (or a region in the AWS profile)"
                        .to_string(),
                ));
            };
            let name = format!("the DynamoDB table {table:?} (region {region})");
            Ok(Opened {
                store: Arc::new(DynamoStore::new(
                    aws_sdk_dynamodb::Client::new(&config),
                    table.clone(),
                )),
                name,
                dynamodb: true,
            })
        }
    }
}

/// The error and every cause under it, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Drops the `(Variant(...))` debug dump the AWS SDK's error context appends to its message.
fn without_debug_dump(detail: String) -> String {
    if !detail.ends_with(')') {
        return detail;
    }
    let mut from = 0;
    while let Some(i) = detail[from..].find(" (").map(|i| i + from) {
        let rest = &detail[i + 2..];
        let ident = rest
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(rest.len());
        if ident > 0
            && rest.starts_with(|c: char| c.is_ascii_uppercase())
            && (rest[ident..].starts_with('(') || rest[ident..].starts_with(" {"))
        {
            return detail[..i].to_string();
        }
        from = i + 2;
    }
    detail
}

impl Opened {
    fn failure(&self, e: PortError, doing: &str, account: Option<&str>) -> Failure {
        if let (PortError::NotFound, Some(id)) = (&e, account) {
            return self.unknown(id);
        }
        let detail = without_debug_dump(chain(&e));
        if self.dynamodb && detail.contains("ResourceNotFoundException") {
            return Failure::Backend(format!(
                "{doing}: {} does not exist (check --table or TASKLANE_TABLE, the region and AWS_ENDPOINT_URL)",
                self.name
            ));
        }
        Failure::Backend(format!("{doing} in {}: {detail}", self.name))
    }

    fn unknown(&self, account: &str) -> Failure {
        Failure::NotFound(format!("no account {account:?} in {}", self.name))
    }

    async fn existing(&self, account: &str) -> Result<Account, Failure> {
        self.store
            .account(account)
            .await
            .map_err(|e| self.failure(e, "reading the account", Some(account)))?
            .ok_or_else(|| self.unknown(account))
    }
}

/// What a command prints: ordered fields, and a note for people (stderr, not with `--json`).
struct Report {
    fields: Vec<(&'static str, Value)>,
    note: Option<&'static str>,
}

fn account_fields(a: &Account) -> Vec<(&'static str, Value)> {
    vec![
        ("account_id", json!(a.id)),
        ("credits", json!(a.credits)),
        ("granted", json!(a.granted)),
        ("created_at", json!(a.created_at.to_rfc3339())),
    ]
}

async fn run(inv: &Invocation) -> Result<Report, Failure> {
    let creating = matches!(inv.command, Command::CreateAccount { .. });
    let opened = open(&inv.backend, creating).await?;
    let store = &opened.store;
    match &inv.command {
        Command::CreateAccount { credits, key } => {
            if let Some(k) = key {
                let taken = store
                    .account_by_key_hash(&hash_api_key(k))
                    .await
                    .map_err(|e| opened.failure(e, "checking the key", None))?;
                if taken.is_some() {
                    return Err(Failure::Backend(format!(
                        "another account in {} already uses this key; choose another --key or leave it out",
                        opened.name
                    )));
                }
            }
            let new = Account::create(*credits, key.clone());
            store
                .create_account(&new.account)
                .await
                .map_err(|e| opened.failure(e, "creating the account", None))?;
            let a = &new.account;
            Ok(Report {
                fields: vec![
                    ("account_id", json!(a.id)),
                    ("api_key", json!(new.api_key)),
                    ("webhook_secret", json!(a.webhook_secret)),
                    ("credits", json!(a.credits)),
                    ("granted", json!(a.granted)),
                    ("created_at", json!(a.created_at.to_rfc3339())),
                ],
                note: Some(
                    "Keep the API key now: it is not shown again (only its hash is stored).",
                ),
            })
        }
        Command::Grant { account, credits } => {
            let current = opened.existing(account).await?;
            if current.granted.saturating_add(*credits) > MAX_CREDITS {
                return Err(Failure::Backend(format!(
                    "granting {credits} would take account {account:?} past {MAX_CREDITS} credits granted in all"
                )));
            }
            let a = store
                .grant_credits(account, *credits)
                .await
                .map_err(|e| opened.failure(e, "granting credits", Some(account)))?;
            Ok(Report {
                fields: account_fields(&a),
                note: None,
            })
        }
        Command::Show { account } => Ok(Report {
            fields: account_fields(&opened.existing(account).await?),
            note: None,
        }),
        Command::RotateKey { account } => {
            let key = generate_api_key();
            store
                .set_key_hash(account, &hash_api_key(&key))
                .await
                .map_err(|e| opened.failure(e, "replacing the key", Some(account)))?;
            Ok(Report {
                fields: vec![("account_id", json!(account)), ("api_key", json!(key))],
                note: Some(
                    "The old key no longer works. Keep the new one now: it is not shown again.",
                ),
            })
        }
        Command::RevokeKey { account } => {
            // No key hashes to this value (it is not 64 hex digits), so no key matches it.
            let revoked = format!("revoked:{}", generate_api_key());
            store
                .set_key_hash(account, &revoked)
                .await
                .map_err(|e| opened.failure(e, "revoking the key", Some(account)))?;
            Ok(Report {
                fields: vec![("account_id", json!(account)), ("key_revoked", json!(true))],
                note: Some("The key no longer works; `rotate-key` issues a new one."),
            })
        }
    }
}

fn render(report: &Report, as_json: bool) -> String {
    if as_json {
        let map: Map<String, Value> = report
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        return format!("{}\n", Value::Object(map));
    }
    let width = report
        .fields
        .iter()
        .map(|(k, _)| k.len())
        .max()
        .unwrap_or(0)
        + 1;
    report
        .fields
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

fn report_failure(f: &Failure, as_json: bool) -> ExitCode {
    let text = if as_json {
        json!({"error": {"code": f.code(), "message": f.message()}}).to_string()
    } else if matches!(f, Failure::Usage(_)) {
        format!(
            "tasklane-admin: {}\nRun `tasklane-admin --help` for usage.",
            f.message()
        )
    } else {
        format!("tasklane-admin: {}", f.message())
    };
    let _ = writeln!(std::io::stderr(), "{text}");
    ExitCode::from(f.exit_code())
}

fn main() -> ExitCode {
    let args: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(a) => a,
        Err(bad) => {
            return report_failure(
                &usage(format!("argument {bad:?} is not valid UTF-8")),
                false,
            );
        }
    };
    if args.is_empty() {
        let _ = std::io::stderr().write_all(USAGE.as_bytes());
        return ExitCode::from(2);
    }
    let as_json = args.iter().any(|a| a == "--json");
    let inv = match parse(args) {
        Ok(Parsed::Run(inv)) => inv,
        Ok(Parsed::Help) => {
            let _ = std::io::stdout().write_all(USAGE.as_bytes());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            let _ = writeln!(
                std::io::stdout(),
                "tasklane-admin {}",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Err(f) => return report_failure(&f, as_json),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return report_failure(
                &Failure::Backend(format!("cannot start the async runtime: {e}")),
                inv.json,
            );
        }
    };
    let report = match runtime.block_on(run(&inv)) {
        Ok(r) => r,
        Err(f) => return report_failure(&f, inv.json),
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(render(&report, inv.json).as_bytes())
        .and_then(|()| out.flush())
    {
        return report_failure(
            &Failure::Backend(format!(
                "the change was made, but writing the result failed: {e}"
            )),
            inv.json,
        );
    }
    if let (Some(note), false) = (report.note, inv.json) {
        let _ = writeln!(std::io::stderr(), "{note}");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn run_of(s: &str) -> Invocation {
        match parse(args(s)) {
            Ok(Parsed::Run(inv)) => inv,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn usage_of(s: &str) -> String {
        match parse(args(s)) {
            Err(Failure::Usage(m)) => m,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn local_takes_an_optional_directory() {
        let inv = run_of("--local show --account a");
        assert_eq!(
            inv.command,
            Command::Show {
                account: "a".into()
            }
        );
        let inv = run_of("show --local /d --account a");
        assert_eq!(inv.backend, Backend::Local("/d".into()));
        let inv = run_of("show --account a --local=show --json");
        assert_eq!(inv.backend, Backend::Local("show".into()));
        assert!(inv.json);
        let inv = run_of("--local /d create-account --credits=5 --key 0123456789abcdef");
        assert_eq!(
            inv.command,
            Command::CreateAccount {
                credits: 5,
                key: Some("0123456789abcdef".into())
            }
        );
    }

    #[test]
    fn sdk_debug_dumps_are_dropped() {
        assert_eq!(
            without_debug_dump("dispatch failure: io error (os error 111) (DispatchFailure(DispatchFailure { x }))".into()),
            "dispatch failure: io error (os error 111)"
        );
        assert_eq!(without_debug_dump("a (b) c".into()), "a (b) c");
        assert_eq!(
            without_debug_dump("database is locked".into()),
            "database is locked"
        );
    }

    #[test]
    fn usage_errors_name_what_is_wrong() {
        assert!(usage_of("grant --local /d --account a").contains("--credits"));
        assert!(usage_of("grant --local /d --credits 0 --account a").contains("at least 1"));
        assert!(usage_of("show --local /d --account a --credits 3").contains("--credits"));
        assert!(usage_of("show --local /d --dynamodb --account a").contains("not both"));
        assert!(usage_of("show --account a").contains("--dynamodb"));
        assert!(usage_of("show --local /d --table t --account a").contains("--table"));
        assert!(usage_of("show --local /d --account a --account b").contains("more than once"));
        assert!(usage_of("create-account --local /d --credits 1 --key short").contains("--key"));
        assert!(
            usage_of("create-account --local /d --credits 9223372036854775808").contains("at most")
        );
        assert!(usage_of("frob --local /d").contains("unknown command"));
        assert!(usage_of("show --local /d --account a extra").contains("unexpected"));
        assert!(usage_of("--local /d").contains("no command"));
        assert!(usage_of("show --local /d --account").contains("needs a value"));
    }
}
