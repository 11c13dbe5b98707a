//! Per-account request rate limiting: a token bucket per account, in process.
//!
//! Each runtime instance holds its own buckets; with several instances (Lambda) the effective
//! limit is per instance.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A sustained rate and a burst, per account.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests allowed at once after a quiet period.
    pub burst: u32,
}

/// Token buckets keyed by account id.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Buckets idle this long are full again and can be forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);

impl RateLimiter {
    /// A limiter enforcing `limit` for each account.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `account_id`, or says how long until one is available.
    pub fn check(&self, account_id: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let RateLimit { per_second, burst } = self.limit;
        let burst = f64::from(burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER);
        }
        let (tokens, last) = buckets
            .entry(account_id.to_string())
            .or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * per_second).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - *tokens) / per_second.max(f64::MIN_POSITIVE);
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_allowed_then_the_sustained_rate_with_a_retry_hint() {
        let l = RateLimiter::new(RateLimit {
            per_second: 2.0,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
        }
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        // Accounts do not share buckets.
        assert!(l.check("b").is_ok());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
    }
}
