//! [`NamedTask`]: a long-lived background task with a name and an owner.
//!
//! Every background task of the gateway is spawned through this type, so none
//! is fire-and-forget: the owner asks it to stop (through its cancellation
//! token), waits for it, and hears about it if it panicked.

use std::fmt;
use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// A running (or absent) background task and the token that stops it.
pub struct NamedTask {
    name: &'static str,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl NamedTask {
    /// Spawns `make(cancel)` under a tracing span named `name`. The task is
    /// expected to finish its work and return soon after `cancel` fires.
    pub fn spawn<F, Fut>(name: &'static str, make: F) -> NamedTask
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let task = tokio::spawn(make(cancel.clone()).instrument(tracing::info_span!("task", name)));
        NamedTask {
            name,
            cancel,
            task: Some(task),
        }
    }

    /// A handle for a task that is not needed in this configuration.
    pub fn idle(name: &'static str) -> NamedTask {
        NamedTask {
            name,
            cancel: CancellationToken::new(),
            task: None,
        }
    }

    /// Whether the task still runs (true when none was needed).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_none_or(|t| !t.is_finished())
    }

    /// Asks the task to stop and waits for it; a panic is logged.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::error!(task = self.name, error = %e, "background task failed");
        }
    }
}

impl fmt::Debug for NamedTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedTask")
            .field("name", &self.name)
            .field("running", &self.is_running())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_cancels_and_waits() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = NamedTask::spawn("test", |cancel| async move {
            cancel.cancelled().await;
            let _ = tx.send("stopped");
        });
        assert!(task.is_running());
        task.shutdown().await;
        assert_eq!(rx.await.unwrap(), "stopped");
        assert!(NamedTask::idle("none").is_running());
    }
}
