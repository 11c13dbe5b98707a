//! Wrappers that run a hook before every port call, for fault injection (fail, delay or hold
//! a call) in tests and soak runs without touching the adapters; [`hooks`] plugs one into a
//! local server.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use tasklane_core::account::Account;
use tasklane_core::ports::{
    BlobStore, ChunkSource, IdempotencyClaim, ListQuery, PortResult, Reservation, SignedUrl,
    StreamRefused, TaskPage, TaskStore, WorkMessage, WorkQueue,
};
use tasklane_core::task::{Task, Transition};
use tasklane_local::Hooks;

/// A port call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`TaskStore::create_account`].
    CreateAccount,
    /// [`TaskStore::account_by_key_hash`].
    AccountByKeyHash,
    /// [`TaskStore::account`].
    Account,
    /// [`TaskStore::grant_credits`].
    GrantCredits,
    /// [`TaskStore::set_key_hash`].
    SetKeyHash,
    /// [`TaskStore::reserve_idempotency`].
    ReserveIdempotency,
    /// [`TaskStore::release_idempotency`].
    ReleaseIdempotency,
    /// [`TaskStore::insert_task`].
    InsertTask,
    /// [`TaskStore::task`].
    Task,
    /// [`TaskStore::list_tasks`].
    ListTasks,
    /// [`TaskStore::update_task`].
    UpdateTask,
    /// [`TaskStore::due_tasks`].
    DueTasks,
    /// [`TaskStore::acquire_slot`].
    AcquireSlot,
    /// [`TaskStore::release_slot`].
    ReleaseSlot,
    /// [`WorkQueue::enqueue`].
    Enqueue,
    /// [`BlobStore::put`] and [`BlobStore::put_stream`].
    Put,
    /// [`BlobStore::presign_get`].
    PresignGet,
}

/// Runs before each intercepted call; an `Err` is returned instead of making the call.
#[async_trait]
pub trait Interceptor: Send + Sync {
    /// Called before `op`; may wait, or fail the call.
    async fn before(&self, op: Op) -> PortResult<()>;

    /// Called before a task update with its transition, instead of `before(Op::UpdateTask)`
    /// (which it calls unless overridden).
    async fn before_update(&self, transition: &Transition) -> PortResult<()> {
        let _ = transition;
        self.before(Op::UpdateTask).await
    }

    /// Called after a task update was made, with its result.
    fn after_update(&self, transition: &Transition, result: &PortResult<Task>) {
        let _ = (transition, result);
    }
}

/// A port wrapped so that an [`Interceptor`] runs before every call.
pub struct Intercepted<P: ?Sized> {
    inner: Arc<P>,
    hook: Arc<dyn Interceptor>,
}

impl<P: ?Sized> Intercepted<P> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<P>, hook: Arc<dyn Interceptor>) -> Self {
        Intercepted { inner, hook }
    }
}

#[async_trait]
impl TaskStore for Intercepted<dyn TaskStore> {
    async fn create_account(&self, account: &Account) -> PortResult<()> {
        self.hook.before(Op::CreateAccount).await?;
        self.inner.create_account(account).await
    }
    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>> {
        self.hook.before(Op::AccountByKeyHash).await?;
        self.inner.account_by_key_hash(key_hash).await
    }
    async fn account(&self, account_id: &str) -> PortResult<Option<Account>> {
        self.hook.before(Op::Account).await?;
        self.inner.account(account_id).await
    }
    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account> {
        self.hook.before(Op::GrantCredits).await?;
        self.inner.grant_credits(account_id, credits).await
    }
    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()> {
        self.hook.before(Op::SetKeyHash).await?;
        self.inner.set_key_hash(account_id, key_hash).await
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
        self.hook.before(Op::ReserveIdempotency).await?;
        self.inner
            .reserve_idempotency(account_id, key, request_hash, now, in_flight, retain)
            .await
    }
    async fn release_idempotency(
        &self,
        account_id: &str,
        key: &str,
        token: &str,
    ) -> PortResult<()> {
        self.hook.before(Op::ReleaseIdempotency).await?;
        self.inner.release_idempotency(account_id, key, token).await
    }
    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()> {
        self.hook.before(Op::InsertTask).await?;
        self.inner.insert_task(task, claim, max_open).await
    }
    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        self.hook.before(Op::DueTasks).await?;
        self.inner.due_tasks(cutoff, limit).await
    }
    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool> {
        self.hook.before(Op::AcquireSlot).await?;
        self.inner.acquire_slot(pool, slots, holder, until).await
    }
    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()> {
        self.hook.before(Op::ReleaseSlot).await?;
        self.inner.release_slot(pool, holder).await
    }
    async fn task(&self, task_id: &str) -> PortResult<Option<Task>> {
        self.hook.before(Op::Task).await?;
        self.inner.task(task_id).await
    }
    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage> {
        self.hook.before(Op::ListTasks).await?;
        self.inner.list_tasks(account_id, query).await
    }
    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task> {
        self.hook.before_update(transition).await?;
        let result = self.inner.update_task(task_id, transition).await;
        self.hook.after_update(transition, &result);
        result
    }
    async fn update_task_from(&self, current: &Task, transition: &Transition) -> PortResult<Task> {
        self.hook.before_update(transition).await?;
        let result = self.inner.update_task_from(current, transition).await;
        self.hook.after_update(transition, &result);
        result
    }
}

#[async_trait]
impl WorkQueue for Intercepted<dyn WorkQueue> {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        self.hook.before(Op::Enqueue).await?;
        self.inner.enqueue(message, delay).await
    }
}

#[async_trait]
impl BlobStore for Intercepted<dyn BlobStore> {
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> PortResult<()> {
        self.hook.before(Op::Put).await?;
        self.inner.put(key, bytes, content_type).await
    }
    async fn put_stream(
        &self,
        key: &str,
        content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
    ) -> PortResult<Result<u64, StreamRefused>> {
        // A streamed write is a put like any other.
        self.hook.before(Op::Put).await?;
        self.inner
            .put_stream(key, content_type, body, max_bytes)
            .await
    }
    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
        self.hook.before(Op::PresignGet).await?;
        self.inner.presign_get(key, ttl).await
    }
}

/// Runs `hook` before every store and work-queue call a local server's API, processor and
/// sweeper make.
pub fn hooks(hook: Arc<dyn Interceptor>) -> Hooks {
    let h2 = hook.clone();
    Hooks {
        store: Some(Box::new(move |inner| {
            Arc::new(Intercepted::new(inner, hook))
        })),
        queue: Some(Box::new(move |inner| Arc::new(Intercepted::new(inner, h2)))),
    }
}
