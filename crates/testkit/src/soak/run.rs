//! The run itself: a local server under seeded faults, the clients, the drain, and the check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Client;
use serde_json::{Value, json};
use tasklane_core::App;
use tasklane_core::account::Account;
use tasklane_core::ports::ListQuery;
use tasklane_core::task::Task;
use tasklane_local::{Backends, LocalConfig};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::SoakOptions;
use super::check::{check, is_ack};
use super::history::{AccountState, Answer, Op, Seen};
use super::report::SoakReport;
use crate::chaos::{Chaos, ChaosConfig};

/// The server side the clients share.
struct Shared {
    http: Client,
    base: String,
    keys: Vec<String>,
    start: Instant,
    opts: SoakOptions,
    remaining: AtomicUsize,
}

type Sent = Result<(u16, Value), String>;

/// A client-side failure as a short label (`transport: timeout`, `connect`, `body`, `request`),
/// shared with `tasklane-bench`.
pub fn transport_kind(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    format!("transport: {kind}")
}

fn retryable(res: &Sent) -> bool {
    match res {
        Err(_) => true,
        Ok((s, body)) => {
            matches!(s, 429 | 500 | 502 | 503 | 504)
                || (*s == 409 && body["error"]["code"] == "idempotency_in_progress")
        }
    }
}

fn backoff(attempt: u32, rng: &mut StdRng) -> Duration {
    let base = (10u64 << attempt.min(6)).min(500);
    Duration::from_millis(base / 2 + rng.random_range(0..=base / 2))
}

impl Shared {
    async fn send(&self, req: reqwest::RequestBuilder) -> (Duration, Duration, Sent) {
        let sent = self.start.elapsed();
        let res = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(b) => Ok((status, serde_json::from_slice(&b).unwrap_or(Value::Null))),
                    Err(e) => Err(transport_kind(&e)),
                }
            }
            Err(e) => Err(transport_kind(&e)),
        };
        (sent, self.start.elapsed(), res)
    }

    fn record(
        client: Option<usize>,
        op: Op,
        key: Option<&str>,
        task_id: Option<&str>,
        (sent, received, res): &(Duration, Duration, Sent),
    ) -> Answer {
        let (http, error, seen, named) = match res {
            Ok((s, body)) => (
                Some(*s),
                body["error"]["code"].as_str().map(str::to_string),
                Seen::from_view(body),
                body["task_id"].as_str().map(str::to_string),
            ),
            Err(kind) => (None, Some(kind.clone()), None, None),
        };
        Answer {
            client,
            op,
            key: key.map(str::to_string),
            task_id: task_id.map(str::to_string).or(named),
            sent: *sent,
            received: *received,
            http,
            error,
            seen,
        }
    }

    fn get(&self, acct: usize, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.keys[acct])
    }

    fn post(&self, acct: usize, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.keys[acct])
            .json(body)
    }
}

/// What one client did.
#[derive(Default)]
struct ClientRun {
    answers: Vec<Answer>,
    submits: usize,
    acknowledged: usize,
    refused: usize,
    abandoned: usize,
    replays: usize,
    retries: u64,
    cancels_sent: usize,
    /// When its submits were done, since the run started.
    submitted: Duration,
    /// When it had seen each of its tasks terminal (`None`: not within `settle_timeout`).
    settled: Option<Duration>,
}

impl ClientRun {
    /// Sends `make()` until a definitive answer (or the attempt cap); returns the last answer.
    async fn until_definitive(
        &mut self,
        shared: &Shared,
        rng: &mut StdRng,
        who: (usize, Op),
        key: Option<&str>,
        task_id: Option<&str>,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Option<Answer> {
        for attempt in 0..shared.opts.max_request_attempts {
            if attempt > 0 {
                self.retries += 1;
                tokio::time::sleep(backoff(attempt, rng)).await;
            }
            let sent = shared.send(make()).await;
            let answer = Shared::record(Some(who.0), who.1, key, task_id, &sent);
            self.answers.push(answer.clone());
            if !retryable(&sent.2) {
                return Some(answer);
            }
        }
        None
    }
}

/// A submit body drawn from the mix.
fn pick_body(rng: &mut StdRng, o: &SoakOptions, client: usize, n: usize) -> Value {
    let prompt = format!("soak {client}-{n}");
    let r: f64 = rng.random();
    let mut edge = o.fail_ratio;
    if r < edge {
        return json!({"model": "echo", "prompt": prompt, "params": {"fail": "asked to fail by the soak run"}});
    }
    edge += o.slow_ratio;
    if r < edge {
        let ms = rng.random_range(1..=o.max_sleep_ms.max(1));
        return json!({"model": "echo", "prompt": prompt, "params": {"sleep_ms": ms}});
    }
    edge += o.image_ratio;
    if r < edge {
        return json!({"model": "demo-image", "prompt": prompt, "params": {"width": 16, "height": 16}});
    }
    edge += o.video_ratio;
    if r < edge {
        return json!({"model": "veo3", "prompt": prompt, "duration": 1, "params": {"fps": 4}});
    }
    json!({"model": "echo", "prompt": prompt})
}

async fn client_loop(shared: Arc<Shared>, c: usize) -> ClientRun {
    let o = shared.opts.clone();
    let acct = c % shared.keys.len();
    let mut rng =
        StdRng::seed_from_u64(o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (c as u64 + 1));
    let mut run = ClientRun::default();
    let mut mine: Vec<String> = Vec::new();
    let mut n = 0usize;
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let note = |finished: &mut BTreeSet<String>, a: &Answer| {
        if let (Some(id), Some(s)) = (&a.task_id, &a.seen)
            && s.status.is_terminal()
        {
            finished.insert(id.clone());
        }
    };
    while shared
        .remaining
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            left.checked_sub(1)
        })
        .is_ok()
    {
        n += 1;
        run.submits += 1;
        let body = pick_body(&mut rng, &o, c, n);
        let key = format!("soak-{}-{c}-{n}", o.seed);
        let submit = || {
            shared
                .post(acct, "/tasks", &body)
                .header("Idempotency-Key", &key)
        };
        let answer = run
            .until_definitive(
                &shared,
                &mut rng,
                (c, Op::Submit),
                Some(&key),
                None,
                &submit,
            )
            .await;
        let id = match &answer {
            Some(a) if is_ack(a) => a.task_id.clone(),
            Some(_) => {
                run.refused += 1;
                None
            }
            None => {
                run.abandoned += 1;
                // Give the slot back: the run is about acknowledged submits.
                shared.remaining.fetch_add(1, Ordering::AcqRel);
                None
            }
        };
        if let Some(id) = id {
            run.acknowledged += 1;
            mine.push(id.clone());
            if rng.random_bool(o.cancel_ratio.clamp(0.0, 1.0)) {
                run.cancels_sent += 1;
                let path = format!("/tasks/{id}/cancel");
                let empty = json!({});
                let cancel = || shared.post(acct, &path, &empty);
                run.until_definitive(&shared, &mut rng, (c, Op::Cancel), None, Some(&id), cancel)
                    .await;
            }
            if rng.random_bool(o.replay_ratio.clamp(0.0, 1.0)) {
                run.replays += 1;
                run.until_definitive(
                    &shared,
                    &mut rng,
                    (c, Op::Submit),
                    Some(&key),
                    None,
                    &submit,
                )
                .await;
            }
        }
        if !mine.is_empty() && rng.random_bool(o.poll_ratio.clamp(0.0, 1.0)) {
            let id = mine[rng.random_range(0..mine.len())].clone();
            let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
            run.answers
                .push(Shared::record(Some(c), Op::Poll, None, Some(&id), &sent));
        }
    }
    run.submitted = shared.start.elapsed();

    // Settle, faults still on: poll every own task until each has been seen terminal.
    for a in &run.answers {
        note(&mut finished, a);
    }
    let deadline = Instant::now() + o.settle_timeout;
    loop {
        let open: Vec<&String> = mine.iter().filter(|id| !finished.contains(*id)).collect();
        if open.is_empty() {
            run.settled = Some(shared.start.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        let open: Vec<String> = open.into_iter().cloned().collect();
        for id in open {
            let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
            let a = Shared::record(Some(c), Op::Poll, None, Some(&id), &sent);
            note(&mut finished, &a);
            run.answers.push(a);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    run
}

/// Reads every task of `accounts` from the store, newest first per account.
async fn stored_tasks(app: &App, accounts: &[String]) -> anyhow::Result<Vec<Task>> {
    let mut all = Vec::new();
    for acct in accounts {
        let mut before = None;
        loop {
            let q = ListQuery {
                limit: 100,
                before: before.clone(),
                ..ListQuery::default()
            };
            let page = app
                .store
                .list_tasks(acct, &q)
                .await
                .with_context(|| format!("listing the tasks of {acct}"))?;
            all.extend(page.tasks);
            match page.next_before {
                Some(b) => before = Some(b),
                None => break,
            }
        }
    }
    Ok(all)
}

/// GETs every task in `ids` (`clients` at a time) and records the answers as `op`.
async fn read_all(shared: &Arc<Shared>, ids: Vec<(usize, String)>, op: Op) -> Vec<Answer> {
    let queue = Arc::new(Mutex::new(ids));
    let mut set = JoinSet::new();
    for _ in 0..shared.opts.clients.max(1) {
        let (shared, queue) = (shared.clone(), queue.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((acct, id)) = next else {
                    break;
                };
                let sent = shared.send(shared.get(acct, &format!("/tasks/{id}"))).await;
                out.push(Shared::record(None, op, None, Some(&id), &sent));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(out) = r {
            all.extend(out);
        }
    }
    all
}

/// Lists every task of account `acct` through the API (`GET /v1/tasks`), one answer per task.
async fn list_all(shared: &Shared, acct: usize) -> anyhow::Result<Vec<Answer>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/tasks?limit=100&cursor={c}"),
            None => "/tasks?limit=100".to_string(),
        };
        let mut page = None;
        for attempt in 0..shared.opts.max_request_attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (sent, received, res) = shared.send(shared.get(acct, &path)).await;
            match res {
                Ok((200, body)) => {
                    page = Some((sent, received, body));
                    break;
                }
                other if retryable(&other) => continue,
                other => anyhow::bail!("GET /v1{path} answered {other:?}"),
            }
        }
        let (sent, received, body) = page.with_context(|| format!("GET /v1{path} kept failing"))?;
        for item in body["data"].as_array().map_or(&[][..], Vec::as_slice) {
            let id = item["task_id"].as_str();
            let one = (sent, received, Ok((200, item.clone())));
            out.push(Shared::record(None, Op::List, None, id, &one));
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    Ok(out)
}

/// Runs a soak: starts a server on `backends` (the embedded ones when `None`) with its data in
/// `data_dir`, drives it as [`SoakOptions`] say, drains, checks and shuts it down.
pub async fn run(
    opts: SoakOptions,
    backends: Option<Backends>,
    data_dir: &Path,
) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(opts.tasks >= 1, "tasks must be at least 1");
    anyhow::ensure!(opts.clients >= 1, "clients must be at least 1");
    anyhow::ensure!(opts.accounts >= 1, "accounts must be at least 1");
    let backend = if backends.is_some() {
        "backends supplied by the caller".to_string()
    } else {
        format!("embedded backends (SQLite in {})", data_dir.display())
    };
    let run_start = Instant::now();
    let chaos = Chaos::new(ChaosConfig {
        seed: opts.seed,
        fail: opts.fail,
        duplicate: opts.duplicate,
        delay: opts.delay,
        max_delay: opts.max_delay,
        crash: opts.crash,
    });
    // Off while the accounts are created; on for the load.
    chaos.set_enabled(false);
    let mut cfg = LocalConfig {
        addr: "127.0.0.1:0".parse()?,
        data_dir: data_dir.to_path_buf(),
        workers: opts.workers.max(1),
        demo_time_scale: 0.2,
        shutdown_grace: Duration::from_secs(10),
        ..LocalConfig::default()
    };
    cfg.core.rate_limit = None;
    cfg.core.max_open_tasks = (opts.tasks as u64).saturating_mul(2).max(1000);
    cfg.core.lease = opts.lease;
    cfg.core.visibility = opts.visibility;
    cfg.core.sweep_after = opts.sweep_after;
    cfg.core.sweep_interval = opts.sweep_interval;
    cfg.core.idempotency_in_flight = opts.idempotency_in_flight;
    cfg.core.callback_allow_private = true;
    let running = tasklane_local::start_on(cfg, backends, crate::chaos::hooks(chaos.clone()))
        .await
        .context("starting the server")?;
    let app = running.app.clone();

    // Accounts with enough credits for every task they may be given (veo3 costs 10).
    let per_account = opts.tasks.div_ceil(opts.accounts) as u64;
    let granted = per_account * 20 + 100;
    let mut keys = Vec::new();
    let mut account_ids = Vec::new();
    for _ in 0..opts.accounts {
        let new = Account::create(granted, None);
        app.store
            .create_account(&new.account)
            .await
            .context("creating an account")?;
        keys.push(new.api_key);
        account_ids.push(new.account.id);
    }

    let http = Client::builder()
        .pool_max_idle_per_host(opts.clients)
        .timeout(opts.request_timeout)
        .build()
        .context("building the HTTP client")?;
    let shared = Arc::new(Shared {
        http,
        base: running.base_url.clone(),
        keys,
        start: Instant::now(),
        opts: opts.clone(),
        remaining: AtomicUsize::new(opts.tasks),
    });

    // Load.
    chaos.set_enabled(true);
    let mut set = JoinSet::new();
    for c in 0..opts.clients {
        set.spawn(client_loop(shared.clone(), c));
    }
    let mut history = Vec::new();
    let mut totals = ClientRun::default();
    let mut all_settled = true;
    while let Some(r) = set.join_next().await {
        let r = r.context("a client task panicked")?;
        history.extend(r.answers);
        totals.submits += r.submits;
        totals.acknowledged += r.acknowledged;
        totals.refused += r.refused;
        totals.abandoned += r.abandoned;
        totals.replays += r.replays;
        totals.retries += r.retries;
        totals.cancels_sent += r.cancels_sent;
        totals.submitted = totals.submitted.max(r.submitted);
        all_settled &= r.settled.is_some();
    }
    let load = shared.start.elapsed();

    // Drain: no more faults; wait until every task is terminal.
    chaos.set_enabled(false);
    let drain_start = Instant::now();
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for a in history.iter().filter(|a| is_ack(a)) {
        if let (Some(id), Some(c)) = (&a.task_id, a.client) {
            owner.insert(id.clone(), c % opts.accounts);
        }
    }
    let terminal_seen = |h: &[Answer]| -> BTreeSet<String> {
        h.iter()
            .filter(|a| a.seen.as_ref().is_some_and(|s| s.status.is_terminal()))
            .filter_map(|a| a.task_id.clone())
            .collect()
    };
    let mut done = terminal_seen(&history);
    let drained = loop {
        let pending: Vec<(usize, String)> = owner
            .iter()
            .filter(|(id, _)| !done.contains(*id))
            .map(|(id, acct)| (*acct, id.clone()))
            .collect();
        let answers = read_all(&shared, pending, Op::Drain).await;
        done.extend(terminal_seen(&answers));
        history.extend(answers);
        let open_in_store = stored_tasks(&app, &account_ids)
            .await?
            .iter()
            .filter(|t| !t.status.is_terminal())
            .count();
        if open_in_store == 0 && owner.keys().all(|id| done.contains(id)) {
            break true;
        }
        if drain_start.elapsed() > opts.drain_timeout {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let drain = drain_start.elapsed();

    // One more read of everything through the API, then the store's own view.
    for acct in 0..opts.accounts {
        history.extend(list_all(&shared, acct).await?);
    }
    let stored = stored_tasks(&app, &account_ids).await?;
    let mut accounts = Vec::new();
    for id in &account_ids {
        let a = app
            .store
            .account(id)
            .await?
            .with_context(|| format!("account {id} disappeared"))?;
        accounts.push(AccountState {
            id: id.clone(),
            granted,
            stored_granted: a.granted,
            credits: a.credits,
        });
    }
    let chaos_counts = chaos.counts();
    running.shutdown().await;

    let checked = check(&history, &stored, &accounts);
    let mut answers = BTreeMap::new();
    let mut answers_by_op = BTreeMap::new();
    for a in &history {
        *answers.entry(a.status_label()).or_insert(0) += 1;
        *answers_by_op.entry((a.op, a.status_label())).or_insert(0) += 1;
    }
    let mut outcomes = BTreeMap::new();
    let mut failure_codes = BTreeMap::new();
    for t in &stored {
        *outcomes.entry(t.status.to_string()).or_insert(0) += 1;
        if let Some(e) = &t.error {
            *failure_codes.entry(e.code.clone()).or_insert(0) += 1;
        }
    }
    Ok(SoakReport {
        options: opts,
        backend,
        submits: totals.submits,
        acknowledged: totals.acknowledged,
        refused: totals.refused,
        abandoned: totals.abandoned,
        replays: totals.replays,
        retries: totals.retries,
        cancels_sent: totals.cancels_sent,
        answers,
        answers_by_op,
        outcomes,
        failure_codes,
        retaken: stored.iter().filter(|t| t.attempts > 1).count(),
        chaos: chaos_counts,
        submit_phase: totals.submitted,
        load,
        settled_under_faults: all_settled,
        drain,
        drained,
        elapsed: run_start.elapsed(),
        checked,
    })
}
