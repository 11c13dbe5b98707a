//! The embedded backends under the data directory (the SQLite store and queue, the results
//! folder and its URL-signing key), and crash recovery: what a previous process left is
//! taken up again before the server starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::RngCore;
use tasklane_core::ports::{Lane, LaneQueue, WorkMessage, WorkQueue};

use crate::config::LocalConfig;
use crate::files::FileBlobs;
use crate::server::Backends;
use crate::sqlite::{Db, SqliteQueue, SqliteStore};

/// The embedded backends under the data directory, after recovering what a previous process
/// left: work it had received comes back, and every unfinished task gets a fresh Run message
/// (duplicates are no-ops), so nothing stays queued without work behind it.
pub(crate) async fn embedded(
    cfg: &LocalConfig,
    addr: SocketAddr,
) -> anyhow::Result<(Backends, FileBlobs)> {
    let db = Db::open(&cfg.data_dir.join("tasklane.db"))?;
    let sqlite = SqliteStore::new(db.clone());
    let queue = SqliteQueue::new(db.clone());
    let deliveries = SqliteQueue::of(db, Lane::Deliveries);
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
        queue: Arc::new(LaneQueue::new(
            Arc::new(queue.clone()),
            Arc::new(deliveries.clone()),
        )),
        source: Arc::new(queue),
        delivery_source: Some(Arc::new(deliveries)),
        blobs: Arc::new(files.clone()),
        files: None,
    };
    Ok((backends, files))
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
pub(crate) fn restrict(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}
#[cfg(not(unix))]
pub(crate) fn restrict(_: &std::path::Path) {}
