//! The command line of `tasklane-admin`, as clap types: the commands with their options, the
//! backend options and `--json` (accepted before or after the command), and the value checks
//! that make a wrong amount, key or empty value a usage error (exit status 2) before anything
//! is touched.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The largest credit amount the stores hold (SQLite integers are signed 64-bit).
pub const MAX_CREDITS: u64 = i64::MAX as u64;

/// Bounds of a key given with `--key` (the API refuses keys longer than 256 characters).
const KEY_LEN: std::ops::RangeInclusive<usize> = 16..=256;

/// The synopsis shown after `Usage:` in the top-level help: every command with its options.
const SYNOPSIS: &str = "\
tasklane-admin create-account --credits N [--key KEY]  BACKEND [--json]
       tasklane-admin grant --account ACCOUNT_ID --credits N   BACKEND [--json]
       tasklane-admin show --account ACCOUNT_ID                BACKEND [--json]
       tasklane-admin rotate-key --account ACCOUNT_ID          BACKEND [--json]
       tasklane-admin revoke-key --account ACCOUNT_ID          BACKEND [--json]
       tasklane-admin shard --account ACCOUNT_ID --shards N    --dynamodb [--table NAME] [--json]";

/// Shown after the options in every help.
const AFTER_HELP: &str = "\
BACKEND is exactly one of --local [DIR] and --dynamodb [--table NAME]; it and --json
may come before or after the command.
Every option also accepts the --name=VALUE form.
Exit status: 0 done, 2 usage error (nothing was changed), 1 backend error or unknown account.";

/// tasklane-admin: manage tasklane accounts, credits and API keys
///
/// API keys are printed once, when created or rotated: the store keeps only their SHA-256.
#[derive(Debug, Parser)]
#[command(
    name = "tasklane-admin",
    version,
    override_usage = SYNOPSIS,
    after_help = AFTER_HELP,
    arg_required_else_help = true,
    // `--local create-account ...`: a command name after `--local` is the command, not DIR.
    subcommand_precedence_over_arg = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Print a JSON object on stdout (errors: a JSON object on stderr).
    #[arg(long, global = true, overrides_with = "json")]
    pub json: bool,

    /// Where the accounts are.
    #[command(flatten)]
    pub backend: BackendArgs,
}

/// The backend options, as given; [`crate::backend::Backend::choose`] checks that exactly one
/// backend is chosen and fills in the defaults.
#[derive(Debug, Args)]
#[command(next_help_heading = "Backend (exactly one)")]
pub struct BackendArgs {
    /// The local server's SQLite database, DIR/tasklane.db (also --local=DIR)
    ///
    /// DIR defaults to $TASKLANE_DATA_DIR, else ./.tasklane (as for the `tasklane`
    /// server, which may keep running meanwhile).
    #[arg(
        long,
        global = true,
        verbatim_doc_comment,
        value_name = "DIR",
        num_args = 0..=1,
        value_parser = directory
    )]
    pub local: Option<Option<PathBuf>>,

    /// The DynamoDB table named by --table NAME, else $TASKLANE_TABLE
    ///
    /// Region, credentials and endpoint come from the environment as for any AWS
    /// tool (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL, ...).
    #[arg(long, global = true, verbatim_doc_comment)]
    pub dynamodb: bool,

    /// The DynamoDB table (with --dynamodb only).
    #[arg(long, global = true, value_name = "NAME", value_parser = non_empty)]
    pub table: Option<String>,
}

/// The commands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Create an account holding N credits; print its id, API key and webhook secret
    ///
    /// The API key is shown this once: only its hash is stored. --key KEY uses KEY
    /// (16 to 256 visible ASCII characters) instead of a generated key.
    #[command(verbatim_doc_comment)]
    CreateAccount(CreateAccountArgs),
    /// Add N credits (at least 1) to an account; print the new balance
    Grant(GrantArgs),
    /// Print an account's id, credits, credits ever granted and creation time
    ///
    /// Never its key.
    Show(AccountArgs),
    /// Give an account a new API key, printed once; the old key stops working
    RotateKey(AccountArgs),
    /// Revoke an account's API key: requests with it answer 401
    ///
    /// Every request with the key answers 401 until rotate-key gives the account a
    /// new one. Its tasks and credits stay.
    #[command(verbatim_doc_comment)]
    RevokeKey(AccountArgs),
    /// Spread a busy account's balance over N DynamoDB items (1 to 64; only grows)
    ///
    /// One item takes about 250 submits and 250 task ends a second (its write limit),
    /// and concurrent transactions on it conflict; N items take N times that. The
    /// README's "One busy account" section says how to choose N. --dynamodb only: the
    /// local store writes one change at a time and has no per-item limit.
    #[command(verbatim_doc_comment)]
    Shard(ShardArgs),
}

impl Command {
    /// Whether the command creates an account (and so may create the local database).
    pub fn creates_account(&self) -> bool {
        matches!(self, Command::CreateAccount(_))
    }
}

/// The options of `create-account`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct CreateAccountArgs {
    /// The credits the account starts with (0 or more).
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = credits_from_0
    )]
    pub credits: u64,

    /// Use KEY (16 to 256 visible ASCII characters) instead of a generated key.
    #[arg(long, value_name = "KEY", value_parser = api_key)]
    pub key: Option<String>,
}

/// The options of `grant`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct GrantArgs {
    /// The account.
    #[arg(long, value_name = "ACCOUNT_ID", value_parser = non_empty)]
    pub account: String,

    /// The credits to add (at least 1).
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = credits_from_1
    )]
    pub credits: u64,
}

/// The options of `shard`.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ShardArgs {
    /// The account.
    #[arg(long, value_name = "ACCOUNT_ID", value_parser = non_empty)]
    pub account: String,

    /// How many items to spread it over (1 to 64, at least the current count).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub shards: u32,
}

/// The option of the commands that act on one account (`show`, `rotate-key`, `revoke-key`).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AccountArgs {
    /// The account.
    #[arg(long, value_name = "ACCOUNT_ID", value_parser = non_empty)]
    pub account: String,
}

/// A value that is not empty or blank (kept as given).
fn non_empty(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        return Err("needs a non-empty value".to_string());
    }
    Ok(raw.to_string())
}

/// The directory of `--local=DIR`, which must not be empty.
fn directory(raw: &str) -> Result<PathBuf, String> {
    if raw.is_empty() {
        return Err("needs a directory".to_string());
    }
    Ok(PathBuf::from(raw))
}

fn credits(raw: &str, min: u64) -> Result<u64, String> {
    let n: u64 = raw
        .trim()
        .parse()
        .map_err(|_| "not a whole number of credits".to_string())?;
    if n < min {
        return Err(format!("must be at least {min}"));
    }
    if n > MAX_CREDITS {
        return Err(format!("must be at most {MAX_CREDITS}"));
    }
    Ok(n)
}

fn credits_from_0(raw: &str) -> Result<u64, String> {
    credits(raw, 0)
}

fn credits_from_1(raw: &str) -> Result<u64, String> {
    credits(raw, 1)
}

/// A key given with `--key`: 16 to 256 visible ASCII characters.
fn api_key(raw: &str) -> Result<String, String> {
    if !KEY_LEN.contains(&raw.len()) || !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "must be {} to {} visible ASCII characters without spaces",
            KEY_LEN.start(),
            KEY_LEN.end()
        ));
    }
    Ok(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(s: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tasklane-admin").chain(s.split_whitespace()))
    }

    fn run_of(s: &str) -> Cli {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn usage_of(s: &str) -> String {
        match parse(s) {
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{s}: {e}");
                e.render().to_string()
            }
            Ok(cli) => panic!("{s}: {cli:?}"),
        }
    }

    fn account(id: &str) -> AccountArgs {
        AccountArgs { account: id.into() }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn local_takes_an_optional_directory() {
        let cli = run_of("--local show --account a");
        assert_eq!(cli.command, Command::Show(account("a")));
        assert_eq!(cli.backend.local, Some(None));
        let cli = run_of("show --local /d --account a");
        assert_eq!(cli.backend.local, Some(Some("/d".into())));
        let cli = run_of("show --account a --local=show --json");
        assert_eq!(cli.backend.local, Some(Some("show".into())));
        assert!(cli.json);
        let cli = run_of("--json show --account a --local --json");
        assert_eq!(cli.backend.local, Some(None));
        assert!(cli.json);
        let cli = run_of("--local /d create-account --credits=5 --key 0123456789abcdef");
        assert_eq!(
            cli.command,
            Command::CreateAccount(CreateAccountArgs {
                credits: 5,
                key: Some("0123456789abcdef".into())
            })
        );
        let cli = run_of("--dynamodb --table t revoke-key --account a");
        assert_eq!(cli.command, Command::RevokeKey(account("a")));
        assert!(cli.backend.dynamodb);
        assert_eq!(cli.backend.table.as_deref(), Some("t"));
    }

    #[test]
    fn usage_errors_name_what_is_wrong() {
        assert!(usage_of("grant --local /d --account a").contains("--credits"));
        assert!(usage_of("grant --local /d --credits 0 --account a").contains("at least 1"));
        assert!(usage_of("grant --local /d --credits -4 --account a").contains("--credits"));
        assert!(usage_of("show --local /d --account a --credits 3").contains("--credits"));
        assert!(usage_of("show --local /d --account a --account b").contains("--account"));
        assert!(
            usage_of("show --local /d --dynamodb --dynamodb --account a").contains("--dynamodb")
        );
        assert!(usage_of("create-account --local /d --credits 1 --key short").contains("--key"));
        assert!(
            usage_of("create-account --local /d --credits 9223372036854775808").contains("at most")
        );
        assert!(usage_of("frob --local /d").contains("frob"));
        assert!(usage_of("show --local /d --account a extra").contains("extra"));
        assert!(usage_of("--local /d").contains("subcommand"));
        assert!(usage_of("show --local /d --account").contains("--account"));
        assert!(usage_of("show --local= --account a").contains("--local"));
        assert!(usage_of("show --local /d --json=yes --account a").contains("--json"));
    }
}
