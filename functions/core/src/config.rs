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
    /// Most open (queued or processing) tasks an account may have; submits over it get 429.
    pub max_open_tasks: u64,
    /// How long a task may wait on possibly lost work (a queued task with no message, an
    /// expired lease, an unsent first webhook) before the sweeper re-enqueues it.
    pub sweep_after: Duration,
    /// How often a polling runtime runs the sweeper (on AWS a schedule does).
    pub sweep_interval: Duration,
    /// Receives after which a polling worker treats a message as dead-lettered (SQS: the
    /// queue's `maxReceiveCount`).
    pub max_receives: u32,
    /// How long a polling worker hides a message it received.
    pub visibility: Duration,
    /// Base URL at which upstreams reach this deployment's callback route
    /// (`{public_url}/v1/upstream/{provider}/{task_id}`); `None`: models served by an
    /// upstream cannot run (their tasks fail with `model_unavailable`).
    pub public_url: Option<String>,
    /// Delay before the first check on an upstream run; each later one doubles it.
    pub upstream_check_first: Duration,
    /// Longest delay between two checks on an upstream run.
    pub upstream_check_max: Duration,
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
            callback_timeout: Duration::from_secs(10),
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
            max_open_tasks: 1000,
            sweep_after: Duration::from_secs(120),
            sweep_interval: Duration::from_secs(30),
            max_receives: 5,
            visibility: Duration::from_secs(300),
            public_url: None,
            upstream_check_first: Duration::from_secs(2),
            upstream_check_max: Duration::from_secs(30),
        }
    }
}

/// A configuration value that cannot be used; the message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Reads and parses environment variable `name`; unset or empty is `None`.
pub fn env_parse<T: std::str::FromStr>(name: &str) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|e| ConfigError(format!("{name}={v:?} is not valid: {e}"))),
        _ => Ok(None),
    }
}

/// Reads environment variable `name` as a number of seconds (fractions allowed).
pub fn env_secs(name: &str) -> Result<Option<Duration>, ConfigError> {
    env_parse::<f64>(name)?
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| ConfigError(format!("{name} must be 0 or more seconds")))
        })
        .transpose()
}

/// Reads a required environment variable.
pub fn env_required(name: &str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(ConfigError(format!("{name} must be set"))),
    }
}

fn ensure(ok: bool, msg: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError(msg.to_string()))
    }
}

impl Config {
    /// Overrides settings from the `TASKLANE_*` variables every runtime shares:
    /// `TASKLANE_CALLBACK_ALLOW_PRIVATE`, `TASKLANE_RESULT_URL_TTL`, `TASKLANE_SYNC_WAIT_CAP`,
    /// `TASKLANE_RATE_LIMIT`, `TASKLANE_RATE_BURST`, `TASKLANE_LEASE`,
    /// `TASKLANE_CALLBACK_RETRY_SCHEDULE`, `TASKLANE_MAX_OPEN_TASKS`, `TASKLANE_SWEEP_AFTER`,
    /// `TASKLANE_SWEEP_INTERVAL`, `TASKLANE_MAX_RECEIVES`, `TASKLANE_VISIBILITY`.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        if let Some(b) = env_parse("TASKLANE_CALLBACK_ALLOW_PRIVATE")? {
            self.callback_allow_private = b;
        }
        if let Some(t) = env_secs("TASKLANE_RESULT_URL_TTL")? {
            ensure(
                t >= Duration::from_secs(1),
                "TASKLANE_RESULT_URL_TTL must be at least 1 second",
            )?;
            self.result_url_ttl = t;
        }
        if let Some(t) = env_secs("TASKLANE_SYNC_WAIT_CAP")? {
            self.sync_wait_cap = t;
            self.sync_wait_default = self.sync_wait_default.min(t);
        }
        if let Some(rate) = env_parse::<f64>("TASKLANE_RATE_LIMIT")? {
            ensure(
                rate.is_finite() && rate >= 0.0,
                "TASKLANE_RATE_LIMIT must be a number of requests per second, 0 or more",
            )?;
            self.rate_limit = (rate > 0.0).then(|| RateLimit {
                per_second: rate,
                burst: (rate * 2.0).ceil().min(f64::from(u32::MAX)) as u32,
            });
        }
        if let Some(burst) = env_parse::<u32>("TASKLANE_RATE_BURST")? {
            ensure(burst >= 1, "TASKLANE_RATE_BURST must be at least 1")?;
            if let Some(limit) = &mut self.rate_limit {
                limit.burst = burst;
            }
        }
        if let Some(t) = env_secs("TASKLANE_LEASE")? {
            ensure(
                t >= Duration::from_secs(1),
                "TASKLANE_LEASE must be at least 1 second",
            )?;
            self.lease = t;
        }
        if let Some(n) = env_parse::<u64>("TASKLANE_MAX_OPEN_TASKS")? {
            ensure(n >= 1, "TASKLANE_MAX_OPEN_TASKS must be at least 1")?;
            self.max_open_tasks = n;
        }
        if let Some(t) = env_secs("TASKLANE_SWEEP_AFTER")? {
            ensure(
                t >= Duration::from_secs(1),
                "TASKLANE_SWEEP_AFTER must be at least 1 second",
            )?;
            self.sweep_after = t;
        }
        if let Some(t) = env_secs("TASKLANE_SWEEP_INTERVAL")? {
            ensure(
                t >= Duration::from_millis(100),
                "TASKLANE_SWEEP_INTERVAL must be at least 0.1 seconds",
            )?;
            self.sweep_interval = t;
        }
        if let Some(n) = env_parse::<u32>("TASKLANE_MAX_RECEIVES")? {
            ensure(n >= 1, "TASKLANE_MAX_RECEIVES must be at least 1")?;
            self.max_receives = n;
        }
        if let Some(t) = env_secs("TASKLANE_VISIBILITY")? {
            ensure(
                t >= Duration::from_secs(1),
                "TASKLANE_VISIBILITY must be at least 1 second",
            )?;
            self.visibility = t;
        }
        if let Ok(u) = std::env::var("TASKLANE_PUBLIC_URL")
            && !u.trim().is_empty()
        {
            ensure(
                url::Url::parse(u.trim()).is_ok_and(|p| p.scheme().starts_with("http")),
                "TASKLANE_PUBLIC_URL must be an http(s) URL",
            )?;
            self.public_url = Some(u.trim().trim_end_matches('/').to_string());
        }
        if let Some(t) = env_secs("TASKLANE_UPSTREAM_CHECK_FIRST")? {
            ensure(
                t >= Duration::from_millis(100),
                "TASKLANE_UPSTREAM_CHECK_FIRST must be at least 0.1 seconds",
            )?;
            self.upstream_check_first = t;
        }
        if let Some(t) = env_secs("TASKLANE_UPSTREAM_CHECK_MAX")? {
            ensure(
                t >= self.upstream_check_first,
                "TASKLANE_UPSTREAM_CHECK_MAX must be at least TASKLANE_UPSTREAM_CHECK_FIRST",
            )?;
            self.upstream_check_max = t;
        }
        if let Ok(s) = std::env::var("TASKLANE_CALLBACK_RETRY_SCHEDULE")
            && !s.trim().is_empty()
        {
            self.callback_retry_schedule = s
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<f64>()
                        .ok()
                        .and_then(|x| Duration::try_from_secs_f64(x).ok())
                        .ok_or_else(|| {
                            ConfigError(format!(
                                "TASKLANE_CALLBACK_RETRY_SCHEDULE: {p:?} is not a number of seconds"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_webhook_retries_span_more_than_24_hours() {
        let total: Duration = standard_retry_schedule().iter().sum();
        assert!(total >= Duration::from_secs(24 * 3600), "{total:?}");
        assert_eq!(standard_retry_schedule().len(), 7);
    }
}
