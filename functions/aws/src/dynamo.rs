//! The task store on DynamoDB, single-table design.
//!
//! | item | `PK` | `SK` | `GSI1PK` | `GSI1SK` |
//! |---|---|---|---|---|
//! | account (and shard 0 of its balance) | `ACCT#<id>` | `ACCOUNT` | – | – |
//! | shard `k` ≥ 1 of a spread balance | `ACCT#<id>#<k>` | `SHARD` | – | – |
//! | task | `TASK#<id>` | `TASK` | `ACCT#<account id>` | `<task id>` |
//! | idempotency record | `IDEM#<account id>#<key>` | `IDEM` | – | – |
//! | key claim | `KEY#<sha256 of the API key>` | `KEY` | – | – |
//! | upstream slot | `SLOTS#<pool>` | `SLOT#<n>` | – | – |
//!
//! A request's key is looked up by its key claim item, which names the account (two strongly
//! consistent reads, no index, so a rotated or revoked key stops working at once). `GSI1`
//! answers "this account's tasks, newest first" (task ids are ULIDs). `GSI2` is sparse: only a task waiting on possibly
//! lost work carries `GSI2PK = WAITING#<shard 0..7>` and `GSI2SK = <waiting_since>#<task id>`,
//! so the sweeper reads just those (one query per shard, spreading the index's writes; and as
//! many for the `DUE#<shard>` partitions that items written before the rename still carry).
//! A key claim item makes each key hash unique: it is written with its account (and swapped on
//! rotation) in one transaction, conditioned on not existing.
//! The account item counts its open tasks (`open_tasks`): submit increments it under the
//! cap in the same transaction as the debit, and the write that ends a task decrements it.
//! A busy account spreads both over several items ([`ledger`]). Idempotency records carry `expires_at` (epoch seconds),
//! the table's TTL attribute. Submit is one `TransactWriteItems` (debit, task, idempotency
//! record); every task change is a write conditioned on the version read, and a refund
//! travels in the same transaction.

use std::collections::HashMap;
use std::time::Duration;

mod ledger;
pub use ledger::MAX_SHARDS;
use ledger::{
    CONFLICT_ATTEMPTS, Share, backoff, is_conflict, is_transaction_conflict, retry_while,
    shard_cap, shard_key, shard_of, shards_of, totals,
};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};
use chrono::{DateTime, Utc};
use tasklane_core::account::Account;
use tasklane_core::api::list_read_budget;
use tasklane_core::ports::{
    IdempotencyClaim, ListQuery, PortError, PortResult, Reservation, TaskPage, TaskStore,
};
use tasklane_core::task::{Applied, Task, Transition, apply};

/// Name of the global secondary index.
pub const GSI1: &str = "GSI1";
/// Name of the sparse index of tasks waiting on possibly lost work.
pub const GSI2: &str = "GSI2";
/// Partitions of [`GSI2`] per prefix: at 1,000 tasks a second, about 2,000 index writes a
/// second (a task's entry appears at submit and goes at its end), 125 a partition, under the
/// 1,000 a partition takes. Items written when there were 8 are in partitions 0..8, still read.
const WAITING_SHARDS: u8 = 16;
/// Partition prefixes of [`GSI2`]: `WAITING#<shard>`, and `DUE#<shard>`, which items written
/// before the sweeper's clock had one name carry until their next write.
const WAITING_PREFIXES: [&str; 2] = ["WAITING", "DUE"];

/// The partition of [`GSI2`] a task's entry is in: `WAITING#<this>`, a hash of its id (a
/// ULID's last character takes only 32 values, 14 of them distinct modulo 16).
pub fn waiting_shard(task_id: &str) -> u8 {
    shard_of(task_id, u32::from(WAITING_SHARDS)) as u8
}

/// A sort key that orders as the time does (fixed width, UTC).
fn waiting_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a Item, name: &str) -> PortResult<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        .ok_or_else(|| PortError::internal(format!("item has no string attribute {name}")))
}

fn get_n(item: &Item, name: &str) -> PortResult<u64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| PortError::internal(format!("item has no number attribute {name}")))
}

/// Error codes, across DynamoDB, SQS and S3, that mean "try again later".
const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "SlowDown",
    "TransactionInProgressException",
    "TransactionConflictException",
    "InternalServerError",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Maps an SDK error of any of the three services: throttling, timeouts, transport failures
/// and any 5xx answer are retryable ([`PortError::Unavailable`]); anything else is internal.
/// The SDK's text is kept as the cause (logged), never shown to clients.
pub fn sdk_error<E>(e: SdkError<E, aws_smithy_runtime_api::http::Response>) -> PortError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let retryable = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(se) => {
            se.raw().status().as_u16() >= 500
                || se
                    .err()
                    .code()
                    .is_some_and(|c| RETRYABLE_CODES.contains(&c))
        }
        _ => false,
    };
    let e = aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string();
    if retryable {
        PortError::unavailable(e)
    } else {
        PortError::internal(e)
    }
}

/// `Ok` also when the write's condition failed: the state it was to make, or a newer one,
/// holds already.
fn unless_condition_failed<T, E>(
    res: Result<T, SdkError<E, aws_smithy_runtime_api::http::Response>>,
) -> PortResult<()>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match res {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.code() == Some("ConditionalCheckFailedException")) =>
        {
            Ok(())
        }
        Err(e) => Err(sdk_error(e)),
    }
}

/// The result of an update conditioned on the item existing: a failed condition is `NotFound`.
fn existing<T>(
    res: Result<
        T,
        SdkError<
            aws_sdk_dynamodb::operation::update_item::UpdateItemError,
            aws_smithy_runtime_api::http::Response,
        >,
    >,
) -> PortResult<T> {
    res.map_err(|e| {
        if e.as_service_error()
            .is_some_and(|se| se.is_conditional_check_failed_exception())
        {
            PortError::NotFound
        } else {
            sdk_error(e)
        }
    })
}

type TransactError = SdkError<
    aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
    aws_smithy_runtime_api::http::Response,
>;

/// Why each item of a cancelled `TransactWriteItems` was refused (`None` for other errors).
fn cancellation_reasons(
    e: &TransactError,
) -> Option<Vec<aws_sdk_dynamodb::types::CancellationReason>> {
    match e.as_service_error()? {
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
            Some(c.cancellation_reasons().to_vec())
        }
        _ => None,
    }
}

/// A transaction cancelled for reasons retrying may cure (conflicts, throttling).
fn cancelled(what: &str, reasons: &[aws_sdk_dynamodb::types::CancellationReason]) -> PortError {
    PortError::unavailable(format!(
        "{what} transaction cancelled: {:?}",
        reasons
            .iter()
            .map(|r| r.code().unwrap_or("None").to_string())
            .collect::<Vec<_>>()
    ))
}

/// Maps the result of a transaction whose items are conditioned on existence: a failed
/// condition (the account exists, changed meanwhile, or the key is taken) is an internal
/// error naming `what`; conflicts are retryable.
fn keyed_transaction<T>(res: Result<T, TransactError>, what: &str) -> PortResult<()> {
    let Err(e) = res else {
        return Ok(());
    };
    let reasons = cancellation_reasons(&e);
    match reasons {
        Some(r) if r.iter().any(|x| x.code() == Some("ConditionalCheckFailed")) => Err(
            PortError::internal(format!("{what} exists already or changed meanwhile")),
        ),
        Some(r) => Err(cancelled(what, &r)),
        None => Err(sdk_error(e)),
    }
}

fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> PortError {
    PortError::internal(e)
}

fn account_key(id: &str) -> (AttributeValue, AttributeValue) {
    (s(format!("ACCT#{id}")), s("ACCOUNT"))
}

fn task_key(id: &str) -> (AttributeValue, AttributeValue) {
    (s(format!("TASK#{id}")), s("TASK"))
}

fn key_claim(key_hash: &str) -> (AttributeValue, AttributeValue) {
    (s(format!("KEY#{key_hash}")), s("KEY"))
}

fn idem_key(account_id: &str, key: &str) -> (AttributeValue, AttributeValue) {
    (s(format!("IDEM#{account_id}#{key}")), s("IDEM"))
}

fn account_from(item: &Item) -> PortResult<Account> {
    Ok(Account {
        id: get_s(item, "account_id")?.to_string(),
        key_hash: get_s(item, "key_hash")?.to_string(),
        credits: get_n(item, "credits")?,
        granted: get_n(item, "granted")?,
        webhook_secret: get_s(item, "webhook_secret")?.to_string(),
        // Absent on accounts written before the count existed.
        open_tasks: item
            .get("open_tasks")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .map_or(0, |n| n.max(0) as u64),
        created_at: get_s(item, "created_at")?
            .parse()
            .map_err(PortError::internal)?,
    })
}

fn task_from(item: &Item) -> PortResult<Task> {
    serde_json::from_str(get_s(item, "doc")?).map_err(PortError::internal)
}

/// The [`GSI1`] partition `k` of an account's tasks: `ACCT#<id>`, and `ACCT#<id>#<k>` for the
/// others of a busy account (its tasks in one partition would take every submit's and status
/// change's index write, past a partition's 1,000 a second).
fn index_partition(account_id: &str, k: u32) -> String {
    if k == 0 {
        format!("ACCT#{account_id}")
    } else {
        format!("ACCT#{account_id}#{k}")
    }
}

/// A task's item, indexed in partition [`shard_of`] its id of an account with `shards`.
fn task_item(task: &Task, shards: u32) -> PortResult<Item> {
    let (pk, sk) = task_key(&task.id);
    let partition = index_partition(&task.account_id, shard_of(&task.id, shards));
    let mut item = HashMap::from([
        ("PK".to_string(), pk),
        ("SK".to_string(), sk),
        ("GSI1PK".to_string(), s(partition)),
        ("GSI1SK".to_string(), s(task.id.clone())),
        ("status".to_string(), s(task.status.as_str())),
        ("model".to_string(), s(task.model.clone())),
        ("version".to_string(), n(task.version)),
        (
            "doc".to_string(),
            s(serde_json::to_string(task).map_err(PortError::internal)?),
        ),
    ]);
    if let Some(at) = task.waiting_since {
        item.insert(
            "GSI2PK".to_string(),
            s(format!("WAITING#{}", waiting_shard(&task.id))),
        );
        item.insert(
            "GSI2SK".to_string(),
            s(format!("{}#{}", waiting_time(at), task.id)),
        );
    }
    Ok(item)
}

/// The task store on one DynamoDB table.
#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: String,
    /// Accounts' shard counts read recently ([`ledger`]).
    shards: ledger::ShardCache,
    /// Accounts' shares read recently for their views ([`ledger`]).
    view_shares: ledger::SharesCache,
}

impl DynamoStore {
    /// A store on `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        DynamoStore {
            client,
            table: table.into(),
            shards: ledger::ShardCache::default(),
            view_shares: ledger::SharesCache::default(),
        }
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    async fn get(&self, (pk, sk): (AttributeValue, AttributeValue)) -> PortResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(out.item)
    }

    /// The items with these keys that exist, by partition key (`BatchGetItem`, 100 keys a
    /// request; keys DynamoDB leaves unprocessed are asked again after a backoff).
    async fn batch_get(
        &self,
        keys: Vec<(AttributeValue, AttributeValue)>,
        consistent: bool,
        projection: Option<&str>,
    ) -> PortResult<HashMap<String, Item>> {
        let mut found = HashMap::new();
        for chunk in keys.chunks(100) {
            let keys: Vec<Item> = chunk
                .iter()
                .map(|(pk, sk)| {
                    HashMap::from([
                        ("PK".to_string(), pk.clone()),
                        ("SK".to_string(), sk.clone()),
                    ])
                })
                .collect();
            let mut pending = Some(
                aws_sdk_dynamodb::types::KeysAndAttributes::builder()
                    .set_keys(Some(keys))
                    .consistent_read(consistent)
                    .set_projection_expression(projection.map(str::to_string))
                    .build()
                    .map_err(build_err)?,
            );
            let mut attempt = 0;
            while let Some(request) = pending.take() {
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(sdk_error)?;
                let items = out.responses.unwrap_or_default().remove(&self.table);
                for item in items.unwrap_or_default() {
                    if let Some(AttributeValue::S(pk)) = item.get("PK") {
                        found.insert(pk.clone(), item);
                    }
                }
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .filter(|k| !k.keys().is_empty());
                if pending.is_some() {
                    if attempt + 1 >= CONFLICT_ATTEMPTS {
                        return Err(PortError::unavailable("BatchGetItem left keys unprocessed"));
                    }
                    backoff(attempt).await;
                    attempt += 1;
                }
            }
        }
        Ok(found)
    }

    /// The tasks with these ids that exist, in the order given (strongly consistent).
    async fn tasks_by_id(&self, ids: &[String]) -> PortResult<Vec<Task>> {
        let found = self
            .batch_get(ids.iter().map(|id| task_key(id)).collect(), true, None)
            .await?;
        ids.iter()
            .filter_map(|id| found.get(&format!("TASK#{id}")))
            .map(task_from)
            .collect()
    }

    /// Up to `want` task ids of one index partition that match `query`, newest first, reading
    /// at most `budget` index items, and the id below which the partition was not read (`None`
    /// when it was read to its end). `Limit` caps the items a Query page evaluates before
    /// filtering; `ScannedCount` says how many it did.
    async fn list_partition(
        &self,
        partition: String,
        query: &ListQuery,
        budget: usize,
        want: usize,
    ) -> PortResult<(Vec<String>, Option<String>)> {
        let mut filters = Vec::new();
        let mut names = HashMap::new();
        let mut values = HashMap::from([(":a".to_string(), s(partition))]);
        if let Some(st) = query.status {
            filters.push("#s = :s");
            names.insert("#s".to_string(), "status".to_string());
            values.insert(":s".to_string(), s(st.as_str()));
        }
        if let Some(m) = &query.model {
            filters.push("#m = :m");
            names.insert("#m".to_string(), "model".to_string());
            values.insert(":m".to_string(), s(m.clone()));
        }
        let key_cond = match &query.before {
            Some(b) => {
                values.insert(":b".to_string(), s(b.clone()));
                "GSI1PK = :a AND GSI1SK < :b"
            }
            None => "GSI1PK = :a",
        };
        let mut read = 0usize;
        let mut ids = Vec::with_capacity(want);
        let mut start: Option<Item> = None;
        loop {
            let page = budget.saturating_sub(read).max(1);
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI1)
                .key_condition_expression(key_cond)
                .set_expression_attribute_values(Some(values.clone()))
                .scan_index_forward(false)
                .limit(i32::try_from(page).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take());
            if !filters.is_empty() {
                q = q
                    .filter_expression(filters.join(" AND "))
                    .set_expression_attribute_names(Some(names.clone()));
            }
            let out = q.send().await.map_err(sdk_error)?;
            // A page that reports no count read as much as it was allowed to (always ends).
            read += match usize::try_from(out.scanned_count()) {
                Ok(n) if n > 0 => n,
                _ => page,
            };
            for item in out.items() {
                if ids.len() < want {
                    ids.push(get_s(item, "GSI1SK")?.to_string());
                }
            }
            if ids.len() >= want {
                // Read far enough: what lies below the last id kept is for the next page.
                let stop = ids.last().cloned();
                return Ok((ids, stop));
            }
            match out.last_evaluated_key {
                Some(k) if read < budget => start = Some(k),
                // Stopped at the budget: more may follow the last item read (its index sort
                // key is its task id).
                Some(k) => {
                    return match k.get("GSI1SK") {
                        Some(AttributeValue::S(id)) => Ok((ids, Some(id.clone()))),
                        _ => Err(PortError::internal("GSI1SK is not a string")),
                    };
                }
                None => return Ok((ids, None)),
            }
        }
    }

    /// The account an account item (shard 0) belongs to, with its balance and open-task
    /// count summed over all its shards.
    async fn whole_account(&self, item: &Item) -> PortResult<Account> {
        let mut account = account_from(item)?;
        let count = shards_of(item);
        self.remember_shards(&account.id, count);
        if count > 1 {
            let mut shares = vec![Share::of(Some(item))];
            shares.extend(self.view_shares(&account.id, count).await?);
            (account.credits, account.open_tasks) = totals(&shares);
        }
        Ok(account)
    }

    /// An `UpdateItem` on an existing account (the caller adds the update).
    fn update_account(
        &self,
        account_id: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        let (pk, sk) = account_key(account_id);
        self.client
            .update_item()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .condition_expression("attribute_exists(PK)")
    }

    /// The account side of a task's change: `refund` credits back, one open task less when
    /// `closed`.
    fn account_settle(
        &self,
        account_id: &str,
        shard: u32,
        refund: u64,
        closed: bool,
    ) -> PortResult<TransactWriteItem> {
        let (pk, sk) = shard_key(account_id, shard);
        let update = Update::builder()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .update_expression(
                "SET credits = credits + :c, open_tasks = if_not_exists(open_tasks, :zero) - :o",
            )
            .condition_expression("attribute_exists(PK)")
            .expression_attribute_values(":c", n(refund))
            .expression_attribute_values(":o", n(u8::from(closed)))
            .expression_attribute_values(":zero", n(0))
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// The put of a key claim item, refused when another account holds the key hash.
    fn claim_key(&self, key_hash: &str, account_id: &str) -> PortResult<TransactWriteItem> {
        let (pk, sk) = key_claim(key_hash);
        let put = Put::builder()
            .table_name(&self.table)
            .item("PK", pk)
            .item("SK", sk)
            .item("account_id", s(account_id))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Writes `task` if the stored version is still `expected`, settling its account (refund,
    /// open-task count) in the same transaction. `Ok(false)` when the version changed meanwhile.
    async fn write_task(&self, task: &Task, expected: u64, applied: Applied) -> PortResult<bool> {
        let shards = self.account_shards(&task.account_id).await?;
        let item = task_item(task, shards)?;
        let cond = "version = :expected";
        let (refund, closed) = (applied.refund(), applied.closed());
        if refund == 0 && !closed {
            let res = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(cond)
                .expression_attribute_values(":expected", n(expected))
                .send()
                .await;
            return match res {
                Ok(_) => Ok(true),
                Err(e)
                    if e.as_service_error().is_some_and(|se| {
                        se.is_conditional_check_failed_exception()
                            || se.is_transaction_conflict_exception()
                    }) =>
                {
                    Ok(false)
                }
                Err(e) => Err(sdk_error(e)),
            };
        }
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(cond)
            .expression_attribute_values(":expected", n(expected))
            .build()
            .map_err(build_err)?;
        let shard = shard_of(&task.id, shards);
        let res = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(self.account_settle(&task.account_id, shard, refund, closed)?)
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => {
                let reasons = cancellation_reasons(&e);
                // A changed version, or another transaction on the item: read again and retry.
                let lost = |code: Option<&str>| {
                    matches!(code, Some("ConditionalCheckFailed" | "TransactionConflict"))
                };
                match reasons {
                    Some(r) if r.iter().any(|x| lost(x.code())) => Ok(false),
                    Some(r) => Err(cancelled("task write", &r)),
                    None => Err(sdk_error(e)),
                }
            }
        }
    }
}

/// How one attempt to store a submitted task ended.
enum Insert {
    /// Debited, stored (and the idempotency record completed).
    Stored,
    /// Another transaction held one of the items.
    Conflict,
    /// The shard could not take the task (credits or open-task room): its share as it was,
    /// `None` when the shard's item does not exist.
    Refused(Option<Share>),
}

/// Why an account that cannot take a task of `cost` with `credits` left refuses it.
fn refusal(credits: u64, cost: u64, max_open: u64) -> PortError {
    if credits >= cost {
        PortError::TooManyOpenTasks { limit: max_open }
    } else {
        PortError::InsufficientCredits { available: credits }
    }
}

impl DynamoStore {
    /// One attempt to store `task` debiting shard `shard` of `count`: the debit (under the
    /// shard's share of the open-task cap), the task and the idempotency record in one
    /// transaction.
    async fn insert_on(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
        count: u32,
        shard: u32,
    ) -> PortResult<Insert> {
        let (apk, ask) = shard_key(&task.account_id, shard);
        let debit = Update::builder()
            .table_name(&self.table)
            .key("PK", apk)
            .key("SK", ask)
            // The REMOVE drops the index keys account items carried when accounts were found
            // through GSI1 (a no-op on items without them), so no debit rewrites an index.
            .update_expression(
                "SET credits = credits - :c, open_tasks = if_not_exists(open_tasks, :zero) + :one \
                 REMOVE GSI1PK, GSI1SK",
            )
            .condition_expression(
                "attribute_exists(PK) AND credits >= :c \
                 AND (attribute_not_exists(open_tasks) OR open_tasks < :cap)",
            )
            .expression_attribute_values(":c", n(task.cost.credits))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":cap", n(shard_cap(max_open, count, shard)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_err)?;
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(task_item(task, count)?))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(build_err)?;
        let mut req = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(debit).build())
            .transact_items(TransactWriteItem::builder().put(put).build());
        if let Some(claim) = claim {
            let (ipk, isk) = idem_key(&task.account_id, &claim.key);
            let finish = Update::builder()
                .table_name(&self.table)
                .key("PK", ipk)
                .key("SK", isk)
                .update_expression("SET task_id = :id")
                .condition_expression("#t = :t AND attribute_not_exists(task_id)")
                .expression_attribute_names("#t", "token")
                .expression_attribute_values(":id", s(task.id.clone()))
                .expression_attribute_values(":t", s(claim.token.clone()))
                .build()
                .map_err(build_err)?;
            req = req.transact_items(TransactWriteItem::builder().update(finish).build());
        }
        let Err(e) = req.send().await else {
            return Ok(Insert::Stored);
        };
        let Some(reasons) = cancellation_reasons(&e) else {
            return Err(sdk_error(e));
        };
        let code = |i: usize| reasons.get(i).and_then(|r| r.code());
        if code(0) == Some("ConditionalCheckFailed") {
            return Ok(Insert::Refused(
                reasons[0].item().map(|old| Share::of(Some(old))),
            ));
        }
        if code(2) == Some("ConditionalCheckFailed") {
            return Err(PortError::ReservationLost);
        }
        if code(1) == Some("ConditionalCheckFailed") {
            return Err(PortError::internal(format!(
                "task {} exists already",
                task.id
            )));
        }
        if reasons
            .iter()
            .any(|r| r.code() == Some("TransactionConflict"))
        {
            return Ok(Insert::Conflict);
        }
        Err(cancelled("submit", &reasons))
    }
}

#[async_trait]
impl TaskStore for DynamoStore {
    async fn create_account(&self, account: &Account) -> PortResult<()> {
        let (pk, sk) = account_key(&account.id);
        let put = Put::builder()
            .table_name(&self.table)
            .item("PK", pk)
            .item("SK", sk)
            .item("account_id", s(account.id.clone()))
            .item("key_hash", s(account.key_hash.clone()))
            .item("credits", n(account.credits))
            .item("granted", n(account.granted))
            .item("open_tasks", n(0))
            .item("webhook_secret", s(account.webhook_secret.clone()))
            .item("created_at", s(account.created_at.to_rfc3339()))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(build_err)?;
        let res = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(self.claim_key(&account.key_hash, &account.id)?)
            .send()
            .await;
        keyed_transaction(res, "account")
    }

    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>> {
        // The key claim item names the key's account; it is written and swapped in the same
        // transactions as the account's key, so this read (strongly consistent, no index)
        // sees a rotation or revocation as soon as it is done.
        let Some(claim) = self.get(key_claim(key_hash)).await? else {
            return Ok(None);
        };
        let account_id = get_s(&claim, "account_id")?;
        match self.account(account_id).await? {
            Some(account) if account.key_hash == key_hash => Ok(Some(account)),
            _ => Ok(None),
        }
    }

    async fn account(&self, account_id: &str) -> PortResult<Option<Account>> {
        match self.get(account_key(account_id)).await? {
            Some(item) => self.whole_account(&item).await.map(Some),
            None => Ok(None),
        }
    }

    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account> {
        // Granted credits go to shard 0 (the account item); a rebalance spreads them.
        let grant = self
            .update_account(account_id)
            .update_expression("SET credits = credits + :c, granted = granted + :c")
            .expression_attribute_values(":c", n(credits))
            .return_values(ReturnValue::AllNew);
        let out = retry_while(is_conflict, || grant.clone().send()).await;
        self.whole_account(existing(out)?.attributes().ok_or(PortError::NotFound)?)
            .await
    }

    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()> {
        // Only the account item: a busy account's balance items have nothing to do with its key.
        let item = self
            .get(account_key(account_id))
            .await?
            .ok_or(PortError::NotFound)?;
        let old = get_s(&item, "key_hash")?.to_string();
        if old == key_hash {
            return Ok(());
        }
        let (pk, sk) = account_key(account_id);
        let update = Update::builder()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .update_expression("SET key_hash = :h REMOVE GSI1PK, GSI1SK")
            .condition_expression("attribute_exists(PK) AND key_hash = :old")
            .expression_attribute_values(":h", s(key_hash))
            .expression_attribute_values(":old", s(old.clone()))
            .build()
            .map_err(build_err)?;
        let (opk, osk) = key_claim(&old);
        let release = aws_sdk_dynamodb::types::Delete::builder()
            .table_name(&self.table)
            .key("PK", opk)
            .key("SK", osk)
            .build()
            .map_err(build_err)?;
        let swap = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(update).build())
            .transact_items(TransactWriteItem::builder().delete(release).build())
            .transact_items(self.claim_key(key_hash, account_id)?);
        let res = retry_while(is_transaction_conflict, || swap.clone().send()).await;
        keyed_transaction(res, "key")
    }

    async fn reserve_idempotency(
        &self,
        account_id: &str,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
        in_flight: Duration,
        retain: Duration,
    ) -> PortResult<Reservation> {
        let (pk, sk) = idem_key(account_id, key);
        let token = ulid::Ulid::new().to_string();
        let now_ms = now.timestamp_millis();
        let locked_until = now_ms + i64::try_from(in_flight.as_millis()).unwrap_or(i64::MAX / 4);
        let expires_at = now.timestamp() + i64::try_from(retain.as_secs()).unwrap_or(i64::MAX / 4);
        let reserve = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("PK", pk)
            .item("SK", sk)
            .item("request_hash", s(request_hash))
            .item("token", s(token.clone()))
            .item("locked_until", n(locked_until))
            .item("expires_at", n(expires_at))
            // Free, expired (TTL deletes lazily), or an abandoned reservation.
            .condition_expression(
                "attribute_not_exists(PK) OR expires_at <= :now_s \
                 OR (attribute_not_exists(task_id) AND locked_until <= :now_ms)",
            )
            .expression_attribute_values(":now_s", n(now.timestamp()))
            .expression_attribute_values(":now_ms", n(now_ms))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        // The record is written in the submit's transaction too: wait out an ongoing one.
        let res = retry_while(is_conflict, || reserve.clone().send()).await;
        match res {
            Ok(_) => Ok(Reservation::Reserved { token }),
            Err(e) => {
                let old = e.as_service_error().and_then(|se| match se {
                    aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c) => {
                        c.item().cloned()
                    }
                    _ => None,
                });
                let Some(old) = old else {
                    return Err(sdk_error(e));
                };
                let request_hash = get_s(&old, "request_hash")?.to_string();
                Ok(match old.get("task_id").and_then(|v| v.as_s().ok()) {
                    Some(task_id) => Reservation::Completed {
                        request_hash,
                        task_id: task_id.clone(),
                    },
                    None => Reservation::InProgress { request_hash },
                })
            }
        }
    }

    async fn release_idempotency(
        &self,
        account_id: &str,
        key: &str,
        token: &str,
    ) -> PortResult<()> {
        let (pk, sk) = idem_key(account_id, key);
        let release = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("PK", pk)
            .key("SK", sk)
            .condition_expression("#t = :t AND attribute_not_exists(task_id)")
            .expression_attribute_names("#t", "token")
            .expression_attribute_values(":t", s(token));
        let res = retry_while(is_conflict, || release.clone().send()).await;
        // Already gone or completed: nothing to release.
        unless_condition_failed(res)
    }

    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()> {
        let count = self.account_shards(&task.account_id).await?;
        let cost = task.cost.credits;
        let mut shard = shard_of(&task.id, count);
        let mut conflicts = 0;
        for _ in 0..2 * CONFLICT_ATTEMPTS {
            let refused = match self.insert_on(task, claim, max_open, count, shard).await? {
                Insert::Stored => return Ok(()),
                Insert::Conflict => {
                    // Another transaction holds the shard (or the idempotency record): wait
                    // a little, and take the next shard.
                    if conflicts + 1 >= CONFLICT_ATTEMPTS {
                        break;
                    }
                    backoff(conflicts).await;
                    conflicts += 1;
                    shard = (shard + 1) % count;
                    continue;
                }
                Insert::Refused(share) => share,
            };
            let share = match refused {
                Some(share) => share,
                None if shard == 0 => return Err(PortError::NotFound),
                None => Share::default(),
            };
            if count == 1 {
                return Err(refusal(share.credits, cost, max_open));
            }
            // This shard is short; judge the account as a whole.
            let shares = self.shares(&task.account_id, 0, count, true).await?;
            let (credits, open) = totals(&shares);
            if credits < cost || open >= max_open {
                return Err(refusal(credits, cost, max_open));
            }
            let fits = |k: u32| {
                let s = shares[k as usize];
                s.credits >= cost && s.open < shard_cap(max_open, count, k) as i64
            };
            if let Some(k) = (0..count).map(|k| (shard + k) % count).find(|k| fits(*k)) {
                shard = k;
                continue;
            }
            // The room is there, split over shards none of which has enough: gather it.
            let caps: Vec<u64> = (0..count).map(|k| shard_cap(max_open, count, k)).collect();
            let spread = ledger::spread(&shares, cost, &caps);
            match spread.target {
                Some(k) if self.rebalance(&task.account_id, &shares, &spread).await? => {
                    shard = k;
                }
                _ => {
                    backoff(conflicts).await;
                    conflicts += 1;
                }
            }
        }
        Err(PortError::unavailable(format!(
            "submit: the account's items stayed busy after {CONFLICT_ATTEMPTS} tries"
        )))
    }

    async fn task(&self, task_id: &str) -> PortResult<Option<Task>> {
        self.get(task_key(task_id))
            .await?
            .as_ref()
            .map(task_from)
            .transpose()
    }

    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage> {
        // A busy account's tasks are indexed in as many partitions as its balance has items
        // (`index_partition`): each is read newest first and the answers merged.
        let count = self.read_shards(account_id).await?;
        let want = query.limit + 1;
        // At most `budget` index items are read in all (tasklane_core::api::list_read_budget):
        // a filter expression is applied after the read, and a Query is charged for every item
        // it read, so an unbounded filtered list would read (and pay for) the whole history to
        // fill one page.
        let budget = list_read_budget(query);
        let per = (budget / count as usize).max(want);
        let mut reads = tokio::task::JoinSet::new();
        for k in 0..count {
            let (store, query) = (self.clone(), query.clone());
            let partition = index_partition(account_id, k);
            reads.spawn(async move { store.list_partition(partition, &query, per, want).await });
        }
        let mut ids = Vec::new();
        // Everything newer than the highest place a partition stopped at has been read.
        let mut floor: Option<String> = None;
        while let Some(read) = reads.join_next().await {
            let (found, stop) = read.map_err(PortError::internal)??;
            ids.extend(found);
            floor = floor.max(stop);
        }
        if let Some(f) = &floor {
            ids.retain(|id| id >= f);
        }
        ids.sort_unstable_by(|a, b| b.cmp(a));
        let next_before = if ids.len() > query.limit {
            ids.truncate(query.limit);
            ids.last().cloned()
        } else {
            floor
        };
        // The index holds keys, status and model only (so that a progress write does not
        // rewrite it): the tasks themselves are read from the table, and one whose status
        // moved past the filter since the index was written is left out.
        let tasks = self
            .tasks_by_id(&ids)
            .await?
            .into_iter()
            .filter(|t| query.status.is_none_or(|st| t.status == st))
            .collect();
        Ok(TaskPage { tasks, next_before })
    }

    async fn update_task_from(&self, current: &Task, transition: &Transition) -> PortResult<Task> {
        // Skip the read: apply to the caller's copy and write conditioned on its version. A
        // stale copy (the write's condition fails, or the state machine refuses it) takes the
        // reading path, so no decision is ever made on stale state.
        let mut task = current.clone();
        let expected = task.version;
        if let Ok(applied) = apply(&mut task, transition, Utc::now())
            && task.version != expected
            && self.write_task(&task, expected, applied).await?
        {
            return Ok(task);
        }
        self.update_task(&current.id, transition).await
    }

    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool> {
        let pk = format!("SLOTS#{pool}");
        let now_ms = Utc::now().timestamp_millis();
        let until_ms = until.timestamp_millis();
        let held = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", s(pk.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let slot_of = |item: &Item| -> Option<(u32, String, i64)> {
            let n = get_s(item, "SK")
                .ok()?
                .strip_prefix("SLOT#")?
                .parse()
                .ok()?;
            let holder = get_s(item, "holder").ok()?.to_string();
            let end = item.get("until")?.as_n().ok()?.parse().ok()?;
            Some((n, holder, end))
        };
        let held: Vec<_> = held.items().iter().filter_map(slot_of).collect();
        let mine = held.iter().find(|(_, h, _)| h == holder).map(|(n, ..)| *n);
        // Our own slot first, then every slot that is free or whose holder's time ran out;
        // each write is conditioned on what was read, so two acquirers never share a slot.
        let candidates = mine.into_iter().chain((0..slots).filter(|n| {
            held.iter()
                .all(|(slot, _, end)| slot != n || *end <= now_ms)
        }));
        for slot in candidates {
            let res = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("PK", s(pk.clone()))
                .item("SK", s(format!("SLOT#{slot}")))
                .item("holder", s(holder))
                .item("until", n(until_ms))
                .condition_expression("attribute_not_exists(PK) OR #u <= :now OR holder = :me")
                .expression_attribute_names("#u", "until")
                .expression_attribute_values(":now", n(now_ms))
                .expression_attribute_values(":me", s(holder))
                .send()
                .await;
            match res {
                Ok(_) => return Ok(true),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
                {
                    continue;
                }
                Err(e) => return Err(sdk_error(e)),
            }
        }
        Ok(false)
    }

    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()> {
        let pk = format!("SLOTS#{pool}");
        let held = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .filter_expression("holder = :me")
            .expression_attribute_values(":pk", s(pk.clone()))
            .expression_attribute_values(":me", s(holder))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        for item in held.items() {
            let res = self
                .client
                .delete_item()
                .table_name(&self.table)
                .key("PK", s(pk.clone()))
                .key("SK", s(get_s(item, "SK")?))
                .condition_expression("holder = :me")
                .expression_attribute_values(":me", s(holder))
                .send()
                .await;
            // A slot taken over after our time ran out is not ours to free.
            unless_condition_failed(res)?;
        }
        Ok(())
    }

    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        // Every shard's oldest `limit`, merged: the oldest `limit` overall.
        let upper = format!("{}#~", waiting_time(cutoff));
        // (GSI2SK, task id): the index holds keys only.
        let mut due: Vec<(String, String)> = Vec::new();
        let partitions = WAITING_PREFIXES
            .iter()
            .flat_map(|p| (0..WAITING_SHARDS).map(move |shard| format!("{p}#{shard}")));
        for partition in partitions {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI2)
                .key_condition_expression("GSI2PK = :p AND GSI2SK <= :u")
                .expression_attribute_values(":p", s(partition))
                .expression_attribute_values(":u", s(upper.clone()))
                .limit(i32::try_from(limit).unwrap_or(100))
                .send()
                .await
                .map_err(sdk_error)?;
            for item in out.items() {
                let at = get_s(item, "GSI2SK")?.to_string();
                let id = get_s(item, "PK")?.trim_start_matches("TASK#").to_string();
                due.push((at, id));
            }
        }
        due.sort();
        due.truncate(limit);
        let ids: Vec<String> = due.into_iter().map(|(_, id)| id).collect();
        self.tasks_by_id(&ids).await
    }

    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task> {
        // Optimistic concurrency: read, apply the state machine, write conditioned on the
        // version read; on a lost race read again. State rules never depend on this loop.
        for attempt in 0..8 {
            if attempt > 0 {
                // Lost to another writer (a newer version, or an ongoing transaction on the
                // task or its account shard): spread the retries out.
                backoff(attempt - 1).await;
            }
            let mut task = self.task(task_id).await?.ok_or(PortError::NotFound)?;
            let expected = task.version;
            let applied = apply(&mut task, transition, Utc::now())?;
            if task.version == expected {
                return Ok(task);
            }
            if self.write_task(&task, expected, applied).await? {
                return Ok(task);
            }
        }
        Err(PortError::unavailable(format!(
            "task {task_id} kept changing; gave up after 8 attempts"
        )))
    }
}
