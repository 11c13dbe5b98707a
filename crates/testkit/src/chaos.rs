//! Seeded fault injection for tests and soak runs, built on [`crate::intercept`] (a hook
//! before every port call) and a neutral seam of the core, the worker scope of
//! [`tasklane_core::processor`] ([`in_worker`]: whether the call is a worker's).
//!
//! [`Chaos`] is an [`Interceptor`]: before a store or queue call it may fail the call as a
//! transient backend error, delay it, or "crash" the caller: a worker's call answers
//! [`PortError::Halted`], so the worker stops where it is and never settles its message, like a
//! process killed between two steps. [`Chaos::queue`] also duplicates enqueued messages, as an
//! at-least-once queue may. All choices come from one seeded generator, and every injected
//! fault is counted. [`hooks`] puts it around a local server's store and queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::intercept::{Intercepted, Interceptor, Op};
use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tasklane_core::ports::{PortError, PortResult, TaskStore, WorkMessage, WorkQueue};
use tasklane_core::processor::in_worker;
use tasklane_local::Hooks;

/// Probabilities (0..=1) of each fault, per call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChaosConfig {
    /// Seed of the random source.
    pub seed: u64,
    /// A store or queue call fails with [`PortError::Unavailable`].
    pub fail: f64,
    /// An enqueued message is sent twice.
    pub duplicate: f64,
    /// A call is delayed by up to `max_delay`.
    pub delay: f64,
    /// Longest injected delay.
    pub max_delay: Duration,
    /// A call made by a worker "crashes" it: it answers [`PortError::Halted`]. Calls made
    /// outside a worker (the API's, the sweeper's) never crash.
    pub crash: f64,
}

impl ChaosConfig {
    /// No faults.
    pub fn none(seed: u64) -> Self {
        ChaosConfig {
            seed,
            fail: 0.0,
            duplicate: 0.0,
            delay: 0.0,
            max_delay: Duration::ZERO,
            crash: 0.0,
        }
    }
}

/// Counts of injected faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChaosCounts {
    /// Calls examined.
    pub calls: u64,
    /// Calls failed.
    pub failed: u64,
    /// Messages duplicated.
    pub duplicated: u64,
    /// Calls delayed.
    pub delayed: u64,
    /// Crashes.
    pub crashed: u64,
}

/// The seeded fault injector.
pub struct Chaos {
    cfg: ChaosConfig,
    rng: Mutex<StdRng>,
    enabled: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    failed: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    crashed: AtomicU64,
}

impl Chaos {
    /// A fault injector with `cfg`.
    pub fn new(cfg: ChaosConfig) -> Arc<Chaos> {
        Arc::new(Chaos {
            rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
            cfg,
            enabled: std::sync::atomic::AtomicBool::new(true),
            calls: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            crashed: AtomicU64::new(0),
        })
    }

    /// Turns injection on or off (a soak run turns it off to drain and check).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// What was injected so far.
    pub fn counts(&self) -> ChaosCounts {
        ChaosCounts {
            calls: self.calls.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            duplicated: self.duplicated.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            crashed: self.crashed.load(Ordering::Relaxed),
        }
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0
            && self.enabled.load(Ordering::Relaxed)
            && self
                .rng
                .lock()
                .map(|mut r| r.random_bool(p.min(1.0)))
                .unwrap_or(false)
    }

    fn delay(&self) -> Duration {
        let max = self.cfg.max_delay.as_micros() as u64;
        let us = self
            .rng
            .lock()
            .map(|mut r| r.random_range(0..=max))
            .unwrap_or(0);
        Duration::from_micros(us)
    }

    /// Wraps a task store.
    pub fn store(self: &Arc<Self>, inner: Arc<dyn TaskStore>) -> Arc<dyn TaskStore> {
        Arc::new(Intercepted::new(
            inner,
            self.clone() as Arc<dyn Interceptor>,
        ))
    }

    /// Wraps a work queue: intercepted, and duplicating messages.
    pub fn queue(self: &Arc<Self>, inner: Arc<dyn WorkQueue>) -> Arc<dyn WorkQueue> {
        let intercepted: Arc<dyn WorkQueue> = Arc::new(Intercepted::new(
            inner,
            self.clone() as Arc<dyn Interceptor>,
        ));
        Arc::new(Duplicating {
            inner: intercepted,
            chaos: self.clone(),
        })
    }
}

#[async_trait]
impl Interceptor for Chaos {
    async fn before(&self, op: Op) -> PortResult<()> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.roll(self.cfg.delay) {
            self.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.delay()).await;
        }
        if in_worker() && self.roll(self.cfg.crash) {
            self.crashed.fetch_add(1, Ordering::Relaxed);
            return Err(PortError::Halted);
        }
        if self.roll(self.cfg.fail) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return Err(PortError::unavailable(format!(
                "injected failure of {op:?}"
            )));
        }
        Ok(())
    }
}

/// Seeded fault injection ([`Chaos`]) on the store and work queue a local server's API,
/// processor and sweeper use.
pub fn hooks(chaos: Arc<Chaos>) -> Hooks {
    let c2 = chaos.clone();
    Hooks {
        store: Some(Box::new(move |inner| chaos.store(inner))),
        queue: Some(Box::new(move |inner| c2.queue(inner))),
    }
}

struct Duplicating {
    inner: Arc<dyn WorkQueue>,
    chaos: Arc<Chaos>,
}

#[async_trait]
impl WorkQueue for Duplicating {
    async fn enqueue(&self, message: &WorkMessage, delay: Duration) -> PortResult<()> {
        self.inner.enqueue(message, delay).await?;
        if self.chaos.roll(self.chaos.cfg.duplicate) {
            self.chaos.duplicated.fetch_add(1, Ordering::Relaxed);
            // A failed duplicate is not the caller's failure: the original was sent.
            let _ = self.inner.enqueue(message, delay).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tasklane_core::processor::worker_scope;

    use super::*;

    #[tokio::test]
    async fn the_same_seed_injects_the_same_faults() {
        let cfg = ChaosConfig {
            fail: 0.3,
            ..ChaosConfig::none(7)
        };
        let run = || async {
            let c = Chaos::new(cfg);
            let mut out = Vec::new();
            for _ in 0..200 {
                out.push(c.before(Op::Task).await.is_err());
            }
            (out, c.counts())
        };
        let (a, ca) = run().await;
        let (b, _) = run().await;
        assert_eq!(a, b);
        assert!(ca.failed > 30 && ca.failed < 90, "{ca:?}");
    }

    #[tokio::test]
    async fn crashes_happen_only_in_worker_code() {
        let c = Chaos::new(ChaosConfig {
            crash: 1.0,
            ..ChaosConfig::none(1)
        });
        assert!(c.before(Op::Task).await.is_ok());
        let e = worker_scope(c.before(Op::Task)).await.unwrap_err();
        assert!(matches!(e, PortError::Halted), "{e:?}");
        assert_eq!(c.counts().crashed, 1);
    }
}
