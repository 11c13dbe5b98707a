//! The local runtime's settings: [`LocalConfig`], read from the `TASKLANE_*` variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tasklane_core::Config;
use tasklane_core::config::{env_parse, env_secs};

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
    /// In-process workers that run tasks (`TASKLANE_WORKERS`, default: number of CPUs).
    pub workers: usize,
    /// In-process workers that deliver webhooks, apart from those that run tasks
    /// (`TASKLANE_DELIVERY_WORKERS`, default 4): each waits at most the webhook timeout on a
    /// receiver.
    pub delivery_workers: usize,
    /// Base of result URLs (`TASKLANE_PUBLIC_URL`, default `http://<bound address>`).
    pub public_url: Option<String>,
    /// Multiplier on the demo generators' simulated time (`TASKLANE_DEMO_TIME_SCALE`, default 1).
    pub demo_time_scale: f64,
    /// The model catalog file to serve instead of the built-in demo models
    /// (`TASKLANE_MODELS`, a TOML file: see [`tasklane_core::catalog`]); read at start, where
    /// an invalid one stops the server with the model and field at fault.
    pub models: Option<PathBuf>,
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
            delivery_workers: 4,
            public_url: None,
            demo_time_scale: 1.0,
            models: None,
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
        if let Some(n) = env_parse::<usize>("TASKLANE_DELIVERY_WORKERS")? {
            anyhow::ensure!(n >= 1, "TASKLANE_DELIVERY_WORKERS must be at least 1");
            c.delivery_workers = n;
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
        c.models = std::env::var_os("TASKLANE_MODELS")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        if let Some(g) = env_secs("TASKLANE_SHUTDOWN_GRACE")? {
            c.shutdown_grace = g;
        }
        c.core.apply_env()?;
        Ok(c)
    }
}
