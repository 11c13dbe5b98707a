//! `grant`: adds N credits to an account and prints its new balance.

use crate::backend::Opened;
use crate::cli::{GrantArgs, MAX_CREDITS};
use crate::failure::Failure;
use crate::report::Report;

/// Adds the credits; refuses a grant that would take the credits ever granted past
/// [`MAX_CREDITS`].
pub async fn run(args: &GrantArgs, opened: &Opened) -> Result<Report, Failure> {
    let GrantArgs { account, credits } = args;
    let current = opened.existing(account).await?;
    if current.granted.saturating_add(*credits) > MAX_CREDITS {
        return Err(Failure::Backend(format!(
            "granting {credits} would take account {account:?} past {MAX_CREDITS} credits granted in all"
        )));
    }
    let a = opened
        .store
        .grant_credits(account, *credits)
        .await
        .map_err(|e| opened.failure(e, "granting credits", Some(account)))?;
    Ok(Report::account(&a))
}
