//! Unfinished ByteStream uploads, kept by resource name so a client can
//! resume one (QueryWriteStatus, then Write from where it stopped).
//!
//! Bounded in number and in time: at most `--max-open-uploads` are held; an
//! upload no stream is writing is *parked*, and parked uploads are dropped
//! (their temp files or staged chunks deleted) oldest first when the table
//! is full, all at once when the store has no room left for uploads, and
//! otherwise after [`PARKED_LIMIT`]. While every held upload has a stream
//! writing to it, a new one is refused with RESOURCE_EXHAUSTED.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tonic::Status;

use crate::storage::{BlobSink, StorageError};

/// An upload shared by the streams writing it.
pub(crate) type Upload = Arc<tokio::sync::Mutex<Box<dyn BlobSink>>>;

/// How long a parked upload stays resumable. Clients resume within seconds
/// (Bazel retries with backoff of at most a few seconds), so a minute keeps
/// resumption working while abandoned temp files go soon.
pub(crate) const PARKED_LIMIT: Duration = Duration::from_secs(60);

/// How often parked uploads past [`PARKED_LIMIT`] are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

struct Entry {
    upload: Upload,
    /// Streams writing it now.
    streams: usize,
    /// When the last stream let go; `None` while one writes.
    parked_since: Option<Instant>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<String, Entry>,
    /// Uploads being created (counted against the limit before they exist).
    opening: usize,
}

impl Table {
    fn drop_expired(&mut self, now: Instant) {
        self.entries.retain(|name, entry| {
            let keep = entry
                .parked_since
                .is_none_or(|since| now.duration_since(since) < PARKED_LIMIT);
            if !keep {
                tracing::debug!(resource = %name, "dropping an abandoned upload");
            }
            keep
        });
    }

    fn oldest_parked(&self) -> Option<String> {
        self.entries
            .iter()
            .filter_map(|(name, entry)| Some((entry.parked_since?, name)))
            .min()
            .map(|(_, name)| name.clone())
    }
}

/// Every unfinished upload of one server.
pub(crate) struct UploadTable {
    table: Mutex<Table>,
    max_open: usize,
}

/// One stream's hold on an upload; dropping it parks the upload when no
/// other stream writes it.
pub(crate) struct UploadHold {
    table: Arc<UploadTable>,
    name: String,
    pub(crate) upload: Upload,
}

impl Drop for UploadHold {
    fn drop(&mut self) {
        let mut table = self.table.table.lock().unwrap();
        if let Some(entry) = table.entries.get_mut(&self.name) {
            if Arc::ptr_eq(&entry.upload, &self.upload) {
                entry.streams -= 1;
                if entry.streams == 0 {
                    entry.parked_since = Some(Instant::now());
                }
            }
        }
    }
}

/// Undoes an `opening` count however the creation ends (even cancelled).
struct Opening<'a> {
    uploads: &'a UploadTable,
    counted: bool,
}

impl Opening<'_> {
    /// Ends it while the table is already locked.
    fn end(mut self, table: &mut Table) {
        table.opening -= 1;
        self.counted = false;
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.uploads.table.lock().unwrap().opening -= 1;
        }
    }
}

/// Why an upload could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// Every held upload is being written.
    #[error("{open} uploads are in progress, the most this server holds (--max-open-uploads={limit}); retry later")]
    Full {
        /// Uploads held and being created.
        open: usize,
        /// The limit.
        limit: usize,
    },
    /// The store could not start it.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<OpenError> for Status {
    fn from(error: OpenError) -> Status {
        match error {
            OpenError::Full { .. } => Status::resource_exhausted(error.to_string()),
            OpenError::Storage(e) => e.into(),
        }
    }
}

impl UploadTable {
    /// A table of at most `max_open` uploads, swept by a background task
    /// for as long as it lives.
    pub(crate) fn new(max_open: usize) -> Arc<UploadTable> {
        let table = Arc::new(UploadTable {
            table: Mutex::new(Table::default()),
            max_open: max_open.max(1),
        });
        let weak: Weak<UploadTable> = Arc::downgrade(&table);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    let Some(table) = weak.upgrade() else { return };
                    table.table.lock().unwrap().drop_expired(Instant::now());
                }
            });
        }
        table
    }

    /// Holds the upload `name`, creating it with `create` if it is not held.
    pub(crate) async fn open<F, Fut>(
        self: &Arc<Self>,
        name: &str,
        create: F,
    ) -> Result<UploadHold, OpenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Box<dyn BlobSink>, StorageError>>,
    {
        {
            let mut table = self.table.lock().unwrap();
            table.drop_expired(Instant::now());
            if let Some(hold) = self.join(&mut table, name) {
                return Ok(hold);
            }
            if table.entries.len() + table.opening >= self.max_open {
                match table.oldest_parked() {
                    Some(oldest) => {
                        tracing::debug!(resource = %oldest, "dropping the oldest abandoned upload: the upload table is full");
                        table.entries.remove(&oldest);
                    }
                    None => {
                        return Err(OpenError::Full {
                            open: table.entries.len() + table.opening,
                            limit: self.max_open,
                        })
                    }
                }
            }
            table.opening += 1;
        }
        let opening = Opening {
            uploads: self,
            counted: true,
        };
        let sink = create().await;
        let mut table = self.table.lock().unwrap();
        opening.end(&mut table);
        let sink = sink?;
        // Another stream may have created it meanwhile: share that one.
        table
            .entries
            .entry(name.to_string())
            .or_insert_with(|| Entry {
                upload: Arc::new(tokio::sync::Mutex::new(sink)),
                streams: 0,
                parked_since: None,
            });
        Ok(self.join(&mut table, name).expect("just inserted"))
    }

    fn join(self: &Arc<Self>, table: &mut Table, name: &str) -> Option<UploadHold> {
        let entry = table.entries.get_mut(name)?;
        entry.streams += 1;
        entry.parked_since = None;
        Some(UploadHold {
            table: self.clone(),
            name: name.to_string(),
            upload: entry.upload.clone(),
        })
    }

    /// The upload `name`, if held, without holding it.
    pub(crate) fn get(&self, name: &str) -> Option<Upload> {
        let table = self.table.lock().unwrap();
        table.entries.get(name).map(|entry| entry.upload.clone())
    }

    /// Forgets the upload `name` (finished, failed, or no longer needed).
    pub(crate) fn remove(&self, name: &str) {
        self.table.lock().unwrap().entries.remove(name);
    }

    /// Drops every parked upload, freeing its space; returns how many.
    pub(crate) fn drop_parked(&self) -> usize {
        let mut table = self.table.lock().unwrap();
        let before = table.entries.len();
        table
            .entries
            .retain(|_, entry| entry.parked_since.is_none());
        before - table.entries.len()
    }
}
