//! The store the commands work on: the local server's SQLite database or the DynamoDB table.
//! [`Backend::choose`] turns the backend options into one backend (or a usage error),
//! [`open`] opens it, and [`Opened`] turns the store's errors into [`Failure`]s that name it.

use std::path::PathBuf;
use std::sync::Arc;

use clap::CommandFactory;
use clap::error::ErrorKind;
use tasklane_aws::dynamo::DynamoStore;
use tasklane_core::account::Account;
use tasklane_core::ports::{PortError, TaskStore};
use tasklane_local::sqlite::{Db, SqliteStore};

use crate::cli::{BackendArgs, Cli};
use crate::failure::Failure;

/// The chosen backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The local server's SQLite database: the data directory holding `tasklane.db`.
    Local(PathBuf),
    /// The DynamoDB table, by name.
    Dynamo(String),
}

impl Backend {
    /// Picks the backend: exactly one of `--local` and `--dynamodb`. The data directory
    /// defaults to `$TASKLANE_DATA_DIR`, else `.tasklane`; the table to `$TASKLANE_TABLE`.
    pub fn choose(args: &BackendArgs) -> Result<Backend, clap::Error> {
        let usage = |kind: ErrorKind, message: &str| Cli::command().error(kind, message);
        match (&args.local, args.dynamodb) {
            (Some(_), true) => Err(usage(
                ErrorKind::ArgumentConflict,
                "choose one backend: --local [DIR] or --dynamodb, not both",
            )),
            (None, false) => Err(usage(
                ErrorKind::MissingRequiredArgument,
                "no backend chosen: pass --local [DIR] (the local server's SQLite database) or --dynamodb (the DynamoDB table)",
            )),
            (Some(dir), false) => {
                if args.table.is_some() {
                    return Err(usage(
                        ErrorKind::ArgumentConflict,
                        "--table only applies with --dynamodb",
                    ));
                }
                let dir = dir.clone().unwrap_or_else(|| {
                    std::env::var("TASKLANE_DATA_DIR")
                        .ok()
                        .filter(|d| !d.is_empty())
                        .unwrap_or_else(|| ".tasklane".to_string())
                        .into()
                });
                Ok(Backend::Local(dir))
            }
            (None, true) => args
                .table
                .clone()
                .or_else(|| env_nonempty("TASKLANE_TABLE"))
                .map(Backend::Dynamo)
                .ok_or_else(|| {
                    usage(
                        ErrorKind::MissingRequiredArgument,
                        "--dynamodb needs a table: pass --table NAME or set TASKLANE_TABLE",
                    )
                }),
        }
    }
}

/// The variable's value, trimmed, unless it is unset or blank.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// An opened store and how to name it in messages.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn TaskStore>,
    /// The store as messages name it, e.g. `the SQLite database DIR/tasklane.db`.
    pub name: String,
    dynamodb: bool,
    /// The DynamoDB store itself, for what only it does (spreading a busy account).
    pub dynamo: Option<Arc<DynamoStore>>,
}

/// Opens the backend. Only a command that creates an account (`creating`) creates the local
/// data directory and database; the others fail when the database does not exist.
pub async fn open(backend: &Backend, creating: bool) -> Result<Opened, Failure> {
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
                dynamo: None,
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
            let store = Arc::new(DynamoStore::new(
                aws_sdk_dynamodb::Client::new(&config),
                table.clone(),
            ));
            Ok(Opened {
                store: store.clone(),
                name,
                dynamodb: true,
                dynamo: Some(store),
            })
        }
    }
}

impl Opened {
    /// The failure for a store error met while `doing` something, to `account` if one is
    /// concerned: an unknown account is [`Failure::NotFound`], a missing DynamoDB table is
    /// said so, anything else is [`Failure::Backend`] with the error and its causes.
    pub fn failure(&self, e: PortError, doing: &str, account: Option<&str>) -> Failure {
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

    /// The failure for an account that does not exist.
    pub fn unknown(&self, account: &str) -> Failure {
        Failure::NotFound(format!("no account {account:?} in {}", self.name))
    }

    /// The account, which must exist.
    pub async fn existing(&self, account: &str) -> Result<Account, Failure> {
        self.store
            .account(account)
            .await
            .map_err(|e| self.failure(e, "reading the account", Some(account)))?
            .ok_or_else(|| self.unknown(account))
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn choose(s: &str) -> Result<Backend, String> {
        let cli =
            Cli::try_parse_from(std::iter::once("tasklane-admin").chain(s.split_whitespace()))
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        Backend::choose(&cli.backend).map_err(|e| {
            assert_eq!(e.exit_code(), 2, "{s}: {e}");
            e.render().to_string()
        })
    }

    #[test]
    fn exactly_one_backend() {
        assert_eq!(
            choose("show --local /d --account a"),
            Ok(Backend::Local("/d".into()))
        );
        assert_eq!(
            choose("show --dynamodb --table t --account a"),
            Ok(Backend::Dynamo("t".into()))
        );
        assert!(
            choose("show --local /d --dynamodb --account a")
                .unwrap_err()
                .contains("not both")
        );
        assert!(
            choose("show --account a")
                .unwrap_err()
                .contains("--dynamodb")
        );
        assert!(
            choose("show --local /d --table t --account a")
                .unwrap_err()
                .contains("--table")
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
}
