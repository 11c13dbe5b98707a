//! The local server: composes the core's API, in-process workers and the sweeper over the
//! embedded backends ([`crate::embedded`]) or any others ([`Backends`]), serves HTTP on
//! 127.0.0.1 ([`crate::http`]), and shuts down gracefully ([`Running::shutdown`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tasklane_core::App;
use tasklane_core::api::Api;
use tasklane_core::catalog;
use tasklane_core::ports::{BlobStore, MessageSource, TaskStore, WorkQueue};
use tasklane_core::processor::{Processor, run_worker};
use tasklane_core::providers::builtin_registry;
use tasklane_core::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::LocalConfig;
use crate::http::{Served, serve};

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

/// Starts the local server with plain adapters.
pub async fn start(cfg: LocalConfig) -> anyhow::Result<Running> {
    start_with(cfg, Hooks::default()).await
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
    /// The queue of webhook deliveries, consuming side, polled by workers of their own
    /// ([`LocalConfig::delivery_workers`]); `None` when `queue` sends deliveries to the work
    /// queue.
    pub delivery_source: Option<Arc<dyn MessageSource>>,
    /// Blob store; its URLs are served by whatever backs it.
    pub blobs: Arc<dyn BlobStore>,
    /// What answers the blob store's signed result URLs under `/v1/files/` (S3: a redirect);
    /// `None`: the embedded results folder's, or none.
    pub files: Option<Arc<dyn tasklane_core::result_urls::SignedFiles>>,
}

/// Starts the server on `backends`, or on the embedded ones (SQLite, results folder) when
/// `None`; `hooks` wrap the store and queue either way. The data directory keeps the
/// development account's id and key in both cases.
pub async fn start_on(
    cfg: LocalConfig,
    backends: Option<Backends>,
    hooks: Hooks,
) -> anyhow::Result<Running> {
    let registry = models(&cfg)?;
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
    // Upstreams call back at the same address as result URLs point to.
    let mut cfg = cfg;
    let public = cfg.public_url.clone();
    cfg.core
        .public_url
        .get_or_insert_with(|| public.unwrap_or_else(|| format!("http://{addr}")));
    let (backends, files) = match backends {
        Some(b) => {
            let files = b.files.clone().map(crate::http::Files::Signed);
            (b, files)
        }
        None => {
            let (b, files) = crate::embedded::embedded(&cfg, addr).await?;
            (b, Some(crate::http::Files::Local(files)))
        }
    };
    // Result URLs are built on the public URL, in requests and in the workers alike.
    let public_url = cfg.core.public_url.clone().unwrap_or_default();
    let (dev_account_id, dev_api_key) =
        crate::dev_account::dev_account(backends.store.as_ref(), &cfg).await?;
    let source = backends.source.clone();
    let delivery_source = backends.delivery_source.clone();
    let app = compose(&cfg, backends, hooks, registry);

    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let processor = Processor::new(app.clone());
    // Generation and webhook delivery each have workers of their own: a receiver that answers
    // slowly or not at all holds a delivery worker, never one that runs tasks.
    let lanes = [(source, cfg.workers)]
        .into_iter()
        .chain(delivery_source.map(|d| (d, cfg.delivery_workers)));
    let mut n = 0;
    for (from, count) in lanes {
        for _ in 0..count {
            let worker = tasklane_core::result_urls::with_base_url(
                public_url.clone(),
                run_worker(n, from.clone(), processor.clone(), stop_rx.clone()),
            );
            tasks.spawn(worker);
            n += 1;
        }
    }
    tasks.spawn(tasklane_core::result_urls::with_base_url(
        public_url.clone(),
        run_sweeper(app.clone(), stop_rx.clone()),
    ));
    let served = Served {
        public_url,
        api: Api::new(app.clone()),
        files,
    };
    tasks.spawn(serve_http(listener, served, stop_rx));
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

/// The models to serve: the catalog [`LocalConfig::models`] names, else the built-in demo
/// models. The error names the variable, the file, the model and the field.
fn models(cfg: &LocalConfig) -> anyhow::Result<Registry> {
    match &cfg.models {
        Some(path) => catalog::load_file(path, cfg.demo_time_scale)
            .map_err(|e| anyhow::anyhow!("TASKLANE_MODELS: {e}")),
        None => Ok(builtin_registry(cfg.demo_time_scale)),
    }
}

/// The core's shared dependencies over `backends` serving `registry`, wrapped by `hooks`.
fn compose(cfg: &LocalConfig, backends: Backends, hooks: Hooks, registry: Registry) -> Arc<App> {
    let mut store = backends.store;
    if let Some(w) = hooks.store {
        store = w(store);
    }
    let mut work_queue = backends.queue;
    if let Some(w) = hooks.queue {
        work_queue = w(work_queue);
    }
    App::new(
        store,
        work_queue,
        backends.blobs,
        registry,
        cfg.core.clone(),
    )
}

/// Serves HTTP on `listener` until `stop` turns true (requests in flight finish).
async fn serve_http(
    listener: tokio::net::TcpListener,
    served: Served,
    mut stop: watch::Receiver<bool>,
) {
    let router = Router::new().fallback(serve).with_state(Arc::new(served));
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
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
