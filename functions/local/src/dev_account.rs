//! The development account: created on the first start with `TASKLANE_DEV_CREDITS`, its
//! id and API key kept in the data directory (or the key taken from `TASKLANE_DEV_KEY`).

use tasklane_core::account::{Account, hash_api_key};
use tasklane_core::ports::TaskStore;

use crate::config::LocalConfig;
use crate::embedded::restrict;

/// Ensures the development account exists and returns `(account id, api key)`.
pub(crate) async fn dev_account(
    store: &dyn TaskStore,
    cfg: &LocalConfig,
) -> anyhow::Result<(String, String)> {
    let id_file = cfg.data_dir.join("dev_account");
    let key_file = cfg.data_dir.join("dev_api_key");
    let key = match (&cfg.dev_key, std::fs::read_to_string(&key_file)) {
        (Some(k), _) => k.clone(),
        (None, Ok(k)) => k.trim().to_string(),
        (None, Err(_)) => tasklane_core::account::generate_api_key(),
    };
    let existing = match std::fs::read_to_string(&id_file) {
        Ok(id) => store.account(id.trim()).await?,
        Err(_) => None,
    };
    let id = match existing {
        Some(acct) => {
            if acct.key_hash != hash_api_key(&key) {
                store.set_key_hash(&acct.id, &hash_api_key(&key)).await?;
            }
            acct.id
        }
        None => {
            let new = Account::create(cfg.dev_credits, Some(key.clone()));
            store.create_account(&new.account).await?;
            std::fs::write(&id_file, &new.account.id)?;
            new.account.id
        }
    };
    if cfg.dev_key.is_none() {
        std::fs::write(&key_file, &key)?;
        restrict(&key_file);
    }
    Ok((id, key))
}
