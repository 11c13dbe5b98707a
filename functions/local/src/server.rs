//! The local server: the core's API on 127.0.0.1 with embedded backends and in-process workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use rand::RngCore;
use tasklane_core::account::{Account, hash_api_key};
use tasklane_core::api::Api;
use tasklane_core::chaos::Chaos;
use tasklane_core::config::{env_parse, env_secs};
use tasklane_core::providers::builtin_registry;
use tasklane_core::intercept::{Intercepted, Interceptor};
use tasklane_core::ports::{BlobStore, MessageSource, TaskStore, WorkMessage, WorkQueue};
use tasklane_core::processor::{Processor, run_worker};
use tasklane_core::{ApiError, App, Config};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::files::{FILES_PREFIX, FileBlobs, content_type_of};
use crate::sqlite::{Db, SqliteQueue, SqliteStore};

/// Settings of the local runtime. [`LocalConfig::from_env`] reads the `TASKLANE_*` variables.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Listen address (`TASKLANE_ADDR`, default `127.0.0.1:3000`).
    pub addr: SocketAddr,
    /// Data directory: database file, results folder, signing key (`TASKLANE_DATA_DIR`, default `./.tasklane`).
    pub data_dir: PathBuf,
    /// Use this key for the development account (`TASKLANE_DEV_KEY`).
    pub dev_key: Option<String>,
    /// Starting credits of the development account (`TASKLANE_DEV_CREDITS`, default 10,000).
    pub dev_credits: u64,
    /// In-process workers (`TASKLANE_WORKERS`, default: number of CPUs).
    pub workers: usize,
    /// Base of result URLs (`TASKLANE_PUBLIC_URL`, default `http://<bound address>`).
    pub public_url: Option<String>,
    /// Multiplier on the demo generators' simulated time (`TASKLANE_DEMO_TIME_SCALE`, default 1).
    pub demo_time_scale: f64,
    /// Time in-flight work may take to finish on SIGTERM (`TASKLANE_SHUTDOWN_GRACE`, default 30 s).
    pub shutdown_grace: Duration,
    /// Core settings.
    pub core: Config,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            data_dir: PathBuf::from(".tasklane"),
            dev_key: None,
            dev_credits: 10_000,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            public_url: None,
            demo_time_scale: 1.0,
            shutdown_grace: Duration::from_secs(30),
            core: Config {
                callback_allow_private: true,
                ..Config::default()
            },
        }
    }
}

impl LocalConfig {
    /// Reads the configuration from `TASKLANE_*` environment variables (see the README).
    pub fn from_env() -> anyhow::Result<Self> {
        let mut c = LocalConfig::default();
        if let Some(a) = env_parse("TASKLANE_ADDR")? {
            c.addr = a;
        }
        if let Ok(d) = std::env::var("TASKLANE_DATA_DIR")
            && !d.is_empty()
        {
            c.data_dir = PathBuf::from(d);
        }
        c.dev_key = std::env::var("TASKLANE_DEV_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if let Some(n) = env_parse("TASKLANE_DEV_CREDITS")? {
            c.dev_credits = n;
        }
        if let Some(n) = env_parse::<usize>("TASKLANE_WORKERS")? {
            anyhow::ensure!(n >= 1, "TASKLANE_WORKERS must be at least 1");
            c.workers = n;
        }
        c.public_url = std::env::var("TASKLANE_PUBLIC_URL")
            .ok()
            .filter(|u| !u.is_empty());
        if let Some(s) = env_parse::<f64>("TASKLANE_DEMO_TIME_SCALE")? {
            anyhow::ensure!(
                s.is_finite() && s >= 0.0,
                "TASKLANE_DEMO_TIME_SCALE must be a number, 0 or more"
            );
            c.demo_time_scale = s;
        }
        if let Some(g) = env_secs("TASKLANE_SHUTDOWN_GRACE")? {
            c.shutdown_grace = g;
        }
        c.core.apply_env()?;
        Ok(c)
    }
}

/// Lets tests and fault-injection wrap the adapters the API and processor use.
pub type StoreWrapper = Box<dyn FnOnce(Arc<dyn TaskStore>) -> Arc<dyn TaskStore> + Send>;
/// Wraps the work queue's enqueue side.
pub type QueueWrapper = Box<dyn FnOnce(Arc<dyn WorkQueue>) -> Arc<dyn WorkQueue> + Send>;

/// Optional adapter wrappers for [`start_with`].
#[derive(Default)]
pub struct Hooks {
    /// Wraps the task store.
    pub store: Option<StoreWrapper>,
    /// Wraps the work queue (enqueue side).
    pub queue: Option<QueueWrapper>,
}

/// A running local server.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// `http://<addr>/v1`.
    pub base_url: String,
    /// The development account's API key.
    pub dev_api_key: String,
    /// The development account's id.
    pub dev_account_id: String,
    /// The shared core dependencies.
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    grace: Duration,
}

impl Running {
    /// Stops accepting requests, lets in-flight work finish (up to the grace period) and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let grace = self.grace;
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "grace period over; abandoning in-flight work (it is taken up again at the next start)"
            );
            self.tasks.abort_all();
        }
    }
}

impl Hooks {
    /// Seeded fault injection ([`Chaos`]) on the store and work queue the API, the processor
    /// and the sweeper use.
    pub fn chaos(chaos: Arc<Chaos>) -> Hooks {
        let c2 = chaos.clone();
        Hooks {
            store: Some(Box::new(move |inner| chaos.store(inner))),
            queue: Some(Box::new(move |inner| c2.queue(inner))),
        }
    }

    /// Runs `hook` before every store and work-queue call the API and the processor make.
    pub fn intercept(hook: Arc<dyn Interceptor>) -> Hooks {
        let h2 = hook.clone();
        Hooks {
            store: Some(Box::new(move |inner| {
                Arc::new(Intercepted::new(inner, hook))
            })),
            queue: Some(Box::new(move |inner| Arc::new(Intercepted::new(inner, h2)))),
        }
    }
}

/// Starts the local server with plain adapters.
pub async fn start(cfg: LocalConfig) -> anyhow::Result<Running> {
    start_with(cfg, Hooks::default()).await
}

/// Reads or creates a file of 32 random bytes (hex) under the data directory.
fn secret_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return hex::decode(s.trim()).with_context(|| format!("{} is corrupt", path.display()));
    }
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    std::fs::write(path, hex::encode(&key))
        .with_context(|| format!("writing {}", path.display()))?;
    restrict(path);
    Ok(key)
}

#[cfg(unix)]
fn restrict(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
#[cfg(not(unix))]
fn restrict(_: &std::path::Path) {}

/// The embedded backends under the data directory, after recovering what a previous process
/// left: work it had received comes back, and every unfinished task gets a fresh Run message
/// (duplicates are no-ops), so nothing stays queued without work behind it.
async fn embedded(cfg: &LocalConfig, addr: SocketAddr) -> anyhow::Result<(Backends, FileBlobs)> {
    let db = Db::open(&cfg.data_dir.join("tasklane.db"))?;
    let sqlite = SqliteStore::new(db.clone());
    let queue = SqliteQueue::new(db);
    let public = cfg
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let files = FileBlobs::new(
        cfg.data_dir.join("results"),
        public,
        secret_file(&cfg.data_dir.join("signing.key"))?,
    );
    let released = queue.release_in_flight().await?;
    let unfinished = sqlite.recover().await?;
    for id in &unfinished {
        let run = WorkMessage::Run {
            task_id: id.clone(),
        };
        queue.enqueue(&run, Duration::ZERO).await?;
    }
    if released + unfinished.len() > 0 {
        tracing::info!(
            released,
            unfinished = unfinished.len(),
            "recovered work from the previous run"
        );
    }
    let backends = Backends {
        store: Arc::new(sqlite),
        queue: Arc::new(queue.clone()),
        source: Arc::new(queue),
        blobs: Arc::new(files.clone()),
    };
    Ok((backends, files))
}

/// Ensures the development account exists and returns `(account id, api key)`.
async fn dev_account(store: &dyn TaskStore, cfg: &LocalConfig) -> anyhow::Result<(String, String)> {
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

/// Starts the local server, letting `hooks` wrap the adapters.
pub async fn start_with(cfg: LocalConfig, hooks: Hooks) -> anyhow::Result<Running> {
    start_on(cfg, None, hooks).await
}

/// Adapters for [`start_on`] other than the embedded ones (e.g. DynamoDB, SQS and S3).
pub struct Backends {
    /// Task store.
    pub store: Arc<dyn TaskStore>,
    /// Work queue, enqueue side.
    pub queue: Arc<dyn WorkQueue>,
    /// Work queue, consuming side, polled by the in-process workers.
    pub source: Arc<dyn MessageSource>,
    /// Blob store; its URLs are served by whatever backs it.
    pub blobs: Arc<dyn BlobStore>,
}

/// Starts the server on `backends`, or on the embedded ones (SQLite, results folder) when
/// `None`; `hooks` wrap the store and queue either way. The data directory keeps the
/// development account's id and key in both cases.
pub async fn start_on(
    cfg: LocalConfig,
    backends: Option<Backends>,
    hooks: Hooks,
) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .with_context(|| {
            format!(
                "binding {} (set TASKLANE_ADDR to use another address)",
                cfg.addr
            )
        })?;
    let addr = listener.local_addr()?;
    let (backends, files) = match backends {
        Some(b) => (b, None),
        None => {
            let (b, files) = embedded(&cfg, addr).await?;
            (b, Some(files))
        }
    };
    let (dev_account_id, dev_api_key) = dev_account(backends.store.as_ref(), &cfg).await?;

    let mut store = backends.store;
    if let Some(w) = hooks.store {
        store = w(store);
    }
    let mut work_queue = backends.queue;
    if let Some(w) = hooks.queue {
        work_queue = w(work_queue);
    }
    let app = App::new(
        store,
        work_queue,
        backends.blobs,
        builtin_registry(cfg.demo_time_scale),
        cfg.core.clone(),
    );
    let source = backends.source;

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let processor = Processor::new(app.clone());
    for n in 0..cfg.workers {
        tasks.spawn(run_worker(
            n,
            source.clone(),
            processor.clone(),
            stop_rx.clone(),
        ));
    }
    tasks.spawn(run_sweeper(app.clone(), stop_rx.clone()));
    let state = Served {
        api: Api::new(app.clone()),
        files,
        max_body: cfg.core.max_body_bytes,
    };
    let router = Router::new().fallback(serve).with_state(Arc::new(state));
    let mut http_stop = stop_rx.clone();
    tasks.spawn(async move {
        let shutdown = async move {
            let _ = http_stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(Running {
        addr,
        base_url: format!("http://{addr}/v1"),
        dev_api_key,
        dev_account_id,
        app,
        stop,
        tasks,
        grace: cfg.shutdown_grace,
    })
}

/// Runs the sweeper every `sweep_interval` until `stop` turns true.
async fn run_sweeper(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(app.config.sweep_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match tasklane_core::sweeper::sweep(&app, chrono::Utc::now()).await {
            Ok(r) if r.due > 0 => tracing::info!(?r, "sweep"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep stopped early; the next one goes on"),
        }
    }
}

struct Served {
    api: Api,
    files: Option<FileBlobs>,
    max_body: usize,
}

async fn serve(State(s): State<Arc<Served>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let (Some(files), Some(key)) = (&s.files, parts.uri.path().strip_prefix(FILES_PREFIX)) {
        let query = parts.uri.query().unwrap_or("");
        return to_axum(serve_file(files, key, query, &parts.method).await);
    }
    let bytes = match Limited::new(body, s.max_body).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return to_axum(ApiError::PayloadTooLarge { limit: s.max_body }.into_response());
        }
        Err(_) => {
            return to_axum(
                ApiError::invalid_body("the request body could not be read").into_response(),
            );
        }
    };
    to_axum(s.api.handle(http::Request::from_parts(parts, bytes)).await)
}

async fn serve_file(
    files: &FileBlobs,
    key: &str,
    query: &str,
    method: &http::Method,
) -> http::Response<Bytes> {
    if method != http::Method::GET {
        return ApiError::MethodNotAllowed { allow: "GET" }.into_response();
    }
    let path = match files.verify(key, query) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mut resp = http::Response::new(Bytes::from(bytes));
            let h = resp.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type_of(&path)),
            );
            h.insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("private, max-age=60"),
            );
            resp
        }
        Err(_) => ApiError::NotFound("no such file").into_response(),
    }
}

fn to_axum(resp: http::Response<Bytes>) -> Response {
    resp.map(Body::from)
}
