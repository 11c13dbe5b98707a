//! Settings of the core that runtimes fill from their environment.

use std::time::Duration;

use crate::limits::RateLimit;

/// Tunables of the API and processor. `Config::default()` holds the documented defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    /// Sync wait when the request names none.
    pub sync_wait_default: Duration,
    /// Longest sync wait; larger requests are shortened to it.
    pub sync_wait_cap: Duration,
    /// Lifetime of signed result URLs.
    pub result_url_ttl: Duration,
    /// Accept `http` and private or loopback callback targets (local development only).
    pub callback_allow_private: bool,
    /// Time allowed for one webhook request.
    pub callback_timeout: Duration,
    /// Delays before each webhook retry; its length is the number of retries.
    pub callback_retry_schedule: Vec<Duration>,
    /// Processing attempts before a task fails with `attempts_exhausted`.
    pub max_attempts: u32,
    /// How long a worker's claim on a task lasts without progress.
    pub lease: Duration,
    /// How long a finished idempotency record answers replays.
    pub idempotency_retain: Duration,
    /// How long an unfinished idempotency reservation blocks others.
    pub idempotency_in_flight: Duration,
    /// Longest delay the work queue accepts for one message (SQS: 15 minutes).
    pub max_queue_delay: Duration,
    /// `Retry-After` seconds on answers about unfinished tasks.
    pub poll_after_secs: u64,
    /// Per-account request rate limit; `None` for none.
    pub rate_limit: Option<RateLimit>,
}

/// The Standard Webhooks retry schedule: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h (about 27.6 h in all).
pub fn standard_retry_schedule() -> Vec<Duration> {
    [5, 300, 1800, 7200, 18000, 36000, 36000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body_bytes: 64 * 1024,
            sync_wait_default: Duration::from_secs(25),
            sync_wait_cap: Duration::from_secs(25),
            result_url_ttl: Duration::from_secs(3600),
            callback_allow_private: false,
            callback_timeout: Duration::from_secs(15),
            callback_retry_schedule: standard_retry_schedule(),
            max_attempts: 3,
            lease: Duration::from_secs(60),
            idempotency_retain: Duration::from_secs(24 * 3600),
            idempotency_in_flight: Duration::from_secs(60),
            max_queue_delay: Duration::from_secs(15 * 60),
            poll_after_secs: 1,
            rate_limit: Some(RateLimit {
                per_second: 100.0,
                burst: 200,
            }),
        }
    }
}
