//! Small in-memory adapters ([`MemStore`], [`MemQueue`], [`MemBlobs`]): a re-implementation of
//! the store's credit, open-task and idempotency rules over [`tasklane_core::task::apply`], in
//! one mutex, about ten times as fast as SQLite on a fresh file. For volume (the API fuzzer),
//! never for proving what the shipped adapters do.
//!
//! Nothing expires: an idempotency reservation is held until it is released or its task is
//! created, whatever the clock says.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tasklane_core::account::Account;
use tasklane_core::ports::{
    BlobStore, ChunkSource, IdempotencyClaim, ListQuery, PortError, PortResult, Reservation,
    SignedUrl, StreamRefused, TaskPage, TaskStore, WorkMessage, WorkQueue,
};
use tasklane_core::task::{Task, Transition, apply};

/// One idempotency record: body hash, reservation token, and the task once created.
struct Idem {
    hash: String,
    token: String,
    task_id: Option<String>,
}

#[derive(Default)]
struct MemState {
    accounts: HashMap<String, Account>,
    tasks: BTreeMap<String, Task>,
    idem: HashMap<(String, String), Idem>,
    tokens: u64,
    /// (pool, slot) -> (holder, until).
    slots: BTreeMap<(String, u32), (String, DateTime<Utc>)>,
}

/// A task store in one mutex: every method is atomic.
#[derive(Default)]
pub struct MemStore(Mutex<MemState>);

impl MemStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl TaskStore for MemStore {
    async fn create_account(&self, account: &Account) -> PortResult<()> {
        let mut s = self.lock();
        if s.accounts.contains_key(&account.id)
            || s.accounts.values().any(|a| a.key_hash == account.key_hash)
        {
            return Err(PortError::internal("account exists"));
        }
        s.accounts.insert(account.id.clone(), account.clone());
        Ok(())
    }
    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>> {
        Ok(self
            .lock()
            .accounts
            .values()
            .find(|a| a.key_hash == key_hash)
            .cloned())
    }
    async fn account(&self, account_id: &str) -> PortResult<Option<Account>> {
        Ok(self.lock().accounts.get(account_id).cloned())
    }
    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account> {
        let mut s = self.lock();
        let a = s.accounts.get_mut(account_id).ok_or(PortError::NotFound)?;
        a.credits += credits;
        a.granted += credits;
        Ok(a.clone())
    }
    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()> {
        let mut s = self.lock();
        let a = s.accounts.get_mut(account_id).ok_or(PortError::NotFound)?;
        a.key_hash = key_hash.to_string();
        Ok(())
    }
    async fn reserve_idempotency(
        &self,
        account_id: &str,
        key: &str,
        request_hash: &str,
        _now: DateTime<Utc>,
        _in_flight: Duration,
        _retain: Duration,
    ) -> PortResult<Reservation> {
        // Nothing expires (see the module documentation).
        let mut s = self.lock();
        let slot = (account_id.to_string(), key.to_string());
        if let Some(r) = s.idem.get(&slot) {
            return Ok(match &r.task_id {
                Some(task_id) => Reservation::Completed {
                    request_hash: r.hash.clone(),
                    task_id: task_id.clone(),
                },
                None => Reservation::InProgress {
                    request_hash: r.hash.clone(),
                },
            });
        }
        s.tokens += 1;
        let token = format!("tok{}", s.tokens);
        s.idem.insert(
            slot,
            Idem {
                hash: request_hash.to_string(),
                token: token.clone(),
                task_id: None,
            },
        );
        Ok(Reservation::Reserved { token })
    }
    async fn release_idempotency(
        &self,
        account_id: &str,
        key: &str,
        token: &str,
    ) -> PortResult<()> {
        let mut s = self.lock();
        let slot = (account_id.to_string(), key.to_string());
        if s.idem
            .get(&slot)
            .is_some_and(|r| r.token == token && r.task_id.is_none())
        {
            s.idem.remove(&slot);
        }
        Ok(())
    }
    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()> {
        let mut s = self.lock();
        if s.tasks.contains_key(&task.id) {
            return Err(PortError::internal("task exists"));
        }
        let account = s
            .accounts
            .get(&task.account_id)
            .ok_or(PortError::NotFound)?;
        // As the shipped stores: too few credits is reported before the cap.
        if account.credits < task.cost.credits {
            return Err(PortError::InsufficientCredits {
                available: account.credits,
            });
        }
        if account.open_tasks >= max_open {
            return Err(PortError::TooManyOpenTasks { limit: max_open });
        }
        if let Some(c) = claim {
            let slot = (task.account_id.clone(), c.key.clone());
            match s.idem.get(&slot) {
                Some(r) if r.token == c.token && r.task_id.is_none() => {}
                _ => return Err(PortError::ReservationLost),
            }
        }
        if let Some(account) = s.accounts.get_mut(&task.account_id) {
            account.credits -= task.cost.credits;
            account.open_tasks += 1;
        }
        if let Some(c) = claim
            && let Some(r) = s.idem.get_mut(&(task.account_id.clone(), c.key.clone()))
        {
            r.task_id = Some(task.id.clone());
        }
        s.tasks.insert(task.id.clone(), task.clone());
        Ok(())
    }
    async fn task(&self, task_id: &str) -> PortResult<Option<Task>> {
        Ok(self.lock().tasks.get(task_id).cloned())
    }
    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage> {
        let s = self.lock();
        let mut matching = s
            .tasks
            .values()
            .rev()
            .filter(|t| t.account_id == account_id)
            .filter(|t| query.status.is_none_or(|st| t.status == st))
            .filter(|t| query.model.as_ref().is_none_or(|m| &t.model == m))
            .filter(|t| query.before.as_ref().is_none_or(|b| &t.id < b));
        let tasks: Vec<Task> = matching.by_ref().take(query.limit).cloned().collect();
        let more = matching.next().is_some();
        let next_before = more.then(|| tasks.last().map(|t| t.id.clone())).flatten();
        Ok(TaskPage { tasks, next_before })
    }
    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool> {
        let mut s = self.lock();
        let now = Utc::now();
        let held = |n: u32, s: &MemState| s.slots.get(&(pool.to_string(), n)).cloned();
        let mine = (0..slots).find(|n| held(*n, &s).is_some_and(|(h, _)| h == holder));
        let free = (0..slots).find(|n| held(*n, &s).is_none_or(|(_, end)| end <= now));
        match mine.or(free) {
            Some(n) => {
                s.slots
                    .insert((pool.to_string(), n), (holder.to_string(), until));
                Ok(true)
            }
            None => Ok(false),
        }
    }
    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()> {
        self.lock()
            .slots
            .retain(|(p, _), (h, _)| !(p == pool && h == holder));
        Ok(())
    }
    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        let s = self.lock();
        let mut due: Vec<Task> = s
            .tasks
            .values()
            .filter(|t| t.waiting_since.is_some_and(|c| c <= cutoff))
            .cloned()
            .collect();
        due.sort_by_key(|t| t.waiting_since);
        due.truncate(limit);
        Ok(due)
    }
    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task> {
        let mut s = self.lock();
        let mut task = s.tasks.get(task_id).cloned().ok_or(PortError::NotFound)?;
        let applied = apply(&mut task, transition, Utc::now())?;
        if let Some(a) = s.accounts.get_mut(&task.account_id) {
            a.credits += applied.refund();
            a.open_tasks -= u64::from(applied.closed());
        }
        s.tasks.insert(task.id.clone(), task.clone());
        Ok(task)
    }
}

/// A queue that only records what was enqueued.
#[derive(Default)]
pub struct MemQueue(Mutex<Vec<WorkMessage>>);

#[async_trait]
impl WorkQueue for MemQueue {
    async fn enqueue(&self, message: &WorkMessage, _delay: Duration) -> PortResult<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message.clone());
        Ok(())
    }
}

/// Blobs in a map, "signed" with a fake URL.
#[derive(Default)]
pub struct MemBlobs(Mutex<HashMap<String, (Bytes, String)>>);

#[async_trait]
impl BlobStore for MemBlobs {
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> PortResult<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), (bytes, content_type.to_string()));
        Ok(())
    }
    async fn put_stream(
        &self,
        key: &str,
        content_type: &str,
        body: &mut dyn ChunkSource,
        max_bytes: u64,
    ) -> PortResult<Result<u64, StreamRefused>> {
        // Gathered in memory (this whole store is), stored only once the body ended in time.
        let mut whole = bytes::BytesMut::new();
        loop {
            match body.next_chunk().await {
                Ok(Some(chunk)) => {
                    if (whole.len() + chunk.len()) as u64 > max_bytes {
                        return Ok(Err(StreamRefused::TooBig { limit: max_bytes }));
                    }
                    whole.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(why) => return Ok(Err(StreamRefused::Broken(why))),
            }
        }
        let size = whole.len() as u64;
        self.put(key, whole.freeze(), content_type).await?;
        Ok(Ok(size))
    }
    async fn presign_get(&self, key: &str, ttl: Duration) -> PortResult<SignedUrl> {
        if !self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
        {
            return Err(PortError::NotFound);
        }
        let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default();
        Ok(SignedUrl {
            url: format!(
                "https://blobs.test/{key}?expires={}",
                expires_at.timestamp()
            ),
            expires_at,
        })
    }
}
