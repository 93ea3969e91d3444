//! One multiplexed connection to Redis that knows when it was replaced.
//!
//! redis-rs's `ConnectionManager` reconnects silently. The index cannot
//! afford that: a Redis that restarted (from an older snapshot, or empty) or
//! failed over to a replica may have lost groups whose signups were already
//! answered, and only a new connection can reach it. So every (re)connection
//! here gets a new *generation* number; the health keeper trusts decisions
//! only on a generation it has checked against the system of record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::Mutex;

use crate::index::IndexError;
use crate::telemetry::CallTimer;

/// How long a failed connection attempt is remembered: requests in that
/// window fail at once instead of each waiting for a connect timeout.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(300);

pub struct RedisConn {
    client: redis::Client,
    config: AsyncConnectionConfig,
    state: Mutex<State>,
    generation: AtomicU64,
    timer: CallTimer,
}

#[derive(Default)]
struct State {
    conn: Option<(MultiplexedConnection, u64)>,
    last_failure: Option<Instant>,
}

/// A connection of a known generation.
pub struct Live {
    pub conn: MultiplexedConnection,
    pub generation: u64,
}

/// A failed call: was it Redis answering with an error (the connection is
/// fine), or the connection itself?
pub fn is_reply_error(e: &RedisError) -> bool {
    matches!(e.kind(), redis::ErrorKind::Server(_)) && !e.is_connection_dropped()
}

impl RedisConn {
    pub fn new(url: &str, response_timeout: Duration) -> Result<Self, String> {
        Ok(Self::with_client(
            crate::tls::redis(url, None)?,
            response_timeout,
        ))
    }

    /// A connection through `client` (one built for TLS, say).
    pub fn with_client(client: redis::Client, response_timeout: Duration) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(response_timeout));
        Self {
            client,
            config,
            state: Mutex::new(State::default()),
            generation: AtomicU64::new(0),
            timer: CallTimer::default(),
        }
    }

    /// Observes each call's duration in `histogram`, by operation.
    pub fn with_call_metrics(mut self, histogram: prometheus::HistogramVec) -> Self {
        self.timer = CallTimer::new(histogram);
        self
    }

    /// Times the calls made on this connection.
    pub fn timer(&self) -> &CallTimer {
        &self.timer
    }

    /// The current connection, connecting if there is none.
    pub async fn get(&self) -> Result<Live, IndexError> {
        let mut st = self.state.lock().await;
        if let Some((c, g)) = &st.conn {
            return Ok(Live {
                conn: c.clone(),
                generation: *g,
            });
        }
        if st
            .last_failure
            .is_some_and(|t| t.elapsed() < RECONNECT_BACKOFF)
        {
            return Err(IndexError::Unavailable("Redis is unreachable".into()));
        }
        match self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
        {
            Ok(c) => {
                let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                st.conn = Some((c.clone(), g));
                st.last_failure = None;
                tracing::info!(generation = g, "connected to Redis");
                Ok(Live {
                    conn: c,
                    generation: g,
                })
            }
            Err(e) => {
                st.last_failure = Some(Instant::now());
                Err(IndexError::Unavailable(e.to_string()))
            }
        }
    }

    /// The generation of the connection in use, if any.
    pub async fn current_generation(&self) -> Option<u64> {
        self.state.lock().await.conn.as_ref().map(|(_, g)| *g)
    }

    /// Reports a failed call made on generation `g`: unless Redis itself
    /// answered with an error, the connection is dropped, and the next call
    /// makes a new one (a new generation, untrusted until checked).
    pub async fn failed(&self, g: u64, e: &RedisError) -> IndexError {
        if is_reply_error(e) {
            // Redis answered (OOM, LOADING, a script's own error): the
            // connection is fine, the call is not.
            return IndexError::Unavailable(e.to_string());
        }
        let mut st = self.state.lock().await;
        if st.conn.as_ref().is_some_and(|(_, cur)| *cur == g) {
            tracing::warn!(generation = g, error = %e, "Redis connection lost");
            st.conn = None;
        }
        IndexError::Unavailable(e.to_string())
    }
}
