//! Embedded durable backends: the task store and the work queue in one SQLite file.
//!
//! One connection behind a mutex, driven from blocking threads; every multi-row change is a
//! single `IMMEDIATE` transaction, so the atomicity the ports promise holds across crashes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tasklane_core::account::Account;
use tasklane_core::api::list_read_budget;
use tasklane_core::ports::{
    Delivery, IdempotencyClaim, Lane, ListQuery, MessageSource, PortError, PortResult, Reservation,
    TaskPage, TaskStore, WorkMessage, WorkQueue,
};
use tasklane_core::task::{Task, TaskStatus, Transition, apply};
use tokio::sync::Notify;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    credits INTEGER NOT NULL CHECK (credits >= 0),
    granted INTEGER NOT NULL,
    webhook_secret TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(id),
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_account ON tasks (account_id, id DESC);
CREATE TABLE IF NOT EXISTS idempotency (
    account_id TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    token TEXT NOT NULL,
    task_id TEXT,
    locked_until INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    visible_at INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    lane TEXT NOT NULL DEFAULT 'work'
);
CREATE TABLE IF NOT EXISTS slots (
    pool TEXT NOT NULL,
    slot INTEGER NOT NULL,
    holder TEXT NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (pool, slot)
);
";

/// Indexes over columns a database from an earlier version may lack (added by [`migrate`]).
const INDEXES: &str = "
DROP INDEX IF EXISTS queue_visible;
CREATE INDEX IF NOT EXISTS queue_lane_visible ON queue (lane, visible_at, id);
DROP INDEX IF EXISTS tasks_due;
CREATE INDEX IF NOT EXISTS tasks_waiting ON tasks (waiting_since) WHERE waiting_since IS NOT NULL;
DROP INDEX IF EXISTS tasks_open;
";

fn has_column(c: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    c.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists(params![table, column])
}

/// Brings a database written by an earlier version up to date.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    if has_column(c, "tasks", "check_at")? {
        // The column's name before the sweeper's clock had one name everywhere.
        c.execute_batch("ALTER TABLE tasks RENAME COLUMN check_at TO waiting_since;")?;
    }
    if !has_column(c, "tasks", "waiting_since")? {
        c.execute_batch("ALTER TABLE tasks ADD COLUMN waiting_since INTEGER;")?;
        // Unfinished tasks are re-enqueued at start-up; from then on they are swept normally.
        c.execute(
            "UPDATE tasks SET waiting_since = ?1 WHERE status IN ('queued', 'processing')",
            [now_ms()],
        )?;
    }
    if !has_column(c, "accounts", "open_tasks")? {
        // Open (queued or processing) tasks per account, kept with the credits: submit adds one
        // under the cap in the debit's statement, the write that ends a task takes it off.
        c.execute_batch(
            "ALTER TABLE accounts ADD COLUMN open_tasks INTEGER NOT NULL DEFAULT 0;
             UPDATE accounts SET open_tasks = (SELECT COUNT(*) FROM tasks
                 WHERE tasks.account_id = accounts.id AND tasks.status IN ('queued', 'processing'));",
        )?;
    }
    if !has_column(c, "queue", "lane")? {
        // Messages queued before the lanes existed are generation work's (a `Deliver` among
        // them is still handled there: every worker handles every kind).
        c.execute_batch("ALTER TABLE queue ADD COLUMN lane TEXT NOT NULL DEFAULT 'work';")?;
    }
    c.execute_batch(INDEXES)
}

fn internal(e: impl Into<tasklane_core::ports::BoxError>) -> PortError {
    PortError::internal(e)
}

fn db_err(e: rusqlite::Error) -> PortError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            PortError::unavailable(e)
        }
        _ => internal(e),
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn now_ms() -> i64 {
    millis(Utc::now())
}

fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The SQLite database file shared by [`SqliteStore`] and [`SqliteQueue`].
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (creating when missing) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Db> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection from a blocking thread.
    async fn with<T, F>(&self, f: F) -> PortResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> PortResult<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| internal("database mutex poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(internal)?
    }
}

/// The task store on SQLite.
#[derive(Clone)]
pub struct SqliteStore {
    db: Db,
}

impl SqliteStore {
    /// A store over `db`.
    pub fn new(db: Db) -> Self {
        SqliteStore { db }
    }

    /// At start-up no worker of an earlier process is alive: drop the leases they held so
    /// their tasks are taken up again at once. Returns the ids of every unfinished task.
    pub async fn recover(&self) -> PortResult<Vec<String>> {
        self.db
            .with(|c| {
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                let rows: Vec<(String, String)> = {
                    let mut st = tx
                        .prepare(
                            "SELECT id, doc FROM tasks WHERE status IN ('queued', 'processing')",
                        )
                        .map_err(db_err)?;
                    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                        .map_err(db_err)?
                        .collect::<Result<_, _>>()
                        .map_err(db_err)?
                };
                let mut ids = Vec::with_capacity(rows.len());
                for (id, doc) in rows {
                    let mut task: Task = serde_json::from_str(&doc).map_err(internal)?;
                    if task.status == TaskStatus::Processing && task.lease_until.is_some() {
                        task.lease_until = None;
                        task.version += 1;
                        write_task(&tx, &task, task.version - 1)?;
                    }
                    ids.push(id);
                }
                tx.commit().map_err(db_err)?;
                Ok(ids)
            })
            .await
    }
}

fn read_account(c: &Connection, sql: &str, arg: &str) -> PortResult<Option<Account>> {
    c.query_row(sql, [arg], |r| {
        Ok(Account {
            id: r.get(0)?,
            key_hash: r.get(1)?,
            credits: r.get::<_, i64>(2)? as u64,
            granted: r.get::<_, i64>(3)? as u64,
            webhook_secret: r.get(4)?,
            created_at: r.get::<_, String>(5)?.parse().unwrap_or_default(),
            open_tasks: r.get::<_, i64>(6)?.max(0) as u64,
        })
    })
    .optional()
    .map_err(db_err)
}

const ACCOUNT_COLS: &str =
    "SELECT id, key_hash, credits, granted, webhook_secret, created_at, open_tasks FROM accounts";

fn read_task(c: &Connection, id: &str) -> PortResult<Option<Task>> {
    let doc: Option<String> = c
        .query_row("SELECT doc FROM tasks WHERE id = ?1", [id], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    doc.map(|d| serde_json::from_str(&d).map_err(internal))
        .transpose()
}

/// Writes `task` if the stored version is still `expected_version`.
fn write_task(c: &Connection, task: &Task, expected_version: u64) -> PortResult<()> {
    let doc = serde_json::to_string(task).map_err(internal)?;
    let n = c
        .execute(
            "UPDATE tasks SET status = ?2, version = ?3, doc = ?4, waiting_since = ?6 WHERE id = ?1 AND version = ?5",
            params![
                task.id,
                task.status.as_str(),
                task.version as i64,
                doc,
                expected_version as i64,
                task.waiting_since.map(millis),
            ],
        )
        .map_err(db_err)?;
    if n == 1 {
        Ok(())
    } else {
        Err(internal("task version changed during a locked transaction"))
    }
}

#[async_trait]
impl TaskStore for SqliteStore {
    async fn create_account(&self, account: &Account) -> PortResult<()> {
        let a = account.clone();
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO accounts (id, key_hash, credits, granted, webhook_secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![a.id, a.key_hash, a.credits as i64, a.granted as i64, a.webhook_secret, a.created_at.to_rfc3339()],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn account_by_key_hash(&self, key_hash: &str) -> PortResult<Option<Account>> {
        let h = key_hash.to_string();
        self.db
            .with(move |c| read_account(c, &format!("{ACCOUNT_COLS} WHERE key_hash = ?1"), &h))
            .await
    }

    async fn account(&self, account_id: &str) -> PortResult<Option<Account>> {
        let id = account_id.to_string();
        self.db
            .with(move |c| read_account(c, &format!("{ACCOUNT_COLS} WHERE id = ?1"), &id))
            .await
    }

    async fn grant_credits(&self, account_id: &str, credits: u64) -> PortResult<Account> {
        let id = account_id.to_string();
        self.db
            .with(move |c| {
                let n = c
                    .execute(
                        "UPDATE accounts SET credits = credits + ?2, granted = granted + ?2 WHERE id = ?1",
                        params![id, credits as i64],
                    )
                    .map_err(db_err)?;
                if n == 0 {
                    return Err(PortError::NotFound);
                }
                read_account(c, &format!("{ACCOUNT_COLS} WHERE id = ?1"), &id)?.ok_or(PortError::NotFound)
            })
            .await
    }

    async fn set_key_hash(&self, account_id: &str, key_hash: &str) -> PortResult<()> {
        let (id, h) = (account_id.to_string(), key_hash.to_string());
        self.db
            .with(move |c| {
                let n = c
                    .execute(
                        "UPDATE accounts SET key_hash = ?2 WHERE id = ?1",
                        params![id, h],
                    )
                    .map_err(db_err)?;
                if n == 0 {
                    Err(PortError::NotFound)
                } else {
                    Ok(())
                }
            })
            .await
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
        let (acct, key, hash) = (
            account_id.to_string(),
            key.to_string(),
            request_hash.to_string(),
        );
        let now = millis(now);
        self.db
            .with(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
                let row: Option<(String, Option<String>, i64, i64)> = tx
                    .query_row(
                        "SELECT request_hash, task_id, locked_until, expires_at FROM idempotency WHERE account_id = ?1 AND key = ?2",
                        params![acct, key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()
                    .map_err(db_err)?;
                let outcome = match row {
                    Some((h, _, _, expires)) if expires <= now => {
                        let _ = h;
                        None
                    }
                    Some((h, Some(task_id), _, _)) => Some(Reservation::Completed { request_hash: h, task_id }),
                    Some((h, None, locked_until, _)) if locked_until > now => Some(Reservation::InProgress { request_hash: h }),
                    _ => None,
                };
                let outcome = match outcome {
                    Some(o) => o,
                    None => {
                        let token = ulid::Ulid::new().to_string();
                        tx.execute(
                            "INSERT OR REPLACE INTO idempotency (account_id, key, request_hash, token, task_id, locked_until, expires_at) VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)",
                            params![acct, key, hash, token, now + dur_ms(in_flight), now + dur_ms(retain)],
                        )
                        .map_err(db_err)?;
                        Reservation::Reserved { token }
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok(outcome)
            })
            .await
    }

    async fn release_idempotency(
        &self,
        account_id: &str,
        key: &str,
        token: &str,
    ) -> PortResult<()> {
        let (a, k, t) = (account_id.to_string(), key.to_string(), token.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM idempotency WHERE account_id = ?1 AND key = ?2 AND token = ?3 AND task_id IS NULL",
                    params![a, k, t],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn insert_task(
        &self,
        task: &Task,
        claim: Option<&IdempotencyClaim>,
        max_open: u64,
    ) -> PortResult<()> {
        let task = task.clone();
        let claim = claim.cloned();
        self.db
            .with(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
                let cost = task.cost.credits as i64;
                let max_open = i64::try_from(max_open).unwrap_or(i64::MAX);
                let debited = tx
                    .execute(
                        "UPDATE accounts SET credits = credits - ?2, open_tasks = open_tasks + 1 \
                         WHERE id = ?1 AND credits >= ?2 AND open_tasks < ?3",
                        params![task.account_id, cost, max_open],
                    )
                    .map_err(db_err)?;
                if debited == 0 {
                    let found: Option<(i64, i64)> = tx
                        .query_row(
                            "SELECT credits, open_tasks FROM accounts WHERE id = ?1",
                            [&task.account_id],
                            |r| Ok((r.get(0)?, r.get(1)?)),
                        )
                        .optional()
                        .map_err(db_err)?;
                    // As on DynamoDB: too few credits is reported before the cap.
                    return Err(match found {
                        Some((credits, _)) if credits < cost => PortError::InsufficientCredits { available: credits as u64 },
                        Some(_) => PortError::TooManyOpenTasks { limit: max_open as u64 },
                        None => PortError::NotFound,
                    });
                }
                if let Some(claim) = &claim {
                    let n = tx
                        .execute(
                            "UPDATE idempotency SET task_id = ?4 WHERE account_id = ?1 AND key = ?2 AND token = ?3 AND task_id IS NULL",
                            params![task.account_id, claim.key, claim.token, task.id],
                        )
                        .map_err(db_err)?;
                    if n == 0 {
                        return Err(PortError::ReservationLost);
                    }
                }
                let doc = serde_json::to_string(&task).map_err(internal)?;
                tx.execute(
                    "INSERT INTO tasks (id, account_id, status, model, version, doc, waiting_since) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![task.id, task.account_id, task.status.as_str(), task.model, task.version as i64, doc, task.waiting_since.map(millis)],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn task(&self, task_id: &str) -> PortResult<Option<Task>> {
        let id = task_id.to_string();
        self.db.with(move |c| read_task(c, &id)).await
    }

    async fn list_tasks(&self, account_id: &str, query: &ListQuery) -> PortResult<TaskPage> {
        let (acct, q) = (account_id.to_string(), query.clone());
        // At most `budget` of the account's tasks are read, newest first; the filters are
        // applied to them (tasklane_core::api::list_read_budget).
        let budget = list_read_budget(&q);
        self.db
            .with(move |c| {
                let mut sql =
                    String::from("SELECT id, status, model, doc FROM tasks WHERE account_id = ?1");
                let mut args: Vec<String> = vec![acct];
                if let Some(b) = &q.before {
                    args.push(b.clone());
                    sql.push_str(&format!(" AND id < ?{}", args.len()));
                }
                sql.push_str(&format!(" ORDER BY id DESC LIMIT {budget}"));
                let mut st = c.prepare(&sql).map_err(db_err)?;
                let mut rows = st
                    .query(rusqlite::params_from_iter(args.iter()))
                    .map_err(db_err)?;
                let (mut read, mut last_read) = (0usize, None::<String>);
                let mut docs: Vec<String> = Vec::new();
                while let Some(r) = rows.next().map_err(db_err)? {
                    let (id, status, model): (String, String, String) = (
                        r.get(0).map_err(db_err)?,
                        r.get(1).map_err(db_err)?,
                        r.get(2).map_err(db_err)?,
                    );
                    read += 1;
                    let wanted = q.status.is_none_or(|s| s.as_str() == status)
                        && q.model.as_ref().is_none_or(|m| *m == model);
                    if wanted {
                        docs.push(r.get(3).map_err(db_err)?);
                        if docs.len() > q.limit {
                            break;
                        }
                    }
                    last_read = Some(id);
                }
                let more = docs.len() > q.limit;
                let tasks: Vec<Task> = docs
                    .iter()
                    .take(q.limit)
                    .map(|d| serde_json::from_str(d).map_err(internal))
                    .collect::<Result<_, _>>()?;
                let next_before = if more {
                    tasks.last().map(|t| t.id.clone())
                } else if read == budget {
                    // Stopped at the budget: more may follow the last task read.
                    last_read
                } else {
                    None
                };
                Ok(TaskPage { tasks, next_before })
            })
            .await
    }

    async fn acquire_slot(
        &self,
        pool: &str,
        slots: u32,
        holder: &str,
        until: DateTime<Utc>,
    ) -> PortResult<bool> {
        let (pool, holder) = (pool.to_string(), holder.to_string());
        let (now, until) = (millis(Utc::now()), millis(until));
        self.db
            .with(move |c| {
                // One connection, behind a mutex: the read and the write below are not
                // interleaved with another acquire.
                let held: Vec<(i64, String, i64)> = c
                    .prepare("SELECT slot, holder, until FROM slots WHERE pool = ?1")
                    .map_err(db_err)?
                    .query_map(params![pool], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(db_err)?
                    .collect::<Result<_, _>>()
                    .map_err(db_err)?;
                let mine = held.iter().find(|(_, h, _)| *h == holder).map(|(n, ..)| *n);
                let free = || {
                    (0..i64::from(slots))
                        .find(|n| held.iter().all(|(slot, _, end)| slot != n || *end <= now))
                };
                let Some(slot) = mine.or_else(free) else {
                    return Ok(false);
                };
                c.execute(
                    "INSERT INTO slots (pool, slot, holder, until) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (pool, slot) DO UPDATE SET holder = ?3, until = ?4",
                    params![pool, slot, holder, until],
                )
                .map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn release_slot(&self, pool: &str, holder: &str) -> PortResult<()> {
        let (pool, holder) = (pool.to_string(), holder.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM slots WHERE pool = ?1 AND holder = ?2",
                    params![pool, holder],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn due_tasks(&self, cutoff: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        let since = millis(cutoff);
        self.db
            .with(move |c| {
                let mut st = c
                    .prepare("SELECT doc FROM tasks WHERE waiting_since IS NOT NULL AND waiting_since <= ?1 ORDER BY waiting_since LIMIT ?2")
                    .map_err(db_err)?;
                let docs: Vec<String> = st
                    .query_map(params![since, limit as i64], |r| r.get(0))
                    .map_err(db_err)?
                    .collect::<Result<_, _>>()
                    .map_err(db_err)?;
                docs.iter()
                    .map(|d| serde_json::from_str(d).map_err(internal))
                    .collect()
            })
            .await
    }

    async fn update_task(&self, task_id: &str, transition: &Transition) -> PortResult<Task> {
        let (id, t) = (task_id.to_string(), transition.clone());
        self.db
            .with(move |c| {
                let tx = c
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(db_err)?;
                let mut task = read_task(&tx, &id)?.ok_or(PortError::NotFound)?;
                let old_version = task.version;
                let applied = apply(&mut task, &t, Utc::now())?;
                if task.version != old_version {
                    write_task(&tx, &task, old_version)?;
                    let (refund, closed) = (applied.refund(), applied.closed());
                    if refund > 0 || closed {
                        tx.execute(
                            "UPDATE accounts SET credits = credits + ?2, open_tasks = open_tasks - ?3 WHERE id = ?1",
                            params![task.account_id, refund as i64, i64::from(closed)],
                        )
                        .map_err(db_err)?;
                    }
                    tx.commit().map_err(db_err)?;
                }
                Ok(task)
            })
            .await
    }
}

/// The work queue on SQLite: at-least-once, delayed messages, visibility timeout.
#[derive(Clone)]
pub struct SqliteQueue {
    db: Db,
    wake: Arc<Notify>,
    /// The lane's name in the `queue` table: `work` or `deliveries`.
    lane: &'static str,
}

impl SqliteQueue {
    /// The queue of generation work over `db`.
    pub fn new(db: Db) -> Self {
        Self::of(db, Lane::Work)
    }

    /// The queue of `lane` over `db`.
    pub fn of(db: Db, lane: Lane) -> Self {
        SqliteQueue {
            db,
            wake: Arc::new(Notify::new()),
            lane: match lane {
                Lane::Work => "work",
                Lane::Deliveries => "deliveries",
            },
        }
    }

    async fn receive_batch(&self, max: usize, visibility: Duration) -> PortResult<Vec<Delivery>> {
        let lane = self.lane;
        self.db
            .with(move |c| {
                let now = now_ms();
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
                let rows: Vec<(i64, String, i64)> = {
                    let mut st = tx
                        .prepare("SELECT id, body, receive_count FROM queue WHERE lane = ?3 AND visible_at <= ?1 ORDER BY visible_at, id LIMIT ?2")
                        .map_err(db_err)?;
                    st.query_map(params![now, max as i64, lane], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .map_err(db_err)?
                        .collect::<Result<_, _>>()
                        .map_err(db_err)?
                };
                let mut out = Vec::with_capacity(rows.len());
                for (id, body, count) in rows {
                    let receipt = ulid::Ulid::new().to_string();
                    tx.execute(
                        "UPDATE queue SET visible_at = ?2, receive_count = receive_count + 1, receipt = ?3 WHERE id = ?1",
                        params![id, now + dur_ms(visibility), receipt],
                    )
                    .map_err(db_err)?;
                    out.push(Delivery {
                        handle: format!("{id}:{receipt}"),
                        message: serde_json::from_str(&body).ok(),
                        receive_count: (count + 1) as u32,
                    });
                }
                tx.commit().map_err(db_err)?;
                Ok(out)
            })
            .await
    }

    /// At start-up: messages received by a process that died become visible at once.
    pub async fn release_in_flight(&self) -> PortResult<usize> {
        self.db
            .with(|c| {
                c.execute(
                    "UPDATE queue SET visible_at = ?1, receipt = NULL WHERE receipt IS NOT NULL",
                    [now_ms()],
                )
                .map_err(db_err)
            })
            .await
    }

    /// When the next message becomes visible, if any is queued.
    pub async fn next_visible_at(&self) -> PortResult<Option<DateTime<Utc>>> {
        let lane = self.lane;
        self.db
            .with(move |c| {
                let ms: Option<i64> = c
                    .query_row(
                        "SELECT MIN(visible_at) FROM queue WHERE lane = ?1",
                        [lane],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                Ok(ms.and_then(DateTime::from_timestamp_millis))
            })
            .await
    }
}

fn parse_handle(handle: &str) -> PortResult<(i64, String)> {
    handle
        .split_once(':')
        .and_then(|(id, r)| Some((id.parse().ok()?, r.to_string())))
        .ok_or_else(|| internal(format!("bad message handle {handle:?}")))
}

#[async_trait]
impl MessageSource for SqliteQueue {
    async fn receive(&self, max: usize, visibility: Duration) -> PortResult<Vec<Delivery>> {
        self.receive_batch(max, visibility).await
    }

    async fn ack(&self, d: &Delivery) -> PortResult<()> {
        let (id, receipt) = parse_handle(&d.handle)?;
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM queue WHERE id = ?1 AND receipt = ?2",
                    params![id, receipt],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn retry(&self, d: &Delivery, delay: Duration) -> PortResult<()> {
        let (id, receipt) = parse_handle(&d.handle)?;
        self.db
            .with(move |c| {
                c.execute(
                    "UPDATE queue SET visible_at = ?3, receipt = NULL WHERE id = ?1 AND receipt = ?2",
                    params![id, receipt, now_ms() + dur_ms(delay)],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn wait_for_work(&self, max: Duration) {
        let nap = match self.next_visible_at().await {
            Ok(Some(t)) => (t - Utc::now()).to_std().unwrap_or_default().min(max),
            _ => max,
        };
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(nap.max(Duration::from_millis(5))) => {}
        }
    }
}

#[async_trait]
impl WorkQueue for SqliteQueue {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        let body = serde_json::to_string(message).map_err(internal)?;
        let lane = self.lane;
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO queue (body, visible_at, lane) VALUES (?1, ?2, ?3)",
                    params![body, now_ms() + dur_ms(delay), lane],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await?;
        if delay.is_zero() {
            self.wake.notify_one();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasklane_core::task::{Cost, TaskInput};

    fn queued(id: &str, account_id: &str) -> Task {
        Task {
            id: id.into(),
            account_id: account_id.into(),
            model: "echo".into(),
            action: "generate".into(),
            status: TaskStatus::Queued,
            progress: 0,
            input: TaskInput {
                prompt: Some("x".into()),
                duration: None,
                params: serde_json::Map::new(),
            },
            outputs: vec![],
            error: None,
            cost: Cost {
                credits: 1,
                refunded: false,
            },
            callback: None,
            metadata: Default::default(),
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            attempts: 0,
            lease_until: None,
            version: 1,
            waiting_since: Some(Utc::now()),
            requeues: 0,
            slot_wait_at: None,
            upstream: None,
        }
    }

    #[tokio::test]
    async fn a_database_from_before_the_open_task_count_is_migrated_with_the_real_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasklane.db");
        let account = Account::create(10, None).account;
        {
            let store = SqliteStore::new(Db::open(&path).unwrap());
            store.create_account(&account).await.unwrap();
            for i in 0..3 {
                let id = format!("task_0000000000000000000000000{i}");
                store
                    .insert_task(&queued(&id, &account.id), None, u64::MAX)
                    .await
                    .unwrap();
            }
            store
                .update_task("task_00000000000000000000000000", &Transition::Cancel)
                .await
                .unwrap();
        }
        // What an earlier version wrote: no open_tasks column.
        Connection::open(&path)
            .unwrap()
            .execute_batch("ALTER TABLE accounts DROP COLUMN open_tasks;")
            .unwrap();

        let store = SqliteStore::new(Db::open(&path).unwrap());
        let next = queued("task_00000000000000000000000009", &account.id);
        // Two tasks are open: a cap of 2 refuses, a cap of 3 admits.
        let refused = store.insert_task(&next, None, 2).await;
        assert!(
            matches!(refused, Err(PortError::TooManyOpenTasks { limit: 2 })),
            "{refused:?}"
        );
        store.insert_task(&next, None, 3).await.unwrap();
    }

    #[tokio::test]
    async fn a_database_whose_column_is_still_check_at_is_migrated_and_its_waiting_tasks_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasklane.db");
        let account = Account::create(10, None).account;
        let task = queued("task_00000000000000000000000001", &account.id);
        {
            let store = SqliteStore::new(Db::open(&path).unwrap());
            store.create_account(&account).await.unwrap();
            store.insert_task(&task, None, u64::MAX).await.unwrap();
        }
        // What an earlier version wrote: the column and the task document say `check_at`.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "DROP INDEX tasks_waiting;
             ALTER TABLE tasks RENAME COLUMN waiting_since TO check_at;
             CREATE INDEX tasks_due ON tasks (check_at) WHERE check_at IS NOT NULL;
             UPDATE tasks SET doc = replace(doc, '\"waiting_since\"', '\"check_at\"');",
        )
        .unwrap();
        let doc: String = old
            .query_row("SELECT doc FROM tasks", [], |r| r.get(0))
            .unwrap();
        assert!(doc.contains("\"check_at\""), "{doc}");
        drop(old);

        let store = SqliteStore::new(Db::open(&path).unwrap());
        let stored = store.task(&task.id).await.unwrap().unwrap();
        assert_eq!(stored.waiting_since, task.waiting_since);
        let due = store
            .due_tasks(Utc::now() + chrono::Duration::seconds(1), 10)
            .await
            .unwrap();
        assert_eq!(
            due.len(),
            1,
            "the migrated task is found by the sweeper's query"
        );
        let now = Connection::open(&path).unwrap();
        assert!(!has_column(&now, "tasks", "check_at").unwrap());
        assert!(has_column(&now, "tasks", "waiting_since").unwrap());
    }

    #[tokio::test]
    async fn slots_go_to_at_most_their_number_of_holders_and_free_themselves_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::new(Db::open(&dir.path().join("t.db")).unwrap());
        let now = Utc::now();
        let past = now - chrono::TimeDelta::seconds(1);
        let later = now + chrono::TimeDelta::hours(1);
        assert!(store.acquire_slot("m", 2, "a", later).await.unwrap());
        assert!(store.acquire_slot("m", 2, "b", past).await.unwrap());
        // b's time has run out: c takes its slot over; d finds none; a keeps its own.
        assert!(store.acquire_slot("m", 2, "c", later).await.unwrap());
        assert!(!store.acquire_slot("m", 2, "d", later).await.unwrap());
        assert!(store.acquire_slot("m", 2, "a", later).await.unwrap());
        store.release_slot("m", "b").await.unwrap();
        assert!(
            !store.acquire_slot("m", 2, "d", later).await.unwrap(),
            "b held nothing"
        );
        store.release_slot("m", "a").await.unwrap();
        assert!(store.acquire_slot("m", 2, "d", later).await.unwrap());
        assert!(store.acquire_slot("other", 1, "e", later).await.unwrap());
    }
}
