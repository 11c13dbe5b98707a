//! `rotate-key`: gives an account a new API key, printed once; the old key stops working.

use serde_json::json;
use tasklane_core::account::{generate_api_key, hash_api_key};

use crate::backend::Opened;
use crate::cli::AccountArgs;
use crate::failure::Failure;
use crate::report::Report;

/// Replaces the account's key hash with the new key's.
pub async fn run(args: &AccountArgs, opened: &Opened) -> Result<Report, Failure> {
    let account = &args.account;
    let key = generate_api_key();
    opened
        .store
        .set_key_hash(account, &hash_api_key(&key))
        .await
        .map_err(|e| opened.failure(e, "replacing the key", Some(account)))?;
    Ok(Report {
        fields: vec![("account_id", json!(account)), ("api_key", json!(key))],
        note: Some("The old key no longer works. Keep the new one now: it is not shown again."),
    })
}
