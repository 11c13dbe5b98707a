//! `revoke-key`: revokes an account's API key. Every request with it answers 401 until
//! `rotate-key` gives the account a new one; its tasks and credits stay.

use serde_json::json;
use tasklane_core::account::generate_api_key;

use crate::backend::Opened;
use crate::cli::AccountArgs;
use crate::failure::Failure;
use crate::report::Report;

/// Replaces the account's key hash with a value no key hashes to.
pub async fn run(args: &AccountArgs, opened: &Opened) -> Result<Report, Failure> {
    let account = &args.account;
    // No key hashes to this value (it is not 64 hex digits), so no key matches it.
    let revoked = format!("revoked:{}", generate_api_key());
    opened
        .store
        .set_key_hash(account, &revoked)
        .await
        .map_err(|e| opened.failure(e, "revoking the key", Some(account)))?;
    Ok(Report {
        fields: vec![("account_id", json!(account)), ("key_revoked", json!(true))],
        note: Some("The key no longer works; `rotate-key` issues a new one."),
    })
}
