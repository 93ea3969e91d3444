//! Keeps a shared index usable without an operator: notices when it is lost
//! (Redis restarted or flushed) or stale, and rebuilds it, one replica at a
//! time (the rebuild takes a lock in the system of record).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::redis::RedisIndex;
use super::{GroupIndex, IndexError, IndexSource};

pub struct IndexKeeper {
    index: Arc<RedisIndex>,
    source: Arc<dyn IndexSource>,
    running: AtomicBool,
    on_rebuilt: Box<dyn Fn() + Send + Sync>,
}

impl IndexKeeper {
    pub fn new(
        index: Arc<RedisIndex>,
        source: Arc<dyn IndexSource>,
        on_rebuilt: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self {
            index,
            source,
            running: AtomicBool::new(false),
            on_rebuilt,
        }
    }

    /// Starts a rebuild in the background unless this process is already
    /// running one. Another replica holding the lock makes it a no-op.
    pub fn trigger(self: &Arc<Self>) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.rebuild_once().await;
            me.running.store(false, Ordering::Release);
        });
    }

    async fn rebuild_once(&self) -> bool {
        match self.index.rebuild(self.source.as_ref(), &|_, _| {}).await {
            Ok(Some(report)) => {
                tracing::warn!(
                    epoch = report.epoch.0,
                    groups = report.groups,
                    ms = report.elapsed.as_millis() as u64,
                    "group index rebuilt"
                );
                (self.on_rebuilt)();
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(error = %e, "group index rebuild failed");
                false
            }
        }
    }

    /// At start-up: returns once the index is ready, rebuilding it here if
    /// it is missing and no one else is, waiting at most `wait`.
    pub async fn ensure_ready(&self, wait: Duration) -> Result<(), IndexError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.index.check_ready().await {
                Ok(()) => return Ok(()),
                Err(IndexError::NotReady(_)) => {
                    if self.rebuild_once().await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(IndexError::NotReady(
                    "timed out waiting for another replica's rebuild".into(),
                ));
            }
            // Another replica holds the lock: poll until it flips meta.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Watches the index until the process ends: a lost index is rebuilt
    /// within about a second even when no request comes.
    pub fn watch(self: &Arc<Self>, every: Duration, on_state: impl Fn(bool) + Send + 'static) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                match me.index.check_ready().await {
                    Ok(()) => on_state(true),
                    Err(IndexError::NotReady(_)) => {
                        on_state(false);
                        me.trigger();
                    }
                    Err(_) => on_state(false),
                }
            }
        });
    }
}
