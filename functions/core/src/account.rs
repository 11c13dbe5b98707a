//! Accounts, API keys and webhook secrets.
//!
//! Keys are `tl_` + 43 URL-safe characters (256 random bits), shown once and stored only as
//! their SHA-256 hash, which is also how a request's key is looked up (one read).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The prefix every API key carries, so leaked keys are recognisable.
pub const KEY_PREFIX: &str = "tl_";

/// An account: credits, key hash and webhook secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// `acct_` + ULID.
    pub id: String,
    /// SHA-256 (hex) of the API key.
    pub key_hash: String,
    /// Spendable credits; never negative.
    pub credits: u64,
    /// Credits ever granted: `credits + charged_not_refunded == granted`.
    pub granted: u64,
    /// Standard Webhooks secret, `whsec_` + base64.
    pub webhook_secret: String,
    /// Unfinished (queued or processing) tasks, counted against the open-task cap.
    pub open_tasks: u64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// A freshly created account and its one-time visible key.
#[derive(Debug, Clone)]
pub struct NewAccount {
    /// The account to store.
    pub account: Account,
    /// The API key; only its hash is stored.
    pub api_key: String,
}

impl Account {
    /// Makes a new account with `credits`, a generated key (or `api_key` when given) and a
    /// generated webhook secret.
    pub fn create(credits: u64, api_key: Option<String>) -> NewAccount {
        let api_key = api_key.unwrap_or_else(generate_api_key);
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        NewAccount {
            account: Account {
                id: format!("acct_{}", ulid::Ulid::new()),
                key_hash: hash_api_key(&api_key),
                credits,
                granted: credits,
                webhook_secret: format!("whsec_{}", STANDARD.encode(secret)),
                open_tasks: 0,
                created_at: Utc::now(),
            },
            api_key,
        }
    }
}

/// Generates a new API key.
pub fn generate_api_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_unique_and_stored_only_as_hashes() {
        let a = Account::create(5, None);
        let b = Account::create(5, None);
        assert!(a.api_key.starts_with(KEY_PREFIX));
        assert_eq!(a.api_key.len(), KEY_PREFIX.len() + 43);
        assert_ne!(a.api_key, b.api_key);
        assert_eq!(a.account.key_hash, hash_api_key(&a.api_key));
        assert!(!a.account.key_hash.contains(&a.api_key));
        assert!(a.account.webhook_secret.starts_with("whsec_"));
        assert_eq!(a.account.granted, 5);
    }
}
