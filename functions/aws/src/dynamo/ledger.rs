//! An account's balance on DynamoDB, spread over several items when one item is too hot.
//!
//! Every submit debits the account and every task end settles it (refund, one open task less),
//! each in a transaction with the task. One item takes at most 1,000 write units a second
//! (a partition's limit; a transactional write of an item under 1 KB costs 2), and two
//! transactions on one item at once are cancelled with `TransactionConflict`. So one item
//! carries a few hundred submits and ends a second at best. An account can therefore spread
//! its `credits` and `open_tasks` over `shards` items ([`set_shards`](DynamoStore::set_shards),
//! `tasklane-admin shard`): the account item is shard 0 and shard `k` is the item
//! `ACCT#<id>#<k>` / `SHARD`, each in a partition of its own.
//!
//! - The account's balance and open-task count are the sums over its shards.
//! - Each shard takes its share of the open-task cap ([`shard_cap`]); the shares add up to
//!   the cap exactly, so the cap still holds for the account as a whole.
//! - A submit debits one shard: the task's own ([`shard_of`]), or on a conflict the next. When
//!   a shard is short of credits or of open-task room, the submit reads all shards: if the
//!   account as a whole is short it is refused as before; else it moves to a shard that has
//!   room, or [rebalances](DynamoStore::rebalance) the shards evenly in one transaction.
//! - A task end settles the task's own shard. A shard may hold more or fewer open tasks than
//!   it debited (the count changed meanwhile, or the task moved shard on a conflict); only the
//!   sums matter, and a rebalance evens the shards out again.
//!
//! Writes that lose to an ongoing transaction are retried after a "full jitter" exponential
//! backoff ([`backoff`]), as DynamoDB's documentation advises for `TransactionConflict`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};
use tasklane_core::ports::{PortError, PortResult};

use super::{
    DynamoStore, Item, account_key, build_err, cancellation_reasons, n, s, sdk_error,
    unless_condition_failed,
};

/// The most items an account's balance can be spread over (a rebalance writes them all in
/// one transaction, which takes at most 100 items).
pub const MAX_SHARDS: u32 = 100;
/// Attempts of a write that keeps losing to ongoing transactions on its items: with the
/// backoff below, about 3 seconds of trying on average (5 at most) before a `503`, enough for a
/// burst of dozens of writes on one item.
pub(super) const CONFLICT_ATTEMPTS: u32 = 16;
/// How long a store trusts an account's shard count it read (a count only grows, and a
/// stale, smaller count is still correct: it only uses fewer shards).
const SHARDS_TTL: Duration = Duration::from_secs(60);

/// How long a store reuses the shares of shards 1.. it read for an account's view (the
/// balance an authenticated request sees; submit and settle never rely on it).
const SHARES_TTL: Duration = Duration::from_secs(1);

/// Shard counts read recently, per account.
pub(super) type ShardCache = Arc<Mutex<HashMap<String, (u32, Instant)>>>;
/// Shares of shards 1.. read recently for an account's view, per account.
pub(super) type SharesCache = Arc<Mutex<HashMap<String, (Vec<Share>, Instant)>>>;

/// Waits before retry `attempt` (0-based) of a write that conflicted: a random time up to
/// 10 ms · 2^attempt, at most 500 ms ("full jitter", so retries that collided spread out).
pub(super) async fn backoff(attempt: u32) {
    let cap = (10u64 << attempt.min(6)).min(500);
    tokio::time::sleep(Duration::from_millis(rand::random_range(1..=cap))).await;
}

/// Whether a single-item request lost to an ongoing transaction on its item.
pub(super) fn is_conflict<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> bool {
    e.as_service_error()
        .is_some_and(|se| se.code() == Some("TransactionConflictException"))
}

/// Whether a transaction was cancelled only because another transaction held one of its
/// items (no condition failed).
pub(super) fn is_transaction_conflict(e: &super::TransactError) -> bool {
    cancellation_reasons(e).is_some_and(|r| {
        r.iter().any(|x| x.code() == Some("TransactionConflict"))
            && !r.iter().any(|x| x.code() == Some("ConditionalCheckFailed"))
    })
}

/// Sends a request again (after [`backoff`]) while `conflicted` says it lost to an ongoing
/// transaction, at most [`CONFLICT_ATTEMPTS`] times in all.
pub(super) async fn retry_while<T, Er, F, Fut>(
    conflicted: impl Fn(&Er) -> bool,
    mut send: F,
) -> Result<T, Er>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Er>>,
{
    let mut attempt = 0;
    loop {
        match send().await {
            Err(e) if attempt + 1 < CONFLICT_ATTEMPTS && conflicted(&e) => {
                backoff(attempt).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The key of shard `shard` of an account: the account item itself for shard 0.
pub(super) fn shard_key(account_id: &str, shard: u32) -> (AttributeValue, AttributeValue) {
    if shard == 0 {
        account_key(account_id)
    } else {
        (s(format!("ACCT#{account_id}#{shard}")), s("SHARD"))
    }
}

/// The shard a task debits and settles first: a stable hash (FNV-1a) of its id.
pub(super) fn shard_of(task_id: &str, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in task_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

/// Shard `shard`'s share of an open-task cap of `max_open` over `shards` shards; the shares
/// add up to `max_open`.
pub(super) fn shard_cap(max_open: u64, shards: u32, shard: u32) -> u64 {
    let n = u64::from(shards.max(1));
    max_open / n + u64::from(u64::from(shard) < max_open % n)
}

/// The shard count an account item carries (1 when it has none).
pub(super) fn shards_of(item: &Item) -> u32 {
    item.get("shards")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .clamp(1, MAX_SHARDS)
}

/// One shard's part of an account's balance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Share {
    /// Credits held by this shard.
    pub credits: u64,
    /// Open tasks counted on this shard (negative when more ended here than began).
    pub open: i64,
    /// Whether the item has an `open_tasks` attribute (accounts written before the count
    /// existed have none).
    pub counted: bool,
}

impl Share {
    /// The share an item holds; a missing item holds nothing.
    pub fn of(item: Option<&Item>) -> Share {
        let num = |name: &str| {
            item.and_then(|i| i.get(name))
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse::<i64>().ok())
        };
        Share {
            credits: num("credits").map_or(0, |c| c.max(0) as u64),
            open: num("open_tasks").unwrap_or(0),
            counted: num("open_tasks").is_some(),
        }
    }
}

/// What a balance spread over `shares` adds up to: credits and open tasks.
pub(super) fn totals(shares: &[Share]) -> (u64, u64) {
    let credits = shares.iter().map(|s| s.credits).sum();
    let open: i64 = shares.iter().map(|s| s.open).sum();
    (credits, open.max(0) as u64)
}

/// Where a rebalance puts an account's credits and open tasks, shard by shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Spread {
    /// Credits per shard.
    pub credits: Vec<u64>,
    /// Open tasks per shard.
    pub open: Vec<i64>,
    /// The shard that can take a task of the `cost` asked for, if any.
    pub target: Option<u32>,
}

/// Spreads the totals of `shares` evenly (remainders to the lowest shards), except that when
/// `cost` is given, the first shard with open-task room under its cap in `caps` gets at least
/// `cost` credits (the account has them) and the others share the rest: so a debit larger
/// than an even share still finds a shard.
pub(super) fn spread(shares: &[Share], cost: u64, caps: &[u64]) -> Spread {
    let count = shares.len().max(1);
    let (n64, ni64) = (count as u64, count as i64);
    let credits: u64 = shares.iter().map(|s| s.credits).sum();
    let open: i64 = shares.iter().map(|s| s.open).sum();
    let even = |total: u64, parts: u64, k: u64| total / parts + u64::from(k < total % parts);
    let open: Vec<i64> = (0..ni64)
        .map(|k| open.div_euclid(ni64) + i64::from(k < open.rem_euclid(ni64)))
        .collect();
    let mut out = Spread {
        credits: (0..n64).map(|k| even(credits, n64, k)).collect(),
        open,
        target: None,
    };
    if cost == 0 || credits < cost {
        return out;
    }
    let room = |k: usize| caps.get(k).is_some_and(|cap| out.open[k] < *cap as i64);
    let Some(t) = (0..count).find(|k| room(*k)) else {
        return out;
    };
    out.target = Some(t as u32);
    if out.credits[t] < cost && count > 1 {
        let rest = credits - cost;
        let others = n64 - 1;
        let mut i = 0;
        for k in 0..count {
            out.credits[k] = if k == t {
                cost
            } else {
                i += 1;
                even(rest, others, i - 1)
            };
        }
    }
    out
}

impl DynamoStore {
    /// How many shards `account_id`'s balance is spread over, from the cache when it read
    /// that recently (1 for an unknown account).
    pub(super) async fn account_shards(&self, account_id: &str) -> PortResult<u32> {
        if let Some((n, at)) = self.shards.lock().unwrap().get(account_id)
            && at.elapsed() < SHARDS_TTL
        {
            return Ok(*n);
        }
        let n = self.read_shards(account_id).await?;
        self.remember_shards(account_id, n);
        Ok(n)
    }

    /// How many shards `account_id`'s balance is spread over, as its item says now
    /// (eventually consistent; 1 for an unknown account).
    pub(super) async fn read_shards(&self, account_id: &str) -> PortResult<u32> {
        let (pk, sk) = account_key(account_id);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .projection_expression("shards")
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item.as_ref().map_or(1, shards_of))
    }

    /// The shares of shards `1..count` for an account's view: read (eventually consistent)
    /// at most once a second per store, since every authenticated request of a busy account
    /// would otherwise read all its items. The view's balance may so lag by a second; a
    /// submit's debit is decided on the items themselves.
    pub(super) async fn view_shares(&self, account_id: &str, count: u32) -> PortResult<Vec<Share>> {
        if let Some((shares, at)) = self.view_shares.lock().unwrap().get(account_id)
            && shares.len() + 1 == count as usize
            && at.elapsed() < SHARES_TTL
        {
            return Ok(shares.clone());
        }
        let shares = self.shares(account_id, 1, count, false).await?;
        self.view_shares
            .lock()
            .unwrap()
            .insert(account_id.to_string(), (shares.clone(), Instant::now()));
        Ok(shares)
    }

    /// Notes the shard count just read from an account item.
    pub(super) fn remember_shards(&self, account_id: &str, shards: u32) {
        self.shards
            .lock()
            .unwrap()
            .insert(account_id.to_string(), (shards, Instant::now()));
    }

    /// The shares of shards `from..to` of an account, in order (one `BatchGetItem`).
    pub(super) async fn shares(
        &self,
        account_id: &str,
        from: u32,
        to: u32,
        consistent: bool,
    ) -> PortResult<Vec<Share>> {
        let keys = (from..to).map(|k| shard_key(account_id, k)).collect();
        let found = self
            .batch_get(keys, consistent, Some("PK, credits, open_tasks"))
            .await?;
        Ok((from..to)
            .map(|k| {
                let pk = match shard_key(account_id, k).0 {
                    AttributeValue::S(pk) => pk,
                    _ => String::new(),
                };
                Share::of(found.get(&pk))
            })
            .collect())
    }

    /// Writes `spread` over an account's shards in one transaction conditioned on the shares
    /// it was computed from (`shares`, all of them, in order), so no credit is made or lost by
    /// a write in between: such a write cancels the rebalance, and the caller reads again.
    /// `Ok(false)` when it was cancelled that way.
    pub(super) async fn rebalance(
        &self,
        account_id: &str,
        shares: &[Share],
        spread: &Spread,
    ) -> PortResult<bool> {
        if shares.len() < 2 {
            return Ok(true);
        }
        let mut req = self.client.transact_write_items();
        for (k, share) in shares.iter().enumerate() {
            let (pk, sk) = shard_key(account_id, k as u32);
            let counted = if share.counted {
                "open_tasks = :oo"
            } else {
                "attribute_not_exists(open_tasks)"
            };
            let mut update = Update::builder()
                .table_name(&self.table)
                .key("PK", pk)
                .key("SK", sk)
                .update_expression("SET credits = :c, open_tasks = :o")
                .condition_expression(format!(
                    "attribute_exists(PK) AND credits = :oc AND {counted}"
                ))
                .expression_attribute_values(":c", n(spread.credits[k]))
                .expression_attribute_values(":o", n(spread.open[k]))
                .expression_attribute_values(":oc", n(share.credits));
            if share.counted {
                update = update.expression_attribute_values(":oo", n(share.open));
            }
            req = req.transact_items(
                TransactWriteItem::builder()
                    .update(update.build().map_err(build_err)?)
                    .build(),
            );
        }
        match req.send().await {
            Ok(_) => {
                tracing::info!(account_id, shards = shares.len(), "account rebalanced");
                Ok(true)
            }
            Err(e) => match cancellation_reasons(&e) {
                Some(_) => Ok(false),
                None => Err(sdk_error(e)),
            },
        }
    }

    /// An account's balance as its items hold it now: credits and open tasks summed over
    /// all its shards (strongly consistent reads), and the shard count. `None` for an
    /// unknown account.
    pub async fn ledger(&self, account_id: &str) -> PortResult<Option<(u64, u64, u32)>> {
        let Some(item) = self.get(account_key(account_id)).await? else {
            return Ok(None);
        };
        let count = shards_of(&item);
        let mut shares = vec![Share::of(Some(&item))];
        shares.extend(self.shares(account_id, 1, count, true).await?);
        let (credits, open) = totals(&shares);
        Ok(Some((credits, open, count)))
    }

    /// Forgets the shares read for an account's view (after this store changed them).
    pub(super) fn forget_view(&self, account_id: &str) {
        self.view_shares.lock().unwrap().remove(account_id);
    }

    /// Spreads `account_id`'s balance over `shards` items (1 to [`MAX_SHARDS`]), for an
    /// account busier than one item can carry. The count only grows: tasks in flight settle
    /// on the shards they know. Creates the new shard items, records the count on the
    /// account, and rebalances. Returns the count now in force.
    pub async fn set_shards(&self, account_id: &str, shards: u32) -> PortResult<u32> {
        if !(1..=MAX_SHARDS).contains(&shards) {
            return Err(PortError::internal(format!(
                "shards must be 1 to {MAX_SHARDS}, not {shards}"
            )));
        }
        let item = self
            .get(account_key(account_id))
            .await?
            .ok_or(PortError::NotFound)?;
        let current = shards_of(&item);
        if shards < current {
            return Err(PortError::internal(format!(
                "the account is spread over {current} shards; the count only grows"
            )));
        }
        if shards > current {
            for k in current..shards {
                let (pk, sk) = shard_key(account_id, k);
                let res = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .item("PK", pk)
                    .item("SK", sk)
                    .item("account_id", s(account_id))
                    .item("credits", n(0))
                    .item("open_tasks", n(0))
                    .condition_expression("attribute_not_exists(PK)")
                    .send()
                    .await;
                // An item that exists was left by an earlier attempt that stopped before
                // recording the count: nothing has debited or settled it since.
                unless_condition_failed(res)?;
            }
            let (pk, sk) = account_key(account_id);
            let condition = if current == 1 {
                "attribute_exists(PK) AND (attribute_not_exists(shards) OR shards = :old)"
            } else {
                "attribute_exists(PK) AND shards = :old"
            };
            let res = retry_while(is_conflict, || {
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .key("PK", pk.clone())
                    .key("SK", sk.clone())
                    .update_expression("SET shards = :n")
                    .condition_expression(condition)
                    .expression_attribute_values(":n", n(shards))
                    .expression_attribute_values(":old", n(current))
                    .send()
            })
            .await;
            if let Err(e) = res {
                return Err(
                    if e.as_service_error()
                        .is_some_and(|se| se.is_conditional_check_failed_exception())
                    {
                        PortError::unavailable("the shard count changed meanwhile; try again")
                    } else {
                        sdk_error(e)
                    },
                );
            }
        }
        self.remember_shards(account_id, shards);
        self.forget_view(account_id);
        for attempt in 0..CONFLICT_ATTEMPTS {
            let shares = self.shares(account_id, 0, shards, true).await?;
            if self
                .rebalance(account_id, &shares, &spread(&shares, 0, &[]))
                .await?
            {
                break;
            }
            backoff(attempt).await;
        }
        Ok(shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_caps_add_up_to_the_cap() {
        for cap in [0u64, 1, 3, 63, 64, 65, 1000, 60_000] {
            for shards in [1u32, 2, 7, 16, 64] {
                let total: u64 = (0..shards).map(|k| shard_cap(cap, shards, k)).sum();
                assert_eq!(total, cap, "cap {cap} over {shards}");
            }
        }
    }

    #[test]
    fn tasks_spread_over_all_shards() {
        let mut seen = [0u32; 16];
        for _ in 0..1600 {
            seen[shard_of(&format!("task_{}", ulid::Ulid::new()), 16) as usize] += 1;
        }
        assert!(seen.iter().all(|c| *c > 40), "{seen:?}");
        assert_eq!(shard_of("task_x", 1), 0);
    }

    fn shares(v: &[(u64, i64)]) -> Vec<Share> {
        v.iter()
            .map(|&(credits, open)| Share {
                credits,
                open,
                counted: true,
            })
            .collect()
    }

    #[test]
    fn a_spread_keeps_the_totals_and_gives_a_large_debit_one_shard() {
        let before = shares(&[(10, 3), (0, -1), (90, 0), (0, 2)]);
        let even = spread(&before, 0, &[]);
        assert_eq!(even.credits, vec![25, 25, 25, 25]);
        assert_eq!(even.open, vec![1, 1, 1, 1]);
        assert_eq!(even.target, None);
        // 60 credits for one task: an even share (25) is too small.
        let caps = [1, 1, 1, 1];
        let s = spread(&before, 60, &caps);
        assert_eq!(s.credits.iter().sum::<u64>(), 100);
        assert_eq!(s.open.iter().sum::<i64>(), 4);
        // Every shard holds its cap's worth of open tasks: no room anywhere.
        assert_eq!(s.target, None);
        let caps = [2, 2, 2, 2];
        let s = spread(&before, 60, &caps);
        assert_eq!(s.target, Some(0));
        assert_eq!(s.credits, vec![60, 14, 13, 13]);
        // Not enough credits in all: nothing is promised.
        assert_eq!(spread(&before, 101, &caps).target, None);
    }

    #[test]
    fn totals_clamp_a_negative_open_count_only_in_the_sum() {
        let shares = [
            Share {
                credits: 5,
                open: -2,
                counted: true,
            },
            Share {
                credits: 7,
                open: 5,
                counted: true,
            },
        ];
        assert_eq!(totals(&shares), (12, 3));
    }
}
