//! The maintenance task: measuring the CAS tables, evicting, expiring.

use super::*;

/// What one maintenance pass found and did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaintenanceReport {
    /// Bytes stored after the pass: blobs, and the staged chunks of
    /// unfinished uploads (which count in `max_size` too).
    pub stored_bytes: u64,
    /// Of `stored_bytes`, the staged chunks of unfinished uploads.
    pub staged_bytes: u64,
    /// Blobs stored after the pass.
    pub stored_blobs: usize,
    /// Blobs deleted by the pass.
    pub evicted_blobs: usize,
    /// Bytes of blobs deleted by the pass.
    pub evicted_bytes: u64,
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(tokio::task::JoinHandle<()>);

/// Runs `pass` now and then every `interval` (a late pass delays the next
/// rather than bunching up), logging failures as `what`; until dropped.
pub(super) fn every<F, Fut>(interval: Duration, what: &'static str, pass: F) -> AbortOnDrop
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), StorageError>> + Send,
{
    AbortOnDrop(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = pass().await {
                tracing::warn!(error = %e, "{what} failed; retrying at the next interval");
            }
        }
    }))
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measures and prunes the CAS tables over a connection of its own (it
/// holds a session lock and must not share a connection with other work).
pub(super) struct Maintainer {
    config: tokio_postgres::Config,
    max_size: Option<u64>,
    connection: tokio::sync::Mutex<Option<Client>>,
    stored_bytes: AtomicU64,
    stored_blobs: AtomicUsize,
    measured: AtomicBool,
}

impl Maintainer {
    /// Measures (and, with `max_size`, prunes) the database `config` names.
    pub(super) fn new(config: tokio_postgres::Config, max_size: Option<u64>) -> Maintainer {
        Maintainer {
            config,
            max_size,
            connection: tokio::sync::Mutex::new(None),
            stored_bytes: AtomicU64::new(0),
            stored_blobs: AtomicUsize::new(0),
            measured: AtomicBool::new(false),
        }
    }

    pub(super) fn usage(&self) -> Option<(u64, usize)> {
        self.measured.load(Ordering::Relaxed).then(|| {
            (
                self.stored_bytes.load(Ordering::Relaxed),
                self.stored_blobs.load(Ordering::Relaxed),
            )
        })
    }

    pub(super) async fn pass(&self) -> Result<MaintenanceReport, StorageError> {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .config
                .connect(NoTls)
                .await
                .map_err(StorageError::backend(STORE, "connecting for maintenance"))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "PostgreSQL maintenance connection lost");
                }
            });
            *slot = Some(client);
        }
        let client = slot.as_ref().expect("connected above");
        let result = self.measure_and_prune(client).await;
        if result.is_err() {
            // Whatever state the session is in (a held lock), start afresh.
            *slot = None;
        }
        let report = result?;
        self.stored_bytes
            .store(report.stored_bytes, Ordering::Relaxed);
        self.stored_blobs
            .store(report.stored_blobs, Ordering::Relaxed);
        self.measured.store(true, Ordering::Relaxed);
        Ok(report)
    }

    async fn measure_and_prune(&self, client: &Client) -> Result<MaintenanceReport, StorageError> {
        let row = client
            .query_one(
                "SELECT (SELECT coalesce(sum(size), 0) FROM buildkube_cas_blobs)::bigint,
                        (SELECT count(*) FROM buildkube_cas_blobs),
                        (SELECT coalesce(sum(length(c.data)), 0) FROM buildkube_cas_content c
                         JOIN buildkube_cas_uploads u ON u.content = c.content)::bigint",
                &[],
            )
            .await
            .map_err(StorageError::backend(STORE, "measuring the CAS"))?;
        client
            .execute(
                &format!(
                    "WITH dead AS (
                         DELETE FROM buildkube_cas_uploads
                         WHERE started < now() - interval '{UPLOAD_LIFETIME}' RETURNING content
                     )
                     DELETE FROM buildkube_cas_content c USING dead WHERE c.content = dead.content"
                ),
                &[],
            )
            .await
            .map_err(StorageError::backend(STORE, "deleting abandoned uploads"))?;
        let staged_bytes = row.get::<_, i64>(2) as u64;
        let mut report = MaintenanceReport {
            stored_bytes: row.get::<_, i64>(0) as u64 + staged_bytes,
            staged_bytes,
            stored_blobs: row.get::<_, i64>(1) as usize,
            evicted_blobs: 0,
            evicted_bytes: 0,
        };
        let Some(max_size) = self.max_size else {
            return Ok(report);
        };
        if report.stored_bytes <= max_size {
            return Ok(report);
        }
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&EVICTION_LOCK])
            .await
            .map_err(StorageError::backend(STORE, "taking the eviction lock"))?
            .get(0);
        if !locked {
            tracing::debug!("another server is evicting from the PostgreSQL CAS");
            return Ok(report);
        }
        let target = max_size - max_size / 10;
        let mut youngest_age = f64::INFINITY;
        let pruned = async {
            while report.stored_bytes > target {
                let need = (report.stored_bytes - target) as i64;
                // The oldest blobs whose running total first reaches `need`;
                // one touched since it was picked is spared.
                let rows = client
                    .query(
                        "WITH gone AS (
                         DELETE FROM buildkube_cas_blobs b
                         USING (
                             SELECT hash, size, accessed FROM (
                                 SELECT hash, size, accessed,
                                        sum(size) OVER (ORDER BY accessed, hash ROWS UNBOUNDED PRECEDING) AS running
                                 FROM (SELECT hash, size, accessed FROM buildkube_cas_blobs
                                       ORDER BY accessed LIMIT $2::bigint) oldest
                             ) o WHERE running - size < $1::bigint
                         ) v
                         WHERE b.hash = v.hash AND b.size = v.size AND b.accessed = v.accessed
                         RETURNING b.size, b.content, extract(epoch FROM now() - b.accessed)::float8 AS age
                         ), content AS (
                             DELETE FROM buildkube_cas_content c USING gone WHERE c.content = gone.content
                         )
                         SELECT size, age FROM gone",
                        &[&need, &EVICTION_BATCH],
                    )
                    .await
                    .map_err(StorageError::backend(STORE, "deleting least recently used blobs"))?;
                if rows.is_empty() {
                    break;
                }
                for row in &rows {
                    let size = row.get::<_, i64>(0) as u64;
                    youngest_age = youngest_age.min(row.get::<_, f64>(1));
                    report.evicted_blobs += 1;
                    report.evicted_bytes += size;
                    report.stored_bytes = report.stored_bytes.saturating_sub(size);
                    report.stored_blobs = report.stored_blobs.saturating_sub(1);
                }
            }
            Ok::<(), StorageError>(())
        }
        .await;
        let unlocked = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&EVICTION_LOCK])
            .await
            .map_err(StorageError::backend(STORE, "releasing the eviction lock"));
        pruned?;
        unlocked?;
        tracing::info!(
            evicted_blobs = report.evicted_blobs,
            evicted_bytes = report.evicted_bytes,
            stored_bytes = report.stored_bytes,
            max_size,
            "PostgreSQL CAS was over its max_size: deleted the least recently used blobs"
        );
        if youngest_age < YOUNG_EVICTION {
            tracing::warn!(
                youngest_evicted_age_secs = youngest_age as u64,
                max_size,
                "PostgreSQL CAS deleted blobs used in the last minutes: max_size is too small for the working set"
            );
        }
        Ok(report)
    }
}
