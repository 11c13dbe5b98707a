//! The AWS adapters (DynamoDB task store, SQS work queue, S3 blob store) through the real
//! `aws-sdk-*` clients against an AWS emulator on loopback (moto; `scripts/test.sh` starts it
//! and sets `AWS_ENDPOINT_URL`). Every test provisions its own table, queues and bucket.
//!
//! Failure modes the emulator cannot produce (an unreachable endpoint, a throttling service)
//! come from a closed loopback port and from a tiny loopback server that answers every request
//! with the service's own throttling response.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_sqs::types::QueueAttributeName;
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use tasklane_aws::dynamo::{DynamoStore, MAX_SHARDS};
use tasklane_aws::s3::S3Blobs;
use tasklane_aws::settings::SdkTimeouts;
use tasklane_aws::sqs::SqsQueue;
use tasklane_aws::{AwsBackends, AwsSettings};
use tasklane_core::account::{Account, hash_api_key};
use tasklane_core::api::Api;
use tasklane_core::ports::{
    BlobStore, ChunkIter, Delivery, IdempotencyClaim, ListQuery, MessageSource, PortError,
    PortResult, Reservation, StreamRefused, TaskPage, TaskStore, WorkMessage, WorkQueue,
};
use tasklane_core::task::{Output, Task, TaskFailure, TaskStatus, Transition, TransitionError};
use tasklane_testkit::TaskBuilder;
use tasklane_testkit::dynamo_proxy::{DynamoProxy, ProxyOptions};
use tasklane_testkit::provision::{MAX_RECEIVE_COUNT, provision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// Generous bound for SQS visibility and delays to run out (the tests use 1–2 s).
const SQS_DEADLINE: Duration = Duration::from_secs(25);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// The emulator's configuration. Refuses to run without `AWS_ENDPOINT_URL`, so these tests
/// never talk to a real AWS account.
async fn sdk_config() -> SdkConfig {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "the AWS adapter tests need an emulator: set AWS_ENDPOINT_URL (scripts/test.sh starts moto)"
    );
    aws_config::load_defaults(BehaviorVersion::latest()).await
}

/// A short unique resource prefix (bucket names: lowercase, at most 63 characters).
fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "aa-{tag}-{:x}{:x}{}",
        nanos & 0xffff_ffff_ffff,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Freshly provisioned resources and the adapters connected to them.
struct Env {
    config: SdkConfig,
    prefix: String,
    settings: AwsSettings,
    backends: AwsBackends,
}

impl Env {
    fn store(&self) -> &DynamoStore {
        &self.backends.store
    }
    fn queue(&self) -> &SqsQueue {
        &self.backends.queue
    }
}

async fn env(tag: &str) -> Env {
    let config = sdk_config().await;
    let prefix = unique_prefix(tag);
    let settings = provision(&config, &prefix)
        .await
        .expect("provisioning on the AWS emulator");
    let backends = AwsBackends::connect(&settings).await;
    Env {
        config,
        prefix,
        settings,
        backends,
    }
}

async fn open_account(store: &DynamoStore, credits: u64) -> Account {
    let account = Account::create(credits, None).account;
    store.create_account(&account).await.unwrap();
    account
}

/// `(credits, granted)` as stored.
async fn balance(store: &DynamoStore, account_id: &str) -> (u64, u64) {
    let a = store.account(account_id).await.unwrap().expect("account");
    (a.credits, a.granted)
}

/// Task ids that sort by creation order within this test binary.
fn new_task_id() -> String {
    static IDS: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());
    format!("task_{}", IDS.lock().unwrap().generate().unwrap())
}

fn queued_task(account_id: &str, credits: u64, model: &str) -> Task {
    TaskBuilder::echo(account_id)
        .id(new_task_id())
        .model(model)
        .prompt("a lighthouse at dusk")
        .credits(credits)
        .build()
}

/// A task for `account` stored (and paid for) through `insert_task`.
async fn submitted(store: &DynamoStore, account: &Account, credits: u64) -> Task {
    let task = queued_task(&account.id, credits, "echo");
    store.insert_task(&task, None, u64::MAX).await.unwrap();
    task
}

fn reserved_token(r: Reservation) -> String {
    match r {
        Reservation::Reserved { token } => token,
        other => panic!("expected the key to be reserved, got {other:?}"),
    }
}

fn start(lease: TimeDelta) -> Transition {
    Transition::Start {
        lease_until: Utc::now() + lease,
    }
}

fn fail(attempt: Option<u32>) -> Transition {
    Transition::Fail {
        attempt,
        error: TaskFailure {
            code: "generation_failed".into(),
            message: "the model gave up".into(),
        },
    }
}

fn run(task_id: &str) -> WorkMessage {
    WorkMessage::Run {
        task_id: task_id.to_string(),
    }
}

/// Runs `n` copies of `transition` on one task at once (released together by a barrier).
async fn race(
    store: &DynamoStore,
    task_id: &str,
    transition: Transition,
    n: usize,
) -> Vec<PortResult<Task>> {
    let barrier = Arc::new(Barrier::new(n));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (store, id, t, barrier) = (
            store.clone(),
            task_id.to_string(),
            transition.clone(),
            barrier.clone(),
        );
        set.spawn(async move {
            barrier.wait().await;
            store.update_task(&id, &t).await
        });
    }
    set.join_all().await
}

// ---------------------------------------------------------------------------------------------
// DynamoStore: submit (insert_task) and idempotency records
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn submit_debits_the_credits_in_the_same_write_that_stores_the_task() {
    let env = env("debit").await;
    let store = env.store();
    let account = open_account(store, 10).await;

    let task = queued_task(&account.id, 4, "echo");
    store.insert_task(&task, None, u64::MAX).await.unwrap();

    assert_eq!(store.task(&task.id).await.unwrap().as_ref(), Some(&task));
    assert_eq!(balance(store, &account.id).await, (6, 10));

    // A second insert of the same task fails as a whole: the debit is rolled back with it.
    let again = store.insert_task(&task, None, u64::MAX).await;
    assert!(matches!(again, Err(PortError::Internal(_))), "{again:?}");
    assert_eq!(balance(store, &account.id).await, (6, 10));
}

#[tokio::test]
async fn submit_with_too_few_credits_writes_nothing_and_reports_the_balance() {
    let env = env("poor").await;
    let store = env.store();
    let account = open_account(store, 3).await;
    let now = Utc::now();
    let token = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-poor", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );

    let task = queued_task(&account.id, 5, "echo");
    let claim = IdempotencyClaim {
        key: "k-poor".into(),
        token,
    };
    let res = store.insert_task(&task, Some(&claim), u64::MAX).await;

    assert!(
        matches!(res, Err(PortError::InsufficientCredits { available: 3 })),
        "{res:?}"
    );
    assert_eq!(store.task(&task.id).await.unwrap(), None);
    assert_eq!(balance(store, &account.id).await, (3, 3));
    // The idempotency record was not completed either.
    let r = store
        .reserve_idempotency(&account.id, "k-poor", "hash-a", now, MINUTE, DAY)
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::InProgress {
            request_hash: "hash-a".into()
        }
    );
}

#[tokio::test]
async fn submit_for_an_unknown_account_is_not_found_and_stores_nothing() {
    let env = env("noacct").await;
    let store = env.store();
    let task = queued_task("acct_does_not_exist", 1, "echo");
    let res = store.insert_task(&task, None, u64::MAX).await;
    assert!(matches!(res, Err(PortError::NotFound)), "{res:?}");
    assert_eq!(store.task(&task.id).await.unwrap(), None);
}

#[tokio::test]
async fn a_claim_with_the_wrong_token_is_reservation_lost_and_writes_nothing() {
    let env = env("wrongtok").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let now = Utc::now();
    reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );

    let task = queued_task(&account.id, 4, "echo");
    let wrong = IdempotencyClaim {
        key: "k-1".into(),
        token: "not-the-token".into(),
    };
    let res = store.insert_task(&task, Some(&wrong), u64::MAX).await;
    assert!(matches!(res, Err(PortError::ReservationLost)), "{res:?}");
    assert_eq!(store.task(&task.id).await.unwrap(), None);
    assert_eq!(balance(store, &account.id).await, (10, 10));

    // A claim on a key that was never reserved is lost just the same.
    let never = IdempotencyClaim {
        key: "k-never-reserved".into(),
        token: "any".into(),
    };
    let res = store.insert_task(&task, Some(&never), u64::MAX).await;
    assert!(matches!(res, Err(PortError::ReservationLost)), "{res:?}");
    assert_eq!(store.task(&task.id).await.unwrap(), None);
    assert_eq!(balance(store, &account.id).await, (10, 10));

    // The real reservation is untouched: still in progress for the first request.
    let r = store
        .reserve_idempotency(&account.id, "k-1", "hash-b", now, MINUTE, DAY)
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::InProgress {
            request_hash: "hash-a".into()
        }
    );
}

#[tokio::test]
async fn an_idempotency_key_goes_from_reserved_to_in_progress_to_completed() {
    let env = env("idem").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let now = Utc::now();

    let token = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );

    // Same key while the first request is in flight: in progress, with the first request's hash.
    let r = store
        .reserve_idempotency(
            &account.id,
            "k-1",
            "hash-b",
            now + TimeDelta::seconds(1),
            MINUTE,
            DAY,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::InProgress {
            request_hash: "hash-a".into()
        }
    );

    let task = queued_task(&account.id, 4, "echo");
    let claim = IdempotencyClaim {
        key: "k-1".into(),
        token,
    };
    store
        .insert_task(&task, Some(&claim), u64::MAX)
        .await
        .unwrap();

    let completed = Reservation::Completed {
        request_hash: "hash-a".into(),
        task_id: task.id.clone(),
    };
    let r = store
        .reserve_idempotency(
            &account.id,
            "k-1",
            "hash-a",
            now + TimeDelta::seconds(2),
            MINUTE,
            DAY,
        )
        .await
        .unwrap();
    assert_eq!(r, completed);

    // A completed record is not taken over when `in_flight` has passed, only when `retain` has.
    let r = store
        .reserve_idempotency(
            &account.id,
            "k-1",
            "hash-a",
            now + TimeDelta::hours(2),
            MINUTE,
            DAY,
        )
        .await
        .unwrap();
    assert_eq!(r, completed);

    // Keys are per account.
    let other = open_account(store, 1).await;
    let r = store
        .reserve_idempotency(&other.id, "k-1", "hash-a", now, MINUTE, DAY)
        .await
        .unwrap();
    assert!(matches!(r, Reservation::Reserved { .. }), "{r:?}");
}

#[tokio::test]
async fn an_abandoned_reservation_is_taken_over_once_in_flight_has_passed() {
    let env = env("takeover").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let now = Utc::now();

    let first = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );
    let r = store
        .reserve_idempotency(
            &account.id,
            "k-1",
            "hash-a",
            now + TimeDelta::seconds(30),
            MINUTE,
            DAY,
        )
        .await
        .unwrap();
    assert!(matches!(r, Reservation::InProgress { .. }), "{r:?}");

    let second = reserved_token(
        store
            .reserve_idempotency(
                &account.id,
                "k-1",
                "hash-b",
                now + TimeDelta::seconds(61),
                MINUTE,
                DAY,
            )
            .await
            .unwrap(),
    );
    assert_ne!(first, second);

    // The first request comes back late: its claim is no longer good, and nothing is written.
    let late = queued_task(&account.id, 4, "echo");
    let res = store
        .insert_task(
            &late,
            Some(&IdempotencyClaim {
                key: "k-1".into(),
                token: first,
            }),
            u64::MAX,
        )
        .await;
    assert!(matches!(res, Err(PortError::ReservationLost)), "{res:?}");
    assert_eq!(store.task(&late.id).await.unwrap(), None);
    assert_eq!(balance(store, &account.id).await, (10, 10));

    let task = queued_task(&account.id, 4, "echo");
    store
        .insert_task(
            &task,
            Some(&IdempotencyClaim {
                key: "k-1".into(),
                token: second,
            }),
            u64::MAX,
        )
        .await
        .unwrap();
    let r = store
        .reserve_idempotency(
            &account.id,
            "k-1",
            "hash-b",
            now + TimeDelta::seconds(62),
            MINUTE,
            DAY,
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::Completed {
            request_hash: "hash-b".into(),
            task_id: task.id
        }
    );
}

#[tokio::test]
async fn an_expired_idempotency_record_is_reserved_afresh() {
    let env = env("expired").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let now = Utc::now();

    let token = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );
    let task = queued_task(&account.id, 4, "echo");
    store
        .insert_task(
            &task,
            Some(&IdempotencyClaim {
                key: "k-1".into(),
                token: token.clone(),
            }),
            u64::MAX,
        )
        .await
        .unwrap();

    // `retain` has elapsed (DynamoDB's TTL deletes lazily; the record may still be there).
    let later = now + TimeDelta::from_std(DAY).unwrap() + TimeDelta::seconds(1);
    let fresh = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-b", later, MINUTE, DAY)
            .await
            .unwrap(),
    );
    assert_ne!(fresh, token);
    let r = store
        .reserve_idempotency(&account.id, "k-1", "hash-c", later, MINUTE, DAY)
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::InProgress {
            request_hash: "hash-b".into()
        }
    );
}

#[tokio::test]
async fn release_frees_the_key_only_for_the_right_token() {
    let env = env("release").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let now = Utc::now();

    let token = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-a", now, MINUTE, DAY)
            .await
            .unwrap(),
    );

    store
        .release_idempotency(&account.id, "k-1", "not-the-token")
        .await
        .unwrap();
    let r = store
        .reserve_idempotency(&account.id, "k-1", "hash-b", now, MINUTE, DAY)
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::InProgress {
            request_hash: "hash-a".into()
        }
    );

    store
        .release_idempotency(&account.id, "k-1", &token)
        .await
        .unwrap();
    let again = reserved_token(
        store
            .reserve_idempotency(&account.id, "k-1", "hash-b", now, MINUTE, DAY)
            .await
            .unwrap(),
    );

    // A completed record is not released, even with its own token.
    let task = queued_task(&account.id, 4, "echo");
    store
        .insert_task(
            &task,
            Some(&IdempotencyClaim {
                key: "k-1".into(),
                token: again.clone(),
            }),
            u64::MAX,
        )
        .await
        .unwrap();
    store
        .release_idempotency(&account.id, "k-1", &again)
        .await
        .unwrap();
    let r = store
        .reserve_idempotency(&account.id, "k-1", "hash-b", now, MINUTE, DAY)
        .await
        .unwrap();
    assert_eq!(
        r,
        Reservation::Completed {
            request_hash: "hash-b".into(),
            task_id: task.id
        }
    );
}

// ---------------------------------------------------------------------------------------------
// DynamoStore: update_task (conditional writes, refunds in the same transaction)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cancel_refunds_in_the_same_write_and_a_second_cancel_changes_nothing() {
    let env = env("cancel").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;
    assert_eq!(balance(store, &account.id).await, (6, 10));

    let cancelled = store
        .update_task(&task.id, &Transition::Cancel)
        .await
        .unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert!(cancelled.cost.refunded);
    assert_eq!(cancelled.version, task.version + 1);
    assert_eq!(
        store.task(&task.id).await.unwrap().as_ref(),
        Some(&cancelled)
    );
    assert_eq!(balance(store, &account.id).await, (10, 10));

    let again = store
        .update_task(&task.id, &Transition::Cancel)
        .await
        .unwrap();
    assert_eq!(again, cancelled);
    assert_eq!(
        store.task(&task.id).await.unwrap().as_ref(),
        Some(&cancelled)
    );
    assert_eq!(balance(store, &account.id).await, (10, 10));
}

#[tokio::test]
async fn cancel_of_a_processing_task_is_rejected_as_not_cancellable() {
    let env = env("cancelproc").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;
    let started = store
        .update_task(&task.id, &start(TimeDelta::minutes(1)))
        .await
        .unwrap();

    let res = store.update_task(&task.id, &Transition::Cancel).await;
    assert!(
        matches!(
            res,
            Err(PortError::Rejected(TransitionError::NotCancellable(
                TaskStatus::Processing
            )))
        ),
        "{res:?}"
    );
    assert_eq!(store.task(&task.id).await.unwrap().as_ref(), Some(&started));
    assert_eq!(balance(store, &account.id).await, (6, 10));
}

#[tokio::test]
async fn an_unknown_task_cannot_be_updated() {
    let env = env("unknowntask").await;
    let res = env
        .store()
        .update_task(&new_task_id(), &Transition::Cancel)
        .await;
    assert!(matches!(res, Err(PortError::NotFound)), "{res:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_cancels_all_succeed_and_refund_exactly_once() {
    let env = env("cancelrace").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;

    let results = race(store, &task.id, Transition::Cancel, 20).await;

    for r in &results {
        match r {
            Ok(t) => assert_eq!(t.status, TaskStatus::Cancelled),
            Err(e) => panic!("a concurrent cancel failed: {e:?}"),
        }
    }
    let stored = store.task(&task.id).await.unwrap().unwrap();
    assert_eq!(stored.status, TaskStatus::Cancelled);
    assert_eq!(stored.version, task.version + 1);
    assert_eq!(balance(store, &account.id).await, (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_ten_workers_starting_a_task_at_once_exactly_one_gets_the_lease() {
    let env = env("startrace").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;

    let results = race(store, &task.id, start(TimeDelta::minutes(5)), 10).await;

    let winners: Vec<&Task> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(winners[0].status, TaskStatus::Processing);
    assert_eq!(winners[0].attempts, 1);
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(
            matches!(r, Err(PortError::Rejected(TransitionError::LeaseHeld))),
            "{r:?}"
        );
    }
    let stored = store.task(&task.id).await.unwrap().unwrap();
    assert_eq!(&stored, winners[0]);
}

#[tokio::test]
async fn a_complete_for_a_stale_attempt_is_rejected() {
    let env = env("stale").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;

    // Attempt 1 takes a lease that has already run out (its worker died)…
    let first = store
        .update_task(&task.id, &start(TimeDelta::seconds(-1)))
        .await
        .unwrap();
    assert_eq!(first.attempts, 1);
    // …so attempt 2 takes the task over.
    let second = store
        .update_task(&task.id, &start(TimeDelta::minutes(5)))
        .await
        .unwrap();
    assert_eq!(second.attempts, 2);

    let output = Output {
        key: format!("{}/out.txt", task.id),
        content_type: "text/plain".into(),
        size_bytes: 5,
    };
    let res = store
        .update_task(
            &task.id,
            &Transition::Complete {
                attempt: 1,
                outputs: vec![output.clone()],
            },
        )
        .await;
    assert!(
        matches!(res, Err(PortError::Rejected(TransitionError::StaleAttempt))),
        "{res:?}"
    );
    assert_eq!(store.task(&task.id).await.unwrap().as_ref(), Some(&second));

    let done = store
        .update_task(
            &task.id,
            &Transition::Complete {
                attempt: 2,
                outputs: vec![output.clone()],
            },
        )
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Completed);
    assert_eq!(done.outputs, vec![output]);
    assert_eq!(balance(store, &account.id).await, (6, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_racing_failures_refund_exactly_once() {
    let env = env("failrace").await;
    let store = env.store();
    let account = open_account(store, 10).await;
    let task = submitted(store, &account, 4).await;
    store
        .update_task(&task.id, &start(TimeDelta::minutes(5)))
        .await
        .unwrap();

    let results = race(store, &task.id, fail(Some(1)), 10).await;

    let winners: Vec<&Task> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    assert_eq!(winners[0].status, TaskStatus::Failed);
    assert!(winners[0].cost.refunded);
    for r in results.iter().filter(|r| r.is_err()) {
        assert!(
            matches!(
                r,
                Err(PortError::Rejected(TransitionError::WrongState(
                    TaskStatus::Failed
                )))
            ),
            "{r:?}"
        );
    }
    assert_eq!(balance(store, &account.id).await, (10, 10));

    // A later failure without an attempt changes nothing and refunds nothing.
    let res = store.update_task(&task.id, &fail(None)).await;
    assert!(res.is_err(), "{res:?}");
    assert_eq!(balance(store, &account.id).await, (10, 10));
}

// ---------------------------------------------------------------------------------------------
// DynamoStore: list_tasks
// ---------------------------------------------------------------------------------------------

/// Every page of `query` (its `before` is followed from `None`), as ids.
async fn all_pages(store: &DynamoStore, account_id: &str, query: &ListQuery) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let q = ListQuery {
            before: before.clone(),
            ..query.clone()
        };
        let TaskPage { tasks, next_before } = store.list_tasks(account_id, &q).await.unwrap();
        assert!(tasks.len() <= query.limit, "page larger than the limit");
        assert!(
            tasks.iter().all(|t| t.account_id == account_id),
            "another account's task was listed"
        );
        pages.push(tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>());
        match next_before {
            Some(b) => {
                // The last id of a full page, or (a filtered page that stopped at its read
                // budget) the last one read, which is older: never newer than the page's last.
                if let Some(last) = tasks.last() {
                    assert!(
                        b <= last.id,
                        "cursor {b} is newer than the page's last {}",
                        last.id
                    );
                }
                if tasks.len() == query.limit && query.status.is_none() && query.model.is_none() {
                    assert_eq!(
                        Some(&b),
                        tasks.last().map(|t| &t.id),
                        "cursor is the last id"
                    );
                }
                before = Some(b);
            }
            None => break,
        }
        assert!(pages.len() <= 100, "paging does not end");
    }
    pages
}

/// Checks `pages` cover `expected` (newest first) once each, in full pages but the last.
fn assert_pages_cover(pages: &[Vec<String>], expected: &[String], limit: usize) {
    let flat: Vec<String> = pages.concat();
    assert_eq!(flat, expected);
    let distinct: HashSet<&String> = flat.iter().collect();
    assert_eq!(distinct.len(), flat.len(), "a task was listed twice");
    let (last, full) = pages.split_last().unwrap();
    assert!(full.iter().all(|p| p.len() == limit), "{pages:?}");
    assert!(last.len() <= limit);
    assert!(!last.is_empty() || expected.is_empty(), "{pages:?}");
}

#[tokio::test]
async fn tasks_are_listed_newest_first_and_pages_cover_each_task_once() {
    let env = env("list").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    let other = open_account(store, 100).await;

    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(submitted(store, &account, 1).await.id);
        if i % 3 == 0 {
            submitted(store, &other, 1).await;
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let first = store
        .list_tasks(
            &account.id,
            &ListQuery {
                limit: 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        first.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        newest_first[..5]
    );

    for limit in [7, 10, 1] {
        let q = ListQuery {
            limit,
            ..Default::default()
        };
        let pages = all_pages(store, &account.id, &q).await;
        assert_pages_cover(&pages, &newest_first, limit);
    }

    // A page that ends exactly at the oldest task has no cursor.
    let whole = store
        .list_tasks(
            &account.id,
            &ListQuery {
                limit: 30,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(whole.tasks.len(), 30);
    assert_eq!(whole.next_before, None);

    // The other account sees its own ten tasks only.
    let theirs = all_pages(
        store,
        &other.id,
        &ListQuery {
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .concat();
    assert_eq!(theirs.len(), 10);
    assert!(theirs.iter().all(|id| !ids.contains(id)));
}

#[tokio::test]
async fn status_and_model_filters_apply_across_dynamodb_pages() {
    let env = env("filter").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    let other = open_account(store, 100).await;

    // 30 tasks: every 5th is a demo-image task, every 5th (another offset) is cancelled, and
    // the oldest is both. The other account's tasks would match every filter.
    let mut tasks: Vec<(String, String, TaskStatus)> = Vec::new();
    for i in 0..30 {
        let model = if i % 5 == 0 { "demo-image" } else { "echo" };
        let task = queued_task(&account.id, 1, model);
        store.insert_task(&task, None, u64::MAX).await.unwrap();
        let mut status = TaskStatus::Queued;
        if i % 5 == 2 || i == 0 {
            store
                .update_task(&task.id, &Transition::Cancel)
                .await
                .unwrap();
            status = TaskStatus::Cancelled;
        }
        tasks.push((task.id, model.to_string(), status));

        let theirs = queued_task(&other.id, 1, "demo-image");
        store.insert_task(&theirs, None, u64::MAX).await.unwrap();
        store
            .update_task(&theirs.id, &Transition::Cancel)
            .await
            .unwrap();
    }
    let expect = |keep: &dyn Fn(&(String, String, TaskStatus)) -> bool| -> Vec<String> {
        tasks
            .iter()
            .rev()
            .filter(|t| keep(t))
            .map(|t| t.0.clone())
            .collect()
    };

    let by_model = ListQuery {
        model: Some("demo-image".into()),
        limit: 2,
        ..Default::default()
    };
    let want = expect(&|t| t.1 == "demo-image");
    assert_eq!(want.len(), 6);
    assert_pages_cover(&all_pages(store, &account.id, &by_model).await, &want, 2);

    let by_status = ListQuery {
        status: Some(TaskStatus::Cancelled),
        limit: 2,
        ..Default::default()
    };
    let want = expect(&|t| t.2 == TaskStatus::Cancelled);
    assert_eq!(want.len(), 7);
    assert_pages_cover(&all_pages(store, &account.id, &by_status).await, &want, 2);

    let queued = ListQuery {
        status: Some(TaskStatus::Queued),
        limit: 4,
        ..Default::default()
    };
    let want = expect(&|t| t.2 == TaskStatus::Queued);
    assert_eq!(want.len(), 23);
    assert_pages_cover(&all_pages(store, &account.id, &queued).await, &want, 4);

    // Both filters: only the oldest task matches, beyond what one request reads (10 per task
    // asked for): the first pages are empty with a cursor, the last holds it.
    let mut both = ListQuery {
        status: Some(TaskStatus::Cancelled),
        model: Some("demo-image".into()),
        limit: 1,
        ..Default::default()
    };
    let mut found = Vec::new();
    let mut requests = 0;
    loop {
        let page = store.list_tasks(&account.id, &both).await.unwrap();
        requests += 1;
        found.extend(page.tasks.iter().map(|t| t.id.clone()));
        match page.next_before {
            Some(b) => both.before = Some(b),
            None => break,
        }
        assert!(requests <= 30, "the cursors do not end");
    }
    assert_eq!(found, vec![tasks[0].0.clone()]);
    assert_eq!(requests, 3, "30 tasks, 10 read per request");

    // No match at all: empty pages, the last without a cursor.
    let none = ListQuery {
        model: Some("veo3".into()),
        limit: 3,
        ..Default::default()
    };
    let pages = all_pages(store, &account.id, &none).await;
    assert!(pages.iter().all(Vec::is_empty), "{pages:?}");
}

// ---------------------------------------------------------------------------------------------
// DynamoStore: accounts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn grant_credits_adds_to_credits_and_to_granted() {
    let env = env("grant").await;
    let store = env.store();
    let account = open_account(store, 5).await;
    submitted(store, &account, 2).await;

    let after = store.grant_credits(&account.id, 7).await.unwrap();
    assert_eq!((after.credits, after.granted), (10, 12));
    assert_eq!(store.account(&account.id).await.unwrap(), Some(after));

    let res = store.grant_credits("acct_does_not_exist", 7).await;
    assert!(matches!(res, Err(PortError::NotFound)), "{res:?}");
    assert_eq!(store.account("acct_does_not_exist").await.unwrap(), None);
}

#[tokio::test]
async fn a_rotated_key_hash_finds_the_account_and_the_old_one_no_longer_does() {
    let env = env("rotate").await;
    let store = env.store();
    let account = open_account(store, 5).await;
    assert_eq!(
        store.account_by_key_hash(&account.key_hash).await.unwrap(),
        Some(account.clone())
    );

    let new_hash = hash_api_key("tl_the_rotated_key");
    store.set_key_hash(&account.id, &new_hash).await.unwrap();

    assert_eq!(
        store.account_by_key_hash(&account.key_hash).await.unwrap(),
        None
    );
    let found = store.account_by_key_hash(&new_hash).await.unwrap().unwrap();
    assert_eq!(found.id, account.id);
    assert_eq!(found.key_hash, new_hash);
    assert_eq!(store.account(&account.id).await.unwrap(), Some(found));

    let res = store.set_key_hash("acct_does_not_exist", &new_hash).await;
    assert!(matches!(res, Err(PortError::NotFound)), "{res:?}");
    assert_eq!(
        store
            .account_by_key_hash(&hash_api_key("tl_nobody_has_this_key"))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_key_hash_belongs_to_one_account_at_creation_and_at_rotation() {
    let env = env("keyuniq").await;
    let store = env.store();
    let first = open_account(store, 5).await;
    let second = open_account(store, 7).await;

    // A new account with a key another account holds is refused, and nothing is stored.
    let mut clash = Account::create(9, None).account;
    clash.key_hash = first.key_hash.clone();
    assert!(store.create_account(&clash).await.is_err());
    assert_eq!(store.account(&clash.id).await.unwrap(), None);

    // Rotating onto another account's key is refused; both keys keep answering as before.
    assert!(
        store
            .set_key_hash(&second.id, &first.key_hash)
            .await
            .is_err()
    );
    let by_first = store.account_by_key_hash(&first.key_hash).await.unwrap();
    assert_eq!(by_first.map(|a| a.id), Some(first.id.clone()));
    let by_second = store.account_by_key_hash(&second.key_hash).await.unwrap();
    assert_eq!(by_second.map(|a| a.id), Some(second.id.clone()));

    // A rotation releases the old key: a new account may then hold it.
    store
        .set_key_hash(&first.id, &hash_api_key("tl_first_rotated"))
        .await
        .unwrap();
    let mut reuse = Account::create(1, None).account;
    reuse.key_hash = first.key_hash.clone();
    store.create_account(&reuse).await.unwrap();
    let found = store.account_by_key_hash(&first.key_hash).await.unwrap();
    assert_eq!(found.map(|a| a.id), Some(reuse.id));
}

// ---------------------------------------------------------------------------------------------
// SqsQueue
// ---------------------------------------------------------------------------------------------

/// `(visible, in flight, delayed)` messages as SQS counts them.
async fn queue_counts(config: &SdkConfig, url: &str) -> (u64, u64, u64) {
    let attrs = aws_sdk_sqs::Client::new(config)
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap_or_default();
    let get = |n: QueueAttributeName| {
        attrs
            .get(&n)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {n:?} in {attrs:?}"))
    };
    (
        get(QueueAttributeName::ApproximateNumberOfMessages),
        get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    )
}

/// Whether a short poll (no waiting) of the queue returns any message.
async fn anything_visible(config: &SdkConfig, url: &str) -> bool {
    let out = aws_sdk_sqs::Client::new(config)
        .receive_message()
        .queue_url(url)
        .wait_time_seconds(0)
        .visibility_timeout(0)
        .send()
        .await
        .unwrap();
    !out.messages().is_empty()
}

/// Receives from `source` until something arrives; panics after [`SQS_DEADLINE`].
async fn receive_soon(source: &dyn MessageSource, visibility: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + SQS_DEADLINE;
    loop {
        let got = source.receive(10, visibility).await.unwrap();
        if !got.is_empty() {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message within {SQS_DEADLINE:?}"
        );
    }
}

#[tokio::test]
async fn an_enqueued_message_is_received_and_ack_removes_it() {
    let env = env("sqsack").await;
    let queue = env.queue();
    queue
        .enqueue(&run("task_one"), Duration::ZERO)
        .await
        .unwrap();

    let got = receive_soon(queue, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message, Some(run("task_one")));
    assert_eq!(got[0].receive_count, 1);
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 1, 0));

    queue.ack(&got[0]).await.unwrap();
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 0, 0));
}

#[tokio::test]
async fn a_body_that_is_not_a_work_message_is_delivered_as_poison() {
    let env = env("sqspoison").await;
    aws_sdk_sqs::Client::new(&env.config)
        .send_message()
        .queue_url(env.queue().url())
        .message_body("{not json")
        .send()
        .await
        .unwrap();
    let got = receive_soon(env.queue(), Duration::from_secs(30)).await;
    assert_eq!(got[0].message, None);
    env.queue().ack(&got[0]).await.unwrap();
}

#[tokio::test]
async fn retry_hides_a_message_then_it_comes_back_received_twice() {
    let env = env("sqsretry").await;
    let queue = env.queue();
    queue
        .enqueue(&run("task_two"), Duration::ZERO)
        .await
        .unwrap();

    // Received with a long visibility, then retried with a short delay.
    let got = receive_soon(queue, Duration::from_secs(60)).await;
    assert_eq!(got[0].receive_count, 1);
    queue.retry(&got[0], Duration::from_secs(2)).await.unwrap();

    assert!(!anything_visible(&env.config, queue.url()).await);
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 1, 0));

    // Back well before the 60 s visibility of the first receive would have ended.
    let again = receive_soon(queue, Duration::from_secs(60)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message, Some(run("task_two")));
    assert_eq!(again[0].receive_count, 2);
    queue.ack(&again[0]).await.unwrap();
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 0, 0));
}

#[tokio::test]
async fn a_delayed_message_is_not_received_before_its_delay() {
    let env = env("sqsdelay").await;
    let queue = env.queue();
    queue
        .enqueue(&run("task_later"), Duration::from_secs(2))
        .await
        .unwrap();

    assert!(!anything_visible(&env.config, queue.url()).await);
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 0, 1));

    let got = receive_soon(queue, Duration::from_secs(30)).await;
    assert_eq!(got[0].message, Some(run("task_later")));
    assert_eq!(got[0].receive_count, 1);
}

#[tokio::test]
async fn a_message_never_acked_moves_to_the_dead_letter_queue_after_max_receive_count() {
    let env = env("sqsdlq").await;
    let queue = env.queue();
    let sqs = aws_sdk_sqs::Client::new(&env.config);
    let dlq_url = sqs
        .get_queue_url()
        .queue_name(format!("{}-work-dlq", env.prefix))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let dlq = SqsQueue::new(sqs, dlq_url);
    queue
        .enqueue(&run("task_poison"), Duration::ZERO)
        .await
        .unwrap();

    // A worker that dies each time: received, never acked, visible again after 1 s.
    for n in 1..=MAX_RECEIVE_COUNT {
        let got = receive_soon(queue, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].receive_count, n);
    }

    // The next receive moves it to the dead-letter queue instead of delivering it.
    let deadline = tokio::time::Instant::now() + SQS_DEADLINE;
    let dead = loop {
        let got = queue.receive(10, Duration::from_secs(1)).await.unwrap();
        assert!(got.is_empty(), "received beyond MAX_RECEIVE_COUNT: {got:?}");
        let dead = dlq.receive(10, Duration::from_secs(30)).await.unwrap();
        if !dead.is_empty() {
            break dead;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing reached the DLQ"
        );
    };
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message, Some(run("task_poison")));
    assert_eq!(queue_counts(&env.config, queue.url()).await, (0, 0, 0));
}

// ---------------------------------------------------------------------------------------------
// S3Blobs
// ---------------------------------------------------------------------------------------------

/// The query parameters of a presigned URL.
fn query_of(url: &str) -> std::collections::HashMap<String, String> {
    reqwest::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn x_amz_date(q: &std::collections::HashMap<String, String>) -> DateTime<Utc> {
    NaiveDateTime::parse_from_str(&q["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        .unwrap()
        .and_utc()
}

fn x_amz_expires(q: &std::collections::HashMap<String, String>) -> i64 {
    q["X-Amz-Expires"].parse().unwrap()
}

#[tokio::test]
async fn a_stored_blob_downloads_through_its_presigned_url() {
    let env = env("s3get").await;
    let blobs = &env.backends.blobs;
    let bytes = Bytes::from_static(b"\x89PNG\r\n\x1a\n not really a picture");
    blobs
        .put("task_x/out.png", bytes.clone(), "image/png")
        .await
        .unwrap();
    // Writes are idempotent: the same put again is fine.
    blobs
        .put("task_x/out.png", bytes.clone(), "image/png")
        .await
        .unwrap();

    let signed = blobs
        .presign_get("task_x/out.png", Duration::from_secs(300))
        .await
        .unwrap();
    let resp = reqwest::get(&signed.url).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert_eq!(resp.bytes().await.unwrap(), bytes);
}

/// `len` bytes that differ from one position to the next (a misplaced part shows).
fn streamed_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4099) as u8).collect()
}

/// `data` in chunks of `size` bytes, as an output's download yields them.
fn chunks_of(
    data: &[u8],
    size: usize,
) -> ChunkIter<impl Iterator<Item = Result<Bytes, String>> + Send + '_> {
    ChunkIter(data.chunks(size).map(|c| Ok(Bytes::copy_from_slice(c))))
}

/// A client on the emulator for looking behind the adapter.
fn s3_client(env: &Env) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&env.config)
            .force_path_style(true)
            .build(),
    )
}

/// The object under `key` as a presigned GET serves it: content type, ETag and bytes.
async fn served(blobs: &S3Blobs, key: &str) -> (String, String, Bytes) {
    let signed = blobs
        .presign_get(key, Duration::from_secs(300))
        .await
        .unwrap();
    let resp = reqwest::get(&signed.url).await.unwrap();
    assert_eq!(resp.status(), 200, "{key}");
    let header = |n: &str| {
        resp.headers()[n]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    let (content_type, etag) = (header("content-type"), header("etag"));
    (content_type, etag, resp.bytes().await.unwrap())
}

/// Multipart uploads still open in the bucket of `env`.
async fn open_uploads(env: &Env) -> usize {
    s3_client(env)
        .list_multipart_uploads()
        .bucket(&env.settings.bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .len()
}

#[tokio::test]
async fn a_body_streamed_in_small_chunks_arrives_byte_identical_in_parts_or_in_one_put() {
    let env = env("s3stream").await;
    let blobs = &env.backends.blobs;
    // 20 MiB: two full parts and a short last one.
    let big = streamed_body(20 * 1024 * 1024 + 5);
    let size = blobs
        .put_stream(
            "tasks/t/output-0.mp4",
            "video/mp4",
            &mut chunks_of(&big, 65_521),
            1 << 30,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(size, big.len() as u64);
    let (content_type, etag, bytes) = served(blobs, "tasks/t/output-0.mp4").await;
    assert_eq!(content_type, "video/mp4");
    assert!(
        bytes[..] == big[..],
        "the 20 MiB object differs from the body streamed"
    );
    assert!(
        etag.ends_with("-3"),
        "a multipart upload of 3 parts: ETag {etag}"
    );

    // A body below one part is a single PutObject (its ETag has no part count).
    let small = streamed_body(100_000);
    let size = blobs
        .put_stream(
            "tasks/t/output-1.bin",
            "application/octet-stream",
            &mut chunks_of(&small, 999),
            100_000,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(size, 100_000, "a body exactly at the cap is stored");
    let (content_type, etag, bytes) = served(blobs, "tasks/t/output-1.bin").await;
    assert_eq!(content_type, "application/octet-stream");
    assert_eq!(bytes, small);
    assert!(!etag.contains('-'), "one PutObject: ETag {etag}");
    assert_eq!(open_uploads(&env).await, 0);
}

#[tokio::test]
async fn an_over_cap_or_broken_streamed_body_stores_nothing_and_leaves_no_upload_open() {
    let env = env("s3cap").await;
    let blobs = &env.backends.blobs;
    let s3 = s3_client(&env);
    let data = streamed_body(20 * 1024 * 1024);
    let exists = |key: &'static str| {
        let s3 = s3.clone();
        let bucket = env.settings.bucket.clone();
        async move {
            match s3.head_object().bucket(bucket).key(key).send().await {
                Ok(_) => true,
                Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => false,
                Err(e) => panic!("HeadObject: {e:?}"),
            }
        }
    };
    // Over the cap after two parts were sent: the upload is aborted.
    let cap = 17 * 1024 * 1024;
    let res = blobs
        .put_stream(
            "tasks/t/big.mp4",
            "video/mp4",
            &mut chunks_of(&data, 65_536),
            cap,
        )
        .await
        .unwrap();
    assert_eq!(res, Err(StreamRefused::TooBig { limit: cap }));
    assert!(!exists("tasks/t/big.mp4").await, "nothing stored");
    assert_eq!(
        open_uploads(&env).await,
        0,
        "the multipart upload was aborted"
    );

    // Over the cap within the first part: nothing was ever sent.
    let res = blobs
        .put_stream(
            "tasks/t/small.bin",
            "video/mp4",
            &mut chunks_of(&data[..1000], 100),
            999,
        )
        .await
        .unwrap();
    assert_eq!(res, Err(StreamRefused::TooBig { limit: 999 }));
    assert!(!exists("tasks/t/small.bin").await, "nothing stored");

    // Broken off after a part was sent: aborted too.
    let mut broken = ChunkIter(
        data[..9 * 1024 * 1024]
            .chunks(65_536)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .chain([Err("connection lost".to_string())]),
    );
    let res = blobs
        .put_stream("tasks/t/broken.mp4", "video/mp4", &mut broken, 1 << 30)
        .await
        .unwrap();
    assert_eq!(res, Err(StreamRefused::Broken("connection lost".into())));
    assert!(!exists("tasks/t/broken.mp4").await, "nothing stored");
    assert_eq!(
        open_uploads(&env).await,
        0,
        "the multipart upload was aborted"
    );
}

#[tokio::test]
async fn the_presigned_url_carries_the_requested_lifetime() {
    let env = env("s3ttl").await;
    let blobs = &env.backends.blobs;
    blobs
        .put("k/a.txt", Bytes::from_static(b"hello"), "text/plain")
        .await
        .unwrap();
    let ttl = Duration::from_secs(900);

    let before = Utc::now();
    let signed = blobs.presign_get("k/a.txt", ttl).await.unwrap();
    let after = Utc::now();

    let q = query_of(&signed.url);
    assert_eq!(q["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
    assert_eq!(x_amz_expires(&q), 900);
    assert!(
        q["X-Amz-SignedHeaders"].split(';').any(|h| h == "host"),
        "{q:?}"
    );
    assert!(!q["X-Amz-Signature"].is_empty());
    assert!(q["X-Amz-Credential"].starts_with("test/"), "{q:?}");

    let ttl = TimeDelta::from_std(ttl).unwrap();
    let second = TimeDelta::seconds(1);
    // Signed now (X-Amz-Date has whole seconds), valid for the TTL from then.
    let signed_at = x_amz_date(&q);
    assert!(
        signed_at >= before - second && signed_at <= after,
        "X-Amz-Date {signed_at} is not the signing time ({before} .. {after})"
    );
    assert!(signed.expires_at >= before + ttl - second, "{signed:?}");
    assert!(signed.expires_at <= after + ttl + second, "{signed:?}");
    // The URL's own end (signing time + X-Amz-Expires) is the `expires_at` reported.
    let url_end = x_amz_date(&q) + TimeDelta::seconds(x_amz_expires(&q));
    assert!(
        (url_end - signed.expires_at).abs() <= second,
        "{url_end} vs {signed:?}"
    );
}

/// The blob store of `env`, signing with credentials that expire at `expiry`.
fn blobs_with_credentials_expiring_at(env: &Env, expiry: SystemTime) -> S3Blobs {
    let config = env
        .config
        .to_builder()
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "test",
            "test",
            None,
            Some(expiry),
            "test",
        )))
        .build();
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );
    S3Blobs::new(&config, client, &env.settings.bucket)
}

#[tokio::test]
async fn credentials_that_expire_sooner_than_the_ttl_clamp_the_url() {
    let env = env("s3clamp").await;
    env.backends
        .blobs
        .put("k/a.txt", Bytes::from_static(b"hello"), "text/plain")
        .await
        .unwrap();
    let creds_expire = SystemTime::now() + Duration::from_secs(600);
    let blobs = blobs_with_credentials_expiring_at(&env, creds_expire);
    let creds_expire: DateTime<Utc> = creds_expire.into();

    let signed = blobs
        .presign_get("k/a.txt", Duration::from_secs(3600))
        .await
        .unwrap();
    let q = query_of(&signed.url);
    let expires = x_amz_expires(&q);
    assert!(
        expires < 600,
        "X-Amz-Expires {expires} outlives the credentials"
    );
    assert!(
        expires >= 300,
        "X-Amz-Expires {expires} is clamped far too short"
    );
    assert!(
        signed.expires_at < creds_expire,
        "{signed:?} vs {creds_expire}"
    );
    let url_end = x_amz_date(&q) + TimeDelta::seconds(expires);
    assert!(url_end < creds_expire, "{url_end} vs {creds_expire}");
    // Same moment up to SigV4's whole seconds (see the next test for the exact bound).
    assert!(
        (url_end - signed.expires_at).abs() < TimeDelta::seconds(2),
        "{url_end} vs {signed:?}"
    );
    // Still a working URL.
    let resp = reqwest::get(&signed.url).await.unwrap();
    assert_eq!(resp.status(), 200);

    // A TTL shorter than the credentials' remaining life is kept as asked.
    let signed = blobs
        .presign_get("k/a.txt", Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(x_amz_expires(&query_of(&signed.url)), 120);
}

#[tokio::test]
async fn a_clamped_url_never_reports_more_life_than_it_has() {
    let env = env("s3clampend").await;
    // Credentials ending on a whole second: the clamped TTL then has a fractional part.
    let whole = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let creds_expire = SystemTime::UNIX_EPOCH + Duration::from_secs(whole + 600);
    let blobs = blobs_with_credentials_expiring_at(&env, creds_expire);

    let signed = blobs
        .presign_get("k/a.txt", Duration::from_secs(3600))
        .await
        .unwrap();
    let q = query_of(&signed.url);
    let url_end = x_amz_date(&q) + TimeDelta::seconds(x_amz_expires(&q));
    // `expires_at` is "when it stops working": at most the sub-second SigV4 cannot express.
    assert!(
        signed.expires_at - url_end < TimeDelta::seconds(1),
        "the URL stops working at {url_end} (X-Amz-Date + X-Amz-Expires) but expires_at says {}",
        signed.expires_at
    );
}

// ---------------------------------------------------------------------------------------------
// Typed errors: unreachable, throttled and missing backends
// ---------------------------------------------------------------------------------------------

/// A loopback URL nothing listens on.
fn closed_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// A loopback HTTP server that answers every request with one canned response; returns its URL.
async fn canned_server(
    status: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read the head, then the body its Content-Length announces.
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let mut resp = format!("HTTP/1.1 {status}\r\n");
                for (k, v) in headers {
                    resp.push_str(&format!("{k}: {v}\r\n"));
                }
                resp.push_str(&format!(
                    "content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                ));
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    url
}

/// A DynamoDB client for `endpoint`, without retries: the error the adapter maps is the one
/// the SDK returns once its retries are exhausted, so retrying only repeats it.
async fn dynamo_at(endpoint: &str, table: &str) -> DynamoStore {
    let config = sdk_config().await;
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&config)
            .endpoint_url(endpoint)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    DynamoStore::new(client, table)
}

async fn sqs_at(endpoint: &str) -> SqsQueue {
    let config = sdk_config().await;
    let client = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&config)
            .endpoint_url(endpoint)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    SqsQueue::new(client, format!("{endpoint}/123456789012/work"))
}

async fn s3_at(endpoint: &str) -> S3Blobs {
    let config = sdk_config().await;
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .endpoint_url(endpoint)
            .force_path_style(true)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    S3Blobs::new(&config, client, "results")
}

#[track_caller]
fn assert_unavailable<T: std::fmt::Debug>(what: &str, res: PortResult<T>) {
    assert!(
        matches!(res, Err(PortError::Unavailable(_))),
        "{what}: expected Unavailable, got {res:?}"
    );
}

#[track_caller]
fn assert_internal<T: std::fmt::Debug>(what: &str, res: PortResult<T>) {
    assert!(
        matches!(res, Err(PortError::Internal(_))),
        "{what}: expected Internal, got {res:?}"
    );
}

fn dbg<T: std::fmt::Debug>(r: PortResult<T>) -> PortResult<String> {
    r.map(|v| format!("{v:?}"))
}

/// Calls every store operation once; `check` judges each result.
async fn every_store_call(store: &DynamoStore, check: fn(&str, PortResult<String>)) {
    let account = Account::create(10, None).account;
    let task = queued_task(&account.id, 1, "echo");
    let now = Utc::now();
    check("create_account", dbg(store.create_account(&account).await));
    check("account", dbg(store.account(&account.id).await));
    check(
        "account_by_key_hash",
        dbg(store.account_by_key_hash(&account.key_hash).await),
    );
    check(
        "grant_credits",
        dbg(store.grant_credits(&account.id, 1).await),
    );
    check(
        "set_key_hash",
        dbg(store.set_key_hash(&account.id, "h").await),
    );
    check(
        "reserve_idempotency",
        dbg(store
            .reserve_idempotency(&account.id, "k", "h", now, MINUTE, DAY)
            .await),
    );
    check(
        "release_idempotency",
        dbg(store.release_idempotency(&account.id, "k", "t").await),
    );
    check(
        "insert_task",
        dbg(store.insert_task(&task, None, u64::MAX).await),
    );
    check("task", dbg(store.task(&task.id).await));
    check(
        "list_tasks",
        dbg(store
            .list_tasks(
                &account.id,
                &ListQuery {
                    limit: 10,
                    ..Default::default()
                },
            )
            .await),
    );
    check(
        "update_task",
        dbg(store.update_task(&task.id, &Transition::Cancel).await),
    );
}

#[tokio::test]
async fn an_unreachable_dynamodb_is_unavailable() {
    let store = dynamo_at(&closed_endpoint(), "tasks").await;
    every_store_call(&store, |what, res| assert_unavailable(what, res)).await;
}

#[tokio::test]
async fn an_unreachable_sqs_or_s3_is_unavailable() {
    let endpoint = closed_endpoint();
    let queue = sqs_at(&endpoint).await;
    assert_unavailable(
        "enqueue",
        queue.enqueue(&run("task_x"), Duration::ZERO).await,
    );
    assert_unavailable("receive", queue.receive(1, MINUTE).await);
    let blobs = s3_at(&endpoint).await;
    assert_unavailable(
        "put",
        blobs.put("k", Bytes::from_static(b"x"), "text/plain").await,
    );
    // A streamed write's backend failure is the port's error, not a refused body: one below
    // a part (PutObject) and one of several parts (CreateMultipartUpload).
    for len in [10, 9 * 1024 * 1024] {
        let data = streamed_body(len);
        assert_unavailable(
            "put_stream",
            blobs
                .put_stream("k", "text/plain", &mut chunks_of(&data, 65_536), 1 << 30)
                .await,
        );
    }
}

/// A loopback server that accepts every connection, reads what it is sent and never answers
/// (a connection AWS lost in the middle of a request); returns its URL.
async fn silent_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 8192];
                while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    url
}

/// The clients the functions build ([`AwsBackends::from_config`], with the timeouts
/// template.yaml gives the API functions) end a call on an endpoint that accepts and never
/// answers with `Unavailable` (a 503, or a message retried), not by hanging until Lambda
/// kills the function. The SDK's defaults bound only the connect: without the attempt and
/// operation timeouts each of these calls waits forever.
#[tokio::test]
async fn an_aws_endpoint_that_never_answers_is_unavailable_not_a_hang() {
    let endpoint = silent_endpoint().await;
    let config = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .load()
        .await;
    let settings = AwsSettings {
        table: "tasks".into(),
        queue_url: format!("{endpoint}/123456789012/work"),
        delivery_queue_url: None,
        bucket: "results".into(),
        core: tasklane_core::Config::default(),
        models: None,
    };
    let timeouts = SdkTimeouts::with_operation(Duration::from_secs(5));
    let b = AwsBackends::from_config(&settings, &config, timeouts, None);
    let account = Account::create(10, None).account;
    let task = queued_task(&account.id, 1, "echo");
    let message = run(&task.id);
    let calls = async {
        tokio::join!(
            b.store.account(&account.id),
            b.store.insert_task(&task, None, u64::MAX),
            b.queue.enqueue(&message, Duration::ZERO),
            b.blobs.put("k", Bytes::from_static(b"x"), "text/plain"),
        )
    };
    let (read, write, enqueue, put) = tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("AWS calls on an endpoint that never answers still hang after 60 s");
    assert_unavailable("DynamoDB GetItem", read);
    assert_unavailable("DynamoDB transaction", write);
    assert_unavailable("SQS SendMessage", enqueue);
    assert_unavailable("S3 PutObject", put);
}

#[tokio::test]
async fn a_table_that_does_not_exist_is_internal() {
    let env = env("notable").await;
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let store = dynamo_at(&endpoint, &format!("{}-missing", env.prefix)).await;
    every_store_call(&store, |what, res| assert_internal(what, res)).await;
}

const DDB_JSON: &[(&str, &str)] = &[("content-type", "application/x-amz-json-1.0")];

#[tokio::test]
async fn dynamodb_throttling_is_unavailable() {
    for code in [
        "ThrottlingException",
        "ProvisionedThroughputExceededException",
    ] {
        let body: &'static str = Box::leak(
            format!(
                r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{code}","message":"Rate of requests exceeds the allowed throughput."}}"#
            )
            .into_boxed_str(),
        );
        let endpoint = canned_server("400 Bad Request", DDB_JSON, body).await;
        let store = dynamo_at(&endpoint, "tasks").await;
        every_store_call(&store, |what, res| assert_unavailable(what, res)).await;
    }
}

/// A single write that meets an ongoing transaction on its item (a `Start` racing a cancel's
/// refund transaction) is rejected with `TransactionConflictException`: transient, and not
/// retried by the SDK, so the store must report it as retryable.
#[tokio::test]
async fn a_write_that_conflicts_with_a_transaction_is_unavailable() {
    let endpoint = canned_server(
        "400 Bad Request",
        DDB_JSON,
        r#"{"__type":"com.amazonaws.dynamodb.v20120810#TransactionConflictException","message":"Transaction is ongoing for the item"}"#,
    )
    .await;
    let store = dynamo_at(&endpoint, "tasks").await;
    let account = Account::create(10, None).account;
    assert_unavailable("create_account", store.create_account(&account).await);
    assert_unavailable("grant_credits", store.grant_credits(&account.id, 1).await);
    assert_unavailable(
        "reserve_idempotency",
        store
            .reserve_idempotency(&account.id, "k", "h", Utc::now(), MINUTE, DAY)
            .await,
    );
}

#[tokio::test]
async fn s3_slow_down_is_unavailable() {
    let endpoint = canned_server(
        "503 Slow Down",
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>R1</RequestId></Error>",
    )
    .await;
    let blobs = s3_at(&endpoint).await;
    assert_unavailable(
        "put",
        blobs.put("k", Bytes::from_static(b"x"), "text/plain").await,
    );
}

#[tokio::test]
async fn s3_internal_error_is_unavailable() {
    let endpoint = canned_server(
        "500 Internal Server Error",
        &[("content-type", "application/xml")],
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message><RequestId>R1</RequestId></Error>",
    )
    .await;
    let blobs = s3_at(&endpoint).await;
    assert_unavailable(
        "put",
        blobs.put("k", Bytes::from_static(b"x"), "text/plain").await,
    );
}

#[tokio::test]
async fn sqs_throttling_is_unavailable() {
    let endpoint = canned_server(
        "400 Bad Request",
        &[
            ("content-type", "application/x-amz-json-1.0"),
            ("x-amzn-query-error", "RequestThrottled;Sender"),
        ],
        r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"Request is throttled."}"#,
    )
    .await;
    let queue = sqs_at(&endpoint).await;
    assert_unavailable(
        "enqueue",
        queue.enqueue(&run("task_x"), Duration::ZERO).await,
    );
}

// ---------------------------------------------------------------------------------------------
// Typed errors through the API
// ---------------------------------------------------------------------------------------------

/// Reads accounts from a working store and sends everything else to a failing one: the API
/// authenticates, then meets the failure when it writes.
struct WritesFail {
    reads: DynamoStore,
    rest: DynamoStore,
}

#[async_trait]
impl TaskStore for WritesFail {
    async fn create_account(&self, account: &Account) -> PortResult<()> {
        self.rest.create_account(account).await
    }
    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>> {
        self.reads.account_by_key_hash(key_hash).await
    }
    async fn account(&self, account_id: &str) -> PortResult<Option<Account>> {
        self.reads.account(account_id).await
    }
    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account> {
        self.rest.grant_credits(account_id, credits).await
    }
    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()> {
        self.rest.set_key_hash(account_id, key_hash).await
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
        self.rest
            .reserve_idempotency(account_id, key, request_hash, now, in_flight, retain)
            .await
    }
    async fn release_idempotency(
        &self,
        account_id: &str,
        key: &str,
        token: &str,
    ) -> PortResult<()> {
        self.rest.release_idempotency(account_id, key, token).await
    }
    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()> {
        self.rest.insert_task(task, claim, max_open).await
    }
    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        self.rest.due_tasks(cutoff, limit).await
    }
    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool> {
        self.rest.acquire_slot(pool, slots, holder, until).await
    }
    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()> {
        self.rest.release_slot(pool, holder).await
    }
    async fn task(&self, task_id: &str) -> PortResult<Option<Task>> {
        self.rest.task(task_id).await
    }
    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage> {
        self.rest.list_tasks(account_id, query).await
    }
    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task> {
        self.rest.update_task(task_id, transition).await
    }
}

fn submit_request(api_key: &str, idempotency_key: Option<&str>) -> http::Request<Bytes> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri("/v1/tasks")
        .header("authorization", format!("Bearer {api_key}"))
        .header("content-type", "application/json");
    if let Some(k) = idempotency_key {
        req = req.header("idempotency-key", k);
    }
    req.body(Bytes::from_static(br#"{"model":"echo","prompt":"hello"}"#))
        .unwrap()
}

/// The API over the emulator's queue and bucket with `store` as the task store.
fn api_with(env: &Env, store: Arc<dyn TaskStore>) -> Api {
    let app = env.backends.app(env.settings.core.clone());
    Api::new(tasklane_core::App::new(
        store,
        app.queue.clone(),
        app.blobs.clone(),
        tasklane_core::providers::builtin_registry(1.0),
        env.settings.core.clone(),
    ))
}

/// Checks an error answer: status, code, the error shape, and no backend text in the message.
fn assert_error_answer(resp: &http::Response<Bytes>, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(
        resp.status(),
        status,
        "{:?}",
        String::from_utf8_lossy(resp.body())
    );
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(!message.is_empty());
    let text = body.to_string().to_lowercase();
    for sdk_words in [
        "dispatch",
        "connect",
        "127.0.0.1",
        "dynamodb",
        "exception",
        "sdkerror",
        "throttl",
        "resourcenotfound",
        "io error",
    ] {
        assert!(
            !text.contains(sdk_words),
            "backend text {sdk_words:?} in {body}"
        );
    }
    body
}

#[tokio::test]
async fn submit_while_dynamodb_is_unreachable_answers_503_with_retry_after() {
    let env = env("api503").await;
    let account = Account::create(10, None);
    env.store().create_account(&account.account).await.unwrap();
    let dead = dynamo_at(&closed_endpoint(), &env.settings.table).await;

    // The whole store unreachable: the API cannot even authenticate.
    let mut backends = env.backends.clone();
    backends.store = dead.clone();
    let api = Api::new(backends.app(env.settings.core.clone()));
    let resp = api.handle(submit_request(&account.api_key, None)).await;
    assert_error_answer(&resp, 503, "unavailable");
    assert!(resp.headers().contains_key("retry-after"));

    // Authenticated, then the submit's write cannot reach DynamoDB (with and without an
    // Idempotency-Key).
    let api = api_with(
        &env,
        Arc::new(WritesFail {
            reads: env.store().clone(),
            rest: dead,
        }),
    );
    for key in [None, Some("idem-503")] {
        let resp = api.handle(submit_request(&account.api_key, key)).await;
        assert_error_answer(&resp, 503, "unavailable");
        let retry_after: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
    }
    assert_eq!(balance(env.store(), &account.account.id).await, (10, 10));
}

#[tokio::test]
async fn submit_while_dynamodb_throttles_answers_503_with_retry_after() {
    let env = env("apithrottle").await;
    let account = Account::create(10, None);
    env.store().create_account(&account.account).await.unwrap();
    let endpoint = canned_server(
        "400 Bad Request",
        DDB_JSON,
        r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"The level of configured provisioned throughput for the table was exceeded."}"#,
    )
    .await;
    let throttled = dynamo_at(&endpoint, &env.settings.table).await;
    let api = api_with(
        &env,
        Arc::new(WritesFail {
            reads: env.store().clone(),
            rest: throttled,
        }),
    );
    let resp = api.handle(submit_request(&account.api_key, None)).await;
    assert_error_answer(&resp, 503, "unavailable");
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(balance(env.store(), &account.account.id).await, (10, 10));
}

#[tokio::test]
async fn submit_against_a_missing_table_answers_500_without_backend_text() {
    let env = env("api500").await;
    let account = Account::create(10, None);
    env.store().create_account(&account.account).await.unwrap();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    let missing = dynamo_at(&endpoint, &format!("{}-missing", env.prefix)).await;
    let api = api_with(
        &env,
        Arc::new(WritesFail {
            reads: env.store().clone(),
            rest: missing,
        }),
    );
    let resp = api.handle(submit_request(&account.api_key, None)).await;
    assert_error_answer(&resp, 500, "internal");
    assert!(!resp.headers().contains_key("retry-after"));
}

// ---------------------------------------------------------------------------------------------
// DynamoStore: the sweeper's index (sparse GSI2, sharded) and the open-task count
// ---------------------------------------------------------------------------------------------

/// The item stored under `(pk, sk)`, as DynamoDB holds it.
async fn raw_item(
    env: &Env,
    pk: String,
    sk: &str,
) -> std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue> {
    use aws_sdk_dynamodb::types::AttributeValue;
    aws_sdk_dynamodb::Client::new(&env.config)
        .get_item()
        .table_name(&env.settings.table)
        .key("PK", AttributeValue::S(pk))
        .key("SK", AttributeValue::S(sk.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .expect("the item exists")
}

/// A string attribute of `item`, if it has it.
fn raw_s(
    item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
    name: &str,
) -> Option<String> {
    item.get(name).map(|v| v.as_s().expect("a string").clone())
}

/// The task's `(GSI2PK, GSI2SK)`, when it carries them.
async fn due_keys(env: &Env, task_id: &str) -> (Option<String>, Option<String>) {
    let item = raw_item(env, format!("TASK#{task_id}"), "TASK").await;
    (raw_s(&item, "GSI2PK"), raw_s(&item, "GSI2SK"))
}

/// The account item's `open_tasks` counter (`None` before its first task).
async fn open_tasks(env: &Env, account_id: &str) -> Option<i64> {
    let item = raw_item(env, format!("ACCT#{account_id}"), "ACCOUNT").await;
    item.get("open_tasks")
        .map(|v| v.as_n().expect("a number").parse().unwrap())
}

/// The GSI2 partition of a task id (as the adapter shards: last byte modulo 8).
fn shard_of(task_id: &str) -> u8 {
    tasklane_aws::dynamo::waiting_shard(task_id)
}

/// A time at millisecond precision (what the index keys keep).
fn ms(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap()
}

/// The index sort key of a task waiting since `at`.
fn waiting_sort_key(at: DateTime<Utc>, task_id: &str) -> String {
    format!("{}#{task_id}", at.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
}

fn ids(tasks: &[Task]) -> Vec<String> {
    tasks.iter().map(|t| t.id.clone()).collect()
}

#[tokio::test]
async fn due_tasks_reads_every_gsi2_shard_and_returns_the_longest_waiting_first() {
    let env = env("due").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    let now = ms(Utc::now());
    let base = now - TimeDelta::hours(1);

    // Thirty-two waiting tasks, two in each of the sixteen shards, the k-th (waiting since
    // base + k s) in shard k mod 16: the oldest few are each in another shard.
    let mut waiting: Vec<Task> = Vec::new();
    for k in 0..32u8 {
        let task = loop {
            let t = queued_task(&account.id, 1, "echo");
            if shard_of(&t.id) == k % 16 {
                break t;
            }
        };
        let task = Task {
            waiting_since: Some(base + TimeDelta::seconds(i64::from(k))),
            ..task
        };
        store.insert_task(&task, None, u64::MAX).await.unwrap();
        waiting.push(task);
    }
    // Four whose wait began in the future (a lease still running, say) are not due.
    for _ in 0..4 {
        let task = Task {
            waiting_since: Some(now + TimeDelta::hours(1)),
            ..queued_task(&account.id, 1, "echo")
        };
        store.insert_task(&task, None, u64::MAX).await.unwrap();
    }

    // The index entry names the shard and sorts by the time the wait began.
    let first = &waiting[0];
    assert_eq!(
        due_keys(&env, &first.id).await,
        (
            Some(format!("WAITING#{}", shard_of(&first.id))),
            Some(waiting_sort_key(first.waiting_since.unwrap(), &first.id))
        )
    );

    let due = store.due_tasks(now, 100).await.unwrap();
    assert_eq!(ids(&due), ids(&waiting), "every shard, oldest first");
    assert_eq!(due, waiting, "the tasks as stored");
    // A limit keeps the oldest overall, merged across shards.
    let oldest = store.due_tasks(now, 5).await.unwrap();
    assert_eq!(ids(&oldest), ids(&waiting[..5]));
    // `cutoff` is inclusive.
    let since = store
        .due_tasks(base + TimeDelta::seconds(3), 100)
        .await
        .unwrap();
    assert_eq!(ids(&since), ids(&waiting[..4]));
    assert!(
        store
            .due_tasks(base - TimeDelta::milliseconds(1), 100)
            .await
            .unwrap()
            .is_empty()
    );

    // A terminal task owing nothing leaves the index: cancelled, or completed without webhook.
    store
        .update_task(&waiting[0].id, &Transition::Cancel)
        .await
        .unwrap();
    assert_eq!(due_keys(&env, &waiting[0].id).await, (None, None));
    store
        .update_task(&waiting[1].id, &start(TimeDelta::seconds(60)))
        .await
        .unwrap();
    store
        .update_task(
            &waiting[1].id,
            &Transition::Complete {
                attempt: 1,
                outputs: vec![],
            },
        )
        .await
        .unwrap();
    assert_eq!(due_keys(&env, &waiting[1].id).await, (None, None));
    // A claim keeps the entry where the queued task had it (no index write), and so does
    // progress renewing the lease.
    let queued_key = due_keys(&env, &waiting[2].id).await;
    let lease_end = ms(Utc::now()) + TimeDelta::minutes(10);
    let processing = store
        .update_task(
            &waiting[2].id,
            &Transition::Start {
                lease_until: lease_end,
            },
        )
        .await
        .unwrap();
    assert_eq!(processing.waiting_since, waiting[2].waiting_since);
    assert_eq!(due_keys(&env, &waiting[2].id).await, queued_key);
    store
        .update_task(
            &waiting[2].id,
            &Transition::Progress {
                attempt: 1,
                progress: 30,
                lease_until: lease_end,
            },
        )
        .await
        .unwrap();
    assert_eq!(due_keys(&env, &waiting[2].id).await, queued_key);
    // The sweeper finds it with its lease held and moves the entry to the lease end: then it is
    // not due before that.
    let reindexed = store
        .update_task(&waiting[2].id, &Transition::Reindex { cutoff: now })
        .await
        .unwrap();
    assert_eq!(reindexed.waiting_since, Some(lease_end));
    assert_eq!(
        due_keys(&env, &waiting[2].id).await,
        (
            Some(format!("WAITING#{}", shard_of(&waiting[2].id))),
            Some(waiting_sort_key(lease_end, &waiting[2].id))
        )
    );
    let due = store.due_tasks(now, 100).await.unwrap();
    assert_eq!(ids(&due), ids(&waiting[3..]));
    let at_lease_end = store.due_tasks(lease_end, 100).await.unwrap();
    assert!(ids(&at_lease_end).contains(&waiting[2].id));

    // A requeue restarts the wait: the entry moves to the end of its shard.
    let requeued = store
        .update_task(
            &waiting[3].id,
            &Transition::Requeue {
                cutoff: now - TimeDelta::seconds(1),
            },
        )
        .await
        .unwrap();
    let restarted = requeued.waiting_since.unwrap();
    assert!(restarted > now - TimeDelta::seconds(1));
    let (_, sk) = due_keys(&env, &waiting[3].id).await;
    assert_eq!(sk, Some(waiting_sort_key(restarted, &waiting[3].id)));
    let due = store
        .due_tasks(now - TimeDelta::seconds(1), 100)
        .await
        .unwrap();
    assert_eq!(ids(&due), ids(&waiting[4..]));
    // Requeued again with the same horizon: it moved on, not due.
    let again = store
        .update_task(
            &waiting[3].id,
            &Transition::Requeue {
                cutoff: now - TimeDelta::seconds(1),
            },
        )
        .await;
    assert!(
        matches!(again, Err(PortError::Rejected(TransitionError::NotDue))),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_task_written_before_the_rename_is_still_found_by_the_sweeper_and_rewritten() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let env = env("legacy").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    let since = ms(Utc::now()) - TimeDelta::hours(1);
    let task = Task {
        waiting_since: Some(since),
        ..queued_task(&account.id, 1, "echo")
    };
    store.insert_task(&task, None, u64::MAX).await.unwrap();
    // What an earlier version wrote: a `DUE#` partition and `check_at` in the document.
    let mut item = raw_item(&env, format!("TASK#{}", task.id), "TASK").await;
    let shard = shard_of(&task.id);
    item.insert("GSI2PK".into(), AttributeValue::S(format!("DUE#{shard}")));
    let doc = raw_s(&item, "doc")
        .unwrap()
        .replace("\"waiting_since\"", "\"check_at\"");
    assert!(doc.contains("\"check_at\""));
    item.insert("doc".into(), AttributeValue::S(doc));
    aws_sdk_dynamodb::Client::new(&env.config)
        .put_item()
        .table_name(&env.settings.table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();

    let due = store.due_tasks(Utc::now(), 10).await.unwrap();
    assert_eq!(
        ids(&due),
        vec![task.id.clone()],
        "found in its DUE# partition"
    );
    assert_eq!(
        due[0].waiting_since,
        Some(since),
        "check_at read as waiting_since"
    );
    // Its next write moves it to the WAITING# partition.
    store
        .update_task(&task.id, &Transition::Requeue { cutoff: Utc::now() })
        .await
        .unwrap();
    assert_eq!(
        due_keys(&env, &task.id).await.0,
        Some(format!("WAITING#{shard}"))
    );
}

#[tokio::test]
async fn the_open_task_count_rises_at_submit_falls_with_the_write_that_ends_a_task_and_caps_submits()
 {
    let env = env("opencap").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    assert_eq!(open_tasks(&env, &account.id).await.unwrap_or(0), 0);

    let a = queued_task(&account.id, 3, "echo");
    let b = queued_task(&account.id, 3, "echo");
    store.insert_task(&a, None, 2).await.unwrap();
    store.insert_task(&b, None, 2).await.unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(2));
    assert_eq!(balance(store, &account.id).await, (94, 100));

    // At the cap: refused, nothing stored, nothing debited, the count unchanged.
    let c = queued_task(&account.id, 3, "echo");
    let res = store.insert_task(&c, None, 2).await;
    assert!(
        matches!(res, Err(PortError::TooManyOpenTasks { limit: 2 })),
        "{res:?}"
    );
    assert_eq!(store.task(&c.id).await.unwrap(), None);
    assert_eq!(balance(store, &account.id).await, (94, 100));
    assert_eq!(open_tasks(&env, &account.id).await, Some(2));
    // Too few credits at the cap is still reported as too few credits.
    let dear = queued_task(&account.id, 1000, "echo");
    let res = store.insert_task(&dear, None, 2).await;
    assert!(
        matches!(res, Err(PortError::InsufficientCredits { available: 94 })),
        "{res:?}"
    );

    // A cancel ends a task: one slot back (and only once for a repeated cancel).
    store.update_task(&a.id, &Transition::Cancel).await.unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(1));
    store.update_task(&a.id, &Transition::Cancel).await.unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(1));
    store.insert_task(&c, None, 2).await.unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(2));

    // Starting, progress and a requeue leave it; completing ends the task.
    store
        .update_task(&b.id, &start(TimeDelta::seconds(60)))
        .await
        .unwrap();
    store
        .update_task(
            &b.id,
            &Transition::Progress {
                attempt: 1,
                progress: 50,
                lease_until: Utc::now() + TimeDelta::seconds(60),
            },
        )
        .await
        .unwrap();
    store
        .update_task(&c.id, &Transition::Requeue { cutoff: Utc::now() })
        .await
        .unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(2));
    store
        .update_task(
            &b.id,
            &Transition::Complete {
                attempt: 1,
                outputs: vec![],
            },
        )
        .await
        .unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(1));
    // A failure ends a task, refunded in the same write; a second failure changes nothing.
    store.update_task(&c.id, &fail(None)).await.unwrap();
    assert_eq!(open_tasks(&env, &account.id).await, Some(0));
    assert!(store.update_task(&c.id, &fail(None)).await.is_err());
    assert_eq!(open_tasks(&env, &account.id).await, Some(0));
    // a (cancelled) and c (failed) refunded; b completed.
    assert_eq!(balance(store, &account.id).await, (97, 100));

    // All slots are free again.
    for _ in 0..2 {
        submitted_under(store, &account, 2).await.unwrap();
    }
    assert!(matches!(
        submitted_under(store, &account, 2).await,
        Err(PortError::TooManyOpenTasks { limit: 2 })
    ));
}

/// Stores a 1-credit task for `account` under an open-task cap of `cap`.
async fn submitted_under(store: &DynamoStore, account: &Account, cap: u64) -> PortResult<Task> {
    let task = queued_task(&account.id, 1, "echo");
    store.insert_task(&task, None, cap).await.map(|()| task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_submits_under_a_cap_of_three_store_exactly_three() {
    let env = env("opencaprace").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    let barrier = Arc::new(Barrier::new(10));
    let mut set = JoinSet::new();
    for _ in 0..10 {
        let (store, account, barrier) = (store.clone(), account.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            submitted_under(&store, &account, 3).await
        });
    }
    let results = set.join_all().await;
    let stored = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        assert!(
            matches!(r, Ok(_) | Err(PortError::TooManyOpenTasks { limit: 3 })),
            "{r:?}"
        );
    }
    assert_eq!(stored, 3);
    assert_eq!(open_tasks(&env, &account.id).await, Some(3));
    assert_eq!(balance(store, &account.id).await, (97, 100));
}

// ---------------------------------------------------------------------------------------------
// Upstream slots
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_models_slots_go_to_at_most_their_number_of_holders_and_free_themselves_in_time() {
    let env = env("slots").await;
    let store = env.store();
    let now = Utc::now();
    let soon = now + TimeDelta::milliseconds(1500);
    let later = now + TimeDelta::hours(1);
    assert!(
        store
            .acquire_slot("model:veo3", 2, "task_a", later)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_slot("model:veo3", 2, "task_b", soon)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_slot("model:veo3", 2, "task_c", later)
            .await
            .unwrap(),
        "both taken"
    );
    // A holder keeps its slot when it asks again; another pool is separate.
    assert!(
        store
            .acquire_slot("model:veo3", 2, "task_a", later)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_slot("model:other", 1, "task_c", later)
            .await
            .unwrap()
    );
    // A slot given back is free at once.
    store.release_slot("model:veo3", "task_a").await.unwrap();
    store.release_slot("model:veo3", "task_a").await.unwrap();
    assert!(
        store
            .acquire_slot("model:veo3", 2, "task_c", later)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_slot("model:veo3", 2, "task_d", later)
            .await
            .unwrap()
    );
    // task_b's time runs out: its slot is taken over, and its late release frees nothing.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(
        store
            .acquire_slot("model:veo3", 2, "task_d", later)
            .await
            .unwrap()
    );
    store.release_slot("model:veo3", "task_b").await.unwrap();
    assert!(
        !store
            .acquire_slot("model:veo3", 2, "task_e", later)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn a_tasklane_signed_result_url_outlives_the_credentials_and_redirects_to_a_short_presigned_get()
 {
    use tasklane_core::result_urls::{SignedFiles, UrlSigner};
    let env = env("s3signed").await;
    env.backends
        .blobs
        .put(
            "tasks/t/out.txt",
            Bytes::from_static(b"hello"),
            "text/plain",
        )
        .await
        .unwrap();
    // A role session with ten minutes left, and URLs promised for a week.
    let creds_expire = SystemTime::now() + Duration::from_secs(600);
    let blobs = blobs_with_credentials_expiring_at(&env, creds_expire).with_signed_urls(
        UrlSigner::new(b"0123456789abcdef0123456789abcdef".to_vec()),
        Some("https://api.example/".into()),
    );
    let creds_expire: DateTime<Utc> = creds_expire.into();
    let week = Duration::from_secs(7 * 86_400);
    let before = Utc::now();
    let signed = blobs.presign_get("tasks/t/out.txt", week).await.unwrap();
    let (path, query) = signed.url.split_once('?').unwrap();
    assert_eq!(path, "https://api.example/v1/files/tasks/t/out.txt");
    let expires: i64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("expires="))
        .unwrap()
        .parse()
        .unwrap();
    // Its life is the one asked for, not the credentials': the URL says when it ends.
    assert_eq!(expires, signed.expires_at.timestamp());
    assert!(
        signed.expires_at >= before + TimeDelta::days(7) - TimeDelta::seconds(1),
        "{signed:?}"
    );

    // Following it: a 302 to an S3 presigned GET of minutes, inside the credentials' life.
    let resp = blobs.answer("tasks/t/out.txt", query).await;
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["cache-control"], "private, no-store");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let q = query_of(&location);
    assert_eq!(x_amz_expires(&q), 300, "{location}");
    assert!(x_amz_date(&q) + TimeDelta::seconds(300) < creds_expire);
    let got = reqwest::get(&location).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"hello");

    // Another key, a pushed-out expiry, an expired URL: 403 forbidden, no redirect.
    let past = UrlSigner::new(b"0123456789abcdef0123456789abcdef".to_vec()).url(
        "https://api.example",
        "tasks/t/out.txt",
        Utc::now() - TimeDelta::seconds(1),
    );
    for (key, q) in [
        ("tasks/t/other.txt", query.to_string()),
        (
            "tasks/t/out.txt",
            query.replace("expires=", &format!("expires={}", 1)),
        ),
        (
            "tasks/t/out.txt",
            past.split_once('?').unwrap().1.to_string(),
        ),
    ] {
        let resp = blobs.answer(key, &q).await;
        assert_eq!(resp.status(), 403, "{key}?{q}");
        let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
        assert_eq!(body["error"]["code"], "forbidden");
        assert!(resp.headers().get("location").is_none());
    }

    // Once the object is gone (the bucket's retention): 410 expired, not S3's 403.
    s3_client(&env)
        .delete_object()
        .bucket(&env.settings.bucket)
        .key("tasks/t/out.txt")
        .send()
        .await
        .unwrap();
    let resp = blobs.answer("tasks/t/out.txt", query).await;
    assert_eq!(resp.status(), 410);
    let body: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
    assert_eq!(body["error"]["code"], "expired");
}

// ---------------------------------------------------------------------------------------------
// One busy account: transaction conflicts as DynamoDB answers them, and a balance spread over
// several items (tasklane_aws::dynamo's ledger)
// ---------------------------------------------------------------------------------------------

/// A store that reaches the emulator through a proxy of its own whose transactions stay
/// ongoing for `hold` (on DynamoDB a transaction takes tens of milliseconds), so concurrent
/// writes on one item conflict as often as they would there.
async fn conflicting_store(env: &Env, hold: Duration) -> (DynamoProxy, DynamoStore) {
    let proxy = DynamoProxy::start(ProxyOptions {
        upstream: std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL"),
        hold,
    })
    .await
    .expect("the proxy starts");
    let store = dynamo_at(&proxy.url(), &env.settings.table).await;
    (proxy, store)
}

/// Submits `count` tasks of `credits` each for `account` at once, under a cap of `cap`.
async fn burst(
    store: &DynamoStore,
    account: &Account,
    count: usize,
    credits: u64,
    cap: u64,
) -> Vec<PortResult<Task>> {
    let barrier = Arc::new(Barrier::new(count));
    let mut set = JoinSet::new();
    for _ in 0..count {
        let (store, account, barrier) = (store.clone(), account.clone(), barrier.clone());
        set.spawn(async move {
            let task = queued_task(&account.id, credits, "echo");
            barrier.wait().await;
            store.insert_task(&task, None, cap).await.map(|()| task)
        });
    }
    set.join_all().await
}

/// `(credits, open tasks)` of an account as a whole, as its items hold them now.
async fn whole(store: &DynamoStore, account_id: &str) -> (u64, u64) {
    let (credits, open, _) = store.ledger(account_id).await.unwrap().expect("account");
    (credits, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_busy_account_spread_over_sixteen_items_takes_a_burst_of_submits_and_ends_with_no_503()
{
    let env = env("hotspread").await;
    let (proxy, store) = conflicting_store(&env, Duration::from_millis(20)).await;
    let account = open_account(&store, 10_000).await;
    assert_eq!(store.set_shards(&account.id, 16).await.unwrap(), 16);
    assert_eq!(whole(&store, &account.id).await, (10_000, 0));

    // As many at once as moto gets through in a few seconds (it copies the whole table for
    // every transaction); each of the 16 items sees several at a time.
    let submitted = burst(&store, &account, 120, 3, 1000).await;
    let refused: Vec<_> = submitted.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        refused.first()
    );
    assert!(proxy.conflicts() > 0, "the burst overlapped on no item");
    assert_eq!(whole(&store, &account.id).await, (10_000 - 360, 120));

    // Every task ends at once (a cancel refunds and closes it): each end settles a shard.
    let conflicts_before = proxy.conflicts();
    let mut set = JoinSet::new();
    for task in submitted.into_iter().map(Result::unwrap) {
        let store = store.clone();
        set.spawn(async move { store.update_task(&task.id, &Transition::Cancel).await });
    }
    let ended = set.join_all().await;
    let failed: Vec<_> = ended.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(
        proxy.conflicts() > conflicts_before,
        "the ends overlapped on no item"
    );
    assert_eq!(whole(&store, &account.id).await, (10_000, 0));
    assert_eq!(balance(&store, &account.id).await, (10_000, 10_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_kind_of_burst_on_one_item_meets_conflicts_that_retrying_cannot_outwait() {
    // Why a busy account needs shards: one item takes one transaction at a time.
    let env = env("hotsingle").await;
    let (proxy, store) = conflicting_store(&env, Duration::from_millis(200)).await;
    let account = open_account(&store, 10_000).await;
    let submitted = burst(&store, &account, 200, 1, 1000).await;
    let stored = submitted.iter().filter(|r| r.is_ok()).count();
    for r in &submitted {
        assert!(
            matches!(r, Ok(_) | Err(PortError::Unavailable(_))),
            "only conflicts may refuse: {r:?}"
        );
    }
    assert!(stored < 200, "all 200 fit through one item");
    assert!(proxy.conflicts() > 200);
    // Nothing was lost or made: what was refused was not charged.
    assert_eq!(
        whole(&store, &account.id).await,
        (10_000 - stored as u64, stored as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spread_account_keeps_its_cap_and_its_balance_as_a_whole() {
    let env = env("hotcap").await;
    let (_proxy, store) = conflicting_store(&env, Duration::from_millis(10)).await;
    let account = open_account(&store, 1000).await;
    store.set_shards(&account.id, 8).await.unwrap();

    // 40 at once under a cap of 10 split over 8 items: exactly 10, the rest told why.
    let submitted = burst(&store, &account, 40, 1, 10).await;
    for r in &submitted {
        assert!(
            matches!(r, Ok(_) | Err(PortError::TooManyOpenTasks { limit: 10 })),
            "{r:?}"
        );
    }
    assert_eq!(submitted.iter().filter(|r| r.is_ok()).count(), 10);
    assert_eq!(whole(&store, &account.id).await, (990, 10));
    for task in submitted.into_iter().flatten() {
        store
            .update_task(&task.id, &Transition::Cancel)
            .await
            .unwrap();
    }

    // 1000 credits over 8 items are 125 each; a task of 600 gathers them into one item.
    let big = queued_task(&account.id, 600, "echo");
    store.insert_task(&big, None, 10).await.unwrap();
    assert_eq!(whole(&store, &account.id).await, (400, 1));
    let too_big = queued_task(&account.id, 401, "echo");
    assert!(matches!(
        store.insert_task(&too_big, None, 10).await,
        Err(PortError::InsufficientCredits { available: 400 })
    ));
    // Granted credits are the account's too, whichever item holds them.
    assert_eq!(
        store.grant_credits(&account.id, 50).await.unwrap().credits,
        450
    );
    assert_eq!(balance(&store, &account.id).await, (450, 1050));
}

#[tokio::test]
async fn an_accounts_shard_count_only_grows_and_keeps_its_balance() {
    let env = env("shardset").await;
    let store = env.store();
    let account = open_account(store, 101).await;
    submitted(store, &account, 1).await;
    assert_eq!(store.set_shards(&account.id, 4).await.unwrap(), 4);
    assert_eq!(whole(store, &account.id).await, (100, 1));
    assert_eq!(store.set_shards(&account.id, 4).await.unwrap(), 4);
    let shrink = store.set_shards(&account.id, 2).await.unwrap_err();
    assert!(format!("{shrink:?}").contains("only grows"), "{shrink:?}");
    assert!(store.set_shards(&account.id, MAX_SHARDS + 1).await.is_err());
    assert!(matches!(
        store.set_shards("acct_missing", 2).await,
        Err(PortError::NotFound)
    ));
    // Spread evenly: 100 credits over 4 items, and the open task's count with them.
    for k in 1..4 {
        let item = raw_item(&env, format!("ACCT#{}#{k}", account.id), "SHARD").await;
        assert_eq!(item["credits"].as_n().unwrap(), "25");
    }
    assert_eq!(balance(store, &account.id).await, (100, 101));
}

#[tokio::test]
async fn a_spread_accounts_tasks_are_listed_newest_first_once_across_its_index_partitions() {
    let env = env("listspread").await;
    let store = env.store();
    let account = open_account(store, 100).await;
    // Half the tasks before the account is spread (all in its first index partition), half
    // after (in eight).
    let mut ids = Vec::new();
    for i in 0..30 {
        if i == 15 {
            store.set_shards(&account.id, 8).await.unwrap();
        }
        ids.push(submitted(store, &account, 1).await.id);
    }
    let partitions: HashSet<String> = {
        let mut p = HashSet::new();
        for id in &ids {
            let item = raw_item(&env, format!("TASK#{id}"), "TASK").await;
            p.insert(item["GSI1PK"].as_s().unwrap().clone());
        }
        p
    };
    assert!(partitions.len() > 3, "{partitions:?}");
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    for limit in [7, 10, 1, 30] {
        let q = ListQuery {
            limit,
            ..Default::default()
        };
        let pages = all_pages(store, &account.id, &q).await;
        assert_pages_cover(&pages, &newest_first, limit);
    }
    // Filtered: the queued ones only, after every third is cancelled.
    for id in ids.iter().step_by(3) {
        store.update_task(id, &Transition::Cancel).await.unwrap();
    }
    let queued: Vec<String> = newest_first
        .iter()
        .filter(|id| ids.iter().position(|x| x == *id).unwrap() % 3 != 0)
        .cloned()
        .collect();
    let q = ListQuery {
        limit: 4,
        status: Some(TaskStatus::Queued),
        ..Default::default()
    };
    let pages = all_pages(store, &account.id, &q).await;
    let listed: Vec<String> = pages.iter().flatten().cloned().collect();
    assert_eq!(listed, queued);
}
