//! `create-account`: creates an account holding N credits, with a generated API key or the one
//! given with `--key`, and prints its id, key and webhook secret. The key is shown this once.

use serde_json::json;
use tasklane_core::account::{Account, hash_api_key};

use crate::backend::Opened;
use crate::cli::CreateAccountArgs;
use crate::failure::Failure;
use crate::report::Report;

/// Creates the account; refuses a `--key` another account already uses.
pub async fn run(args: &CreateAccountArgs, opened: &Opened) -> Result<Report, Failure> {
    let store = &opened.store;
    if let Some(k) = &args.key {
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
    let new = Account::create(args.credits, args.key.clone());
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
        note: Some("Keep the API key now: it is not shown again (only its hash is stored)."),
    })
}
