//! `show`: prints an account's id, credits, credits ever granted and creation time (never its
//! key).

use crate::backend::Opened;
use crate::cli::AccountArgs;
use crate::failure::Failure;
use crate::report::Report;

/// Reads the account.
pub async fn run(args: &AccountArgs, opened: &Opened) -> Result<Report, Failure> {
    Ok(Report::account(&opened.existing(&args.account).await?))
}
