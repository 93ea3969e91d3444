//! Counting attempts per key (for example per account and client) in a
//! fixed window.
//! Shared through Redis in distributed mode, so N replicas do not allow N
//! times the attempts; in memory in embedded mode.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;

#[async_trait]
pub trait RateLimiter: Send + Sync {
    async fn reset(&self, key: &str);
    /// Counts one attempt and, in the same atomic step, says whether it is
    /// over `limit` in the window (seconds to wait) or allowed (None).
    /// Counting before the work (a password hash) is what keeps a burst of
    /// concurrent attempts from all passing the check before any is
    /// counted.
    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Option<u64>;
}

/// INCR, the window set by the first attempt, and the verdict, atomically.
const HIT_LUA: &str = r#"#!lua
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  local ttl = redis.call('TTL', KEYS[1])
  if ttl < 1 then ttl = 1 end
  return ttl
end
return 0
"#;

pub struct RedisLimiter {
    conn: ConnectionManager,
    prefix: String,
    hit: redis::Script,
    /// Used while Redis cannot be reached: each replica then limits on its
    /// own, which is looser (N replicas, N times the attempts) but never
    /// open.
    fallback: MemoryLimiter,
    /// Times each call (`cohort_redis_call_seconds`), each in a span.
    timer: crate::telemetry::CallTimer,
}

impl RedisLimiter {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: format!("{prefix}rl:"),
            hit: redis::Script::new(HIT_LUA),
            fallback: MemoryLimiter::default(),
            timer: crate::telemetry::CallTimer::default(),
        }
    }

    /// Observes each call's duration in `histogram`, by operation.
    pub fn with_call_metrics(mut self, histogram: prometheus::HistogramVec) -> Self {
        self.timer = crate::telemetry::CallTimer::new(histogram);
        self
    }
}

fn span(operation: &'static str) -> tracing::Span {
    tracing::debug_span!(
        "redis",
        operation,
        otel.name = %format_args!("redis.{operation}"),
        otel.kind = "client",
        db.system.name = "redis",
    )
}

// The limiter fails open: Redis being down must not lock every user out of
// an endpoint that does not otherwise need Redis. It is logged.
#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn reset(&self, key: &str) {
        let mut conn = self.conn.clone();
        let mut del = redis::cmd("DEL");
        del.arg(format!("{}{key}", self.prefix));
        let call = del.query_async::<()>(&mut conn);
        let _ = self
            .timer
            .time("ratelimit_reset", span("ratelimit_reset"), call)
            .await;
        self.fallback.reset(key).await;
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Option<u64> {
        let mut conn = self.conn.clone();
        let mut invocation = self.hit.key(format!("{}{key}", self.prefix));
        invocation.arg(limit).arg(window.as_secs().max(1));
        let res: redis::RedisResult<u64> = self
            .timer
            .time(
                "ratelimit_hit",
                span("ratelimit_hit"),
                invocation.invoke_async(&mut conn),
            )
            .await;
        match res {
            Ok(0) => None,
            Ok(wait) => Some(wait),
            Err(e) => {
                tracing::warn!(error = %e, "rate limiter's Redis unavailable; limiting in memory");
                self.fallback.hit(key, limit, window).await
            }
        }
    }
}

/// In-process limiter for the embedded mode.
#[derive(Default)]
pub struct MemoryLimiter {
    counts: Mutex<HashMap<String, (u32, Instant)>>,
}

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn reset(&self, key: &str) {
        self.counts
            .lock()
            .expect("limiter mutex poisoned")
            .remove(key);
    }

    async fn hit(&self, key: &str, limit: u32, window: Duration) -> Option<u64> {
        let mut counts = self.counts.lock().expect("limiter mutex poisoned");
        let now = Instant::now();
        if counts.len() >= SWEEP_AT {
            counts.retain(|_, (_, until)| *until > now);
        }
        let e = counts.entry(key.to_owned()).or_insert((0, now + window));
        if e.1 <= now {
            *e = (0, now + window);
        }
        e.0 += 1;
        (e.0 > limit).then(|| (e.1 - now).as_secs().max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_limiter_reset_starts_over() {
        let l = MemoryLimiter::default();
        let w = Duration::from_secs(60);
        for _ in 0..4 {
            l.hit("k", 3, w).await;
        }
        assert!(l.hit("k", 3, w).await.is_some());
        l.reset("k").await;
        assert_eq!(l.hit("k", 3, w).await, None);
    }

    #[tokio::test]
    async fn memory_limiter_hit_counts_before_answering() {
        let l = MemoryLimiter::default();
        let w = Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.hit("k", 3, w).await, None);
        }
        assert!(l.hit("k", 3, w).await.is_some());
        assert_eq!(l.hit("other", 3, w).await, None);
    }
}
