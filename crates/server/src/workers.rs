//! Background work: the prefetcher, the pruner and the cleaner.
//!
//! Each runs supervised: a step that fails (an error or a panic) is logged, the worker waits
//! with exponential backoff and goes on, where Glance's cache worker thread dies on its first
//! error. [`Workers::stop`] ends them for graceful shutdown: an interrupted prefetch drops its
//! writer, so its partial file goes to `invalid/` and nothing is published.
//!
//! - **Prefetcher**: drains the queue (`queue/`, files, so a restart resumes it), oldest first.
//!   Per image: a fill from the upstream Glance (the same path as a client's miss, so the
//!   image is inspected and verified like any other, and clients asking meanwhile follow
//!   it), then `delete_queued_image`. A failed image
//!   stays queued and is retried with its own exponential backoff (never a spin), so one bad
//!   image does not hold up the others; an id upstream does not know (404), or that is no
//!   Glance image id at all, is dropped from the queue with a warning. Woken by
//!   `PUT /v2/cache/{id}` (which also makes images in backoff retry now), and rescans the queue
//!   every 30 s for images queued by other processes (`imgcache queue`).
//! - **Pruner**: every `prune_interval`, and when woken (`prune_wake`, after downloads), evicts
//!   least recently used images until the cache is at most `max_size`.
//! - **Cleaner**: every `clean_interval`, `clean(stall_time)`: stalled incomplete files, invalid
//!   files, records whose file vanished.
//! - **Scrubber** (only with `scrub_interval`): every interval, one pass of
//!   [`imgcache_store::Cache::verify`] over every cached image on a thread of its own at the
//!   lowest CPU priority (nice 19), one image at a time; a mismatch is moved to `invalid/`
//!   (never served again) and counted in `imgcache_scrub_mismatches_total`.

use imgcache_store::off_thread;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use imgcache_fetch::Href;
use imgcache_store::{Key, PruneReport, StoreError};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::ApiError;
use crate::fill::Origin;
use crate::state::AppState;
use imgcache_store::{Done, FailKind, Outcome};

/// A worker step that failed is retried after this, doubling up to [`STEP_BACKOFF_MAX`].
const STEP_BACKOFF: Duration = Duration::from_secs(1);
const STEP_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A queued image whose download failed is retried after this, doubling up to the max.
const ITEM_BACKOFF: Duration = Duration::from_secs(1);
const ITEM_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The prefetcher looks at `queue/` at least this often, for images other processes queued.
const PREFETCH_RESCAN: Duration = Duration::from_secs(30);

/// The running background tasks.
pub struct Workers {
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

pub fn spawn(state: AppState) -> Workers {
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();

    let s = state.clone();
    tasks.push(("prefetcher", tokio::spawn(prefetcher(s, stopped.clone()))));

    if let Some(node) = state.fleet.clone() {
        tasks.push(("fleet", tokio::spawn(node.run(stopped.clone()))));
    }

    let s = state.clone();
    let interval = state.config.prune_interval;
    tasks.push((
        "pruner",
        tokio::spawn(periodic(
            "pruner",
            stopped.clone(),
            interval,
            Some(state.prune_wake.clone()),
            move || {
                let s = s.clone();
                async move {
                    let report = prune_now(&s)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                    if !report.evicted.is_empty() {
                        tracing::info!(
                            files = report.evicted.len(),
                            bytes = report.bytes_freed,
                            size_after = report.size_after,
                            "pruned"
                        );
                    }
                    Ok(())
                }
            },
        )),
    ));

    if let Some(interval) = state.config.scrub_interval {
        let s = state.clone();
        tasks.push((
            "scrubber",
            tokio::spawn(periodic(
                "scrubber",
                stopped.clone(),
                interval,
                None,
                move || {
                    let s = s.clone();
                    async move { scrub_pass(&s).await }
                },
            )),
        ));
    }

    let s = state.clone();
    let interval = state.config.clean_interval;
    tasks.push((
        "cleaner",
        tokio::spawn(periodic("cleaner", stopped, interval, None, move || {
            let s = s.clone();
            async move {
                let stall = s.config.stall_time;
                let cache = s.cache.clone();
                let report = off_thread(move || cache.clean(stall)).await?;
                if !(report.stalled.is_empty()
                    && report.invalid.is_empty()
                    && report.dangling_records.is_empty())
                {
                    tracing::info!(
                        stalled = report.stalled.len(),
                        invalid = report.invalid.len(),
                        dangling = report.dangling_records.len(),
                        "cleaned"
                    );
                }
                refresh_gauges(&s).await;
                Ok(())
            }
        })),
    ));
    Workers { stop, tasks }
}

impl Workers {
    /// Stops every worker and waits for them (an interrupted download is discarded).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(worker = name, error = %e, "worker ended abnormally");
            }
        }
    }
}

/// Evicts least recently used images until the cache is at most `max_size`; counts the
/// evictions and refreshes the gauges. Used by the pruner and `POST /v2/cache/prune`.
pub async fn prune_now(state: &AppState) -> Result<PruneReport, ApiError> {
    let cache = state.cache.clone();
    let max = state.config.max_size;
    let report = off_thread(move || cache.prune(max)).await?;
    state.metrics.evictions.inc_by(report.evicted.len() as u64);
    state.events.evicted(
        &report.evicted,
        "pruned: least recently used, over the max size",
    );
    let gone: Vec<String> = report.evicted.iter().map(|e| e.0.clone()).collect();
    state.withdraw(gone).await;
    refresh_gauges(state).await;
    Ok(report)
}

/// What one scrub pass found.
#[derive(Debug, Default)]
pub struct ScrubReport {
    pub verified: u64,
    pub mismatched: Vec<String>,
}

/// One background verify pass over every cached image, on a thread of its own at nice 19
/// (so serving keeps the CPU), stopping between images once the pass is dropped (shutdown).
pub async fn scrub_pass(state: &AppState) -> anyhow::Result<()> {
    struct Cancel(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Cancel {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let cancel = Cancel(Arc::default());
    let (flag, s) = (cancel.0.clone(), state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("imgcache-scrub".into())
        .spawn(move || {
            // On Linux a thread has its own nice value: only this thread is lowered.
            let _ = rustix::process::setpriority_process(None, 19);
            let _ = tx.send(scrub_blocking(&s, &flag));
        })?;
    let report = rx
        .await
        .map_err(|_| anyhow::anyhow!("scrub thread ended abnormally"))??;
    drop(cancel);
    if !report.mismatched.is_empty() {
        refresh_gauges(state).await;
    }
    tracing::info!(
        verified = report.verified,
        mismatched = report.mismatched.len(),
        "scrub pass done"
    );
    Ok(())
}

fn scrub_blocking(
    state: &AppState,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<ScrubReport, StoreError> {
    let mut report = ScrubReport::default();
    for rec in state.cache.get_cached_images()? {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let Ok(key) = Key::new(&rec.image_id) else {
            continue;
        };
        let outcome = match state.cache.verify(&key, &mut |_| {}) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "scrub: cannot verify");
                continue;
            }
        };
        state.metrics.scrubbed.inc();
        report.verified += 1;
        if let imgcache_store::VerifyOutcome::Mismatch {
            expected, actual, ..
        } = &outcome
        {
            state.metrics.scrub_mismatches.inc();
            tracing::warn!(key = %key, %expected, %actual, "scrub: cached image does not match its checksum; moved to invalid/");
            report.mismatched.push(key.to_string());
        }
    }
    Ok(report)
}

/// Updates the cache gauges after something changed the cache.
pub(crate) async fn refresh_gauges(state: &AppState) {
    let s = state.clone();
    if let Err(e) = off_thread(move || s.metrics.refresh_cache_gauges(&s.cache)).await {
        tracing::warn!(error = %e, "cannot refresh cache gauges");
    }
}

/// Exponential backoff: `base`, doubling, at most `max`.
#[derive(Clone, Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }
    /// The wait after one more failure.
    fn fail(&mut self) -> Duration {
        let wait = self
            .base
            .saturating_mul(2u32.saturating_pow(self.failures.min(30)))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        wait
    }
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `step` in its own task so a panic is caught like an error.
async fn guarded<Fut>(fut: Fut) -> anyhow::Result<()>
where
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(anyhow::anyhow!("panicked: {e}")),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

/// Runs `step` every `interval` (first after one interval) and whenever `wake` is notified;
/// after a failed step, retries with exponential backoff instead.
async fn periodic<F, Fut>(
    name: &'static str,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
    wake: Option<Arc<Notify>>,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut backoff = Backoff::new(STEP_BACKOFF, STEP_BACKOFF_MAX);
    let mut wait = interval;
    loop {
        let woken = async {
            match &wake {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
            _ = woken => {}
        }
        let res = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = guarded(step()) => r,
        };
        match res {
            Ok(()) => {
                backoff.reset();
                wait = interval;
            }
            Err(e) => {
                wait = backoff.fail();
                tracing::error!(worker = name, error = format!("{e:#}"), retry_in = ?wait, "worker step failed");
            }
        }
    }
}

/// What became of one queued image.
enum Prefetched {
    /// Cached (now or already); dequeued.
    Done,
    /// Cannot ever be fetched; dequeued.
    Dropped,
}

/// One queued image's failures.
struct Retry {
    backoff: Backoff,
    next_at: Instant,
}

async fn prefetcher(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut step_backoff = Backoff::new(STEP_BACKOFF, STEP_BACKOFF_MAX);
    let mut retries: HashMap<String, Retry> = HashMap::new();
    loop {
        let wait = match prefetch_pass(&state, &mut stop, &mut retries).await {
            Ok(None) => return, // stopped
            Ok(Some(next_due)) => {
                step_backoff.reset();
                next_due.map_or(PREFETCH_RESCAN, |at| {
                    at.saturating_duration_since(Instant::now())
                        .min(PREFETCH_RESCAN)
                })
            }
            Err(e) => {
                let wait = step_backoff.fail();
                tracing::error!(worker = "prefetcher", error = format!("{e:#}"), retry_in = ?wait, "worker step failed");
                wait
            }
        };
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
            _ = state.prefetch_wake.notified() => {
                // An operator queued (or re-queued) an image: retry everything now.
                let now = Instant::now();
                for r in retries.values_mut() {
                    r.next_at = now;
                }
            }
        }
    }
}

/// One pass over the queue. `Ok(None)` when stopped; else when the next image in backoff is due.
async fn prefetch_pass(
    state: &AppState,
    stop: &mut watch::Receiver<bool>,
    retries: &mut HashMap<String, Retry>,
) -> anyhow::Result<Option<Option<Instant>>> {
    let cache = state.cache.clone();
    let queued = off_thread(move || cache.get_queued_images()).await?;
    retries.retain(|id, _| queued.contains(id));
    let mut next_due: Option<Instant> = None;
    for id in queued {
        if *stop.borrow() {
            return Ok(None);
        }
        if let Some(r) = retries.get(&id)
            && r.next_at > Instant::now()
        {
            next_due = Some(next_due.map_or(r.next_at, |d| d.min(r.next_at)));
            continue;
        }
        let res = tokio::select! {
            _ = stopped(stop) => return Ok(None),
            r = guarded_item(prefetch_one(state.clone(), id.clone())) => r,
        };
        match res {
            Ok(outcome) => {
                retries.remove(&id);
                let key = Key::new(&id)?;
                let cache = state.cache.clone();
                off_thread(move || cache.delete_queued_image(&key)).await?;
                if let Prefetched::Done = outcome {
                    state.prune_wake.notify_one();
                }
            }
            Err(e) => {
                let r = retries.entry(id.clone()).or_insert_with(|| Retry {
                    backoff: Backoff::new(ITEM_BACKOFF, ITEM_BACKOFF_MAX),
                    next_at: Instant::now(),
                });
                let wait = r.backoff.fail();
                r.next_at = Instant::now() + wait;
                next_due = Some(next_due.map_or(r.next_at, |d| d.min(r.next_at)));
                tracing::warn!(image_id = %id, error = format!("{e:#}"), retry_in = ?wait, "prefetch failed; the image stays queued");
            }
        }
    }
    Ok(Some(next_due))
}

async fn guarded_item<Fut>(fut: Fut) -> anyhow::Result<Prefetched>
where
    Fut: Future<Output = anyhow::Result<Prefetched>> + Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("prefetch task: {e}")),
    }
}

/// Prefetches one queued image: a fill like any client's miss (the same key lock, admission
/// pipeline and in-process coalescing, so clients asking for the image meanwhile follow it),
/// with nobody reading it.
async fn prefetch_one(state: AppState, id: String) -> anyhow::Result<Prefetched> {
    let key = Key::new(&id)?;
    let Ok(uuid) = Uuid::parse_str(&id) else {
        tracing::warn!(image_id = %id, "not a Glance image id; dropped from the queue");
        return Ok(Prefetched::Dropped);
    };
    let cache = state.cache.clone();
    let k = key.clone();
    if off_thread(move || cache.is_cached(&k)).await? {
        return Ok(Prefetched::Done);
    }
    if state.config.sources.glance_url.is_none() {
        anyhow::bail!("no upstream Glance configured (--glance-url)");
    }
    let started = std::time::Instant::now();
    let origin = Origin {
        href: Href::Glance(uuid),
        href_raw: uuid.hyphenated().to_string(),
        glance_token: None,
        revalidate: false,
    };
    let (fill, _) = state
        .fills
        .join_or_start(&state, &key, origin)
        .map_err(|e| anyhow::anyhow!(e.message))?;
    match fill.ended().await {
        Outcome::Done(Done::Written { size, .. }) => {
            tracing::info!(image_id = %id, size, seconds = started.elapsed().as_secs_f64(), "prefetched");
            Ok(Prefetched::Done)
        }
        Outcome::Done(Done::Held { .. }) => Ok(Prefetched::Done),
        Outcome::Passthrough => {
            tracing::warn!(image_id = %id, max_size = state.config.max_size, "larger than the cache can hold; dropped from the queue");
            Ok(Prefetched::Dropped)
        }
        Outcome::Failed(f) if f.kind == FailKind::NotFound => {
            tracing::warn!(image_id = %id, error = %f, "upstream has no such image; dropped from the queue");
            Ok(Prefetched::Dropped)
        }
        Outcome::Failed(f) => Err(anyhow::anyhow!("{f}")),
        timed_out @ Outcome::TimedOut { .. } => Err(anyhow::anyhow!(
            "{}",
            timed_out.error().map(|e| e.to_string()).unwrap_or_default()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let waits: Vec<u64> = (0..5).map(|_| b.fail().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        for _ in 0..100 {
            b.fail();
        }
        assert_eq!(b.fail(), Duration::from_secs(5));
        b.reset();
        assert_eq!(b.fail(), Duration::from_secs(1));
    }
}
