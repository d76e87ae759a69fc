//! The store's one async face. The store itself is blocking (files, flock, SQLite); async
//! callers (the server, the admission pipeline) run each store call through [`off_thread`]
//! so it never stalls the runtime's worker threads.

use crate::error::StoreError;

/// Runs blocking store work on tokio's blocking pool and returns its result. `E` is whatever
/// the work returns (a [`StoreError`] or a caller's error that wraps one); a task that panicked
/// or was cancelled with the runtime becomes [`StoreError::Task`].
pub async fn off_thread<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(res) => res,
        Err(e) => Err(StoreError::Task(e.to_string()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_work_result_and_reports_a_panic() {
        let ok: Result<u32, StoreError> = off_thread(|| Ok(7)).await;
        assert_eq!(ok.unwrap(), 7);
        let err: Result<u32, StoreError> = off_thread(|| panic!("boom")).await;
        match err {
            Err(StoreError::Task(msg)) => assert!(msg.contains("panic"), "{msg}"),
            other => panic!("expected a task error, got {other:?}"),
        }
    }
}
