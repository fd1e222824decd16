//! GetTree: every directory under a root, breadth first, each distinct
//! directory once, in pages.
//!
//! One call streams the page its token names and every page after it, as
//! the walk reaches them (the server holds one page of directories, plus
//! the walk's queue and the digests seen). Each page's `next_page_token`
//! is `{root hash}-{root size}-{index}`: where the next page starts in the
//! walk's order. Completed walks keep that order (digests only) in a small
//! cache, so a client that resumes after an interrupted stream is answered
//! from the index it names without walking again; if the order was evicted,
//! the walk is redone once. A token for another root, or past the end of
//! the tree, is INVALID_ARGUMENT.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use buildkube_proto::reapi;
use buildkube_reapi::Digest;
use tokio::sync::mpsc;
use tonic::Status;

use crate::farm::Farm;

/// Directories per page when the client does not say.
pub(crate) const DEFAULT_PAGE_SIZE: usize = 1000;
/// Digests kept by [`TreeOrders`] across all cached walks (about 40 bytes
/// each: 10 MiB).
const CACHED_DIGESTS: usize = 256 << 10;

/// Where a GetTree call starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageToken {
    root: Digest,
    index: usize,
}

impl PageToken {
    /// Parses `token` as issued for `root` ("" is the start).
    pub(crate) fn parse(token: &str, root: Digest) -> Result<PageToken, Status> {
        if token.is_empty() {
            return Ok(PageToken { root, index: 0 });
        }
        let foreign = || {
            Status::invalid_argument(format!(
                "page_token {:?} was not issued by this server for root_digest {root}",
                token.chars().take(100).collect::<String>()
            ))
        };
        let mut parts = token.rsplitn(3, '-');
        let (Some(index), Some(size), Some(hash)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(foreign());
        };
        let index: usize = index.parse().map_err(|_| foreign())?;
        let size: i64 = size.parse().map_err(|_| foreign())?;
        let token_root = Digest::from_hex(hash, size).map_err(|_| foreign())?;
        if token_root != root || index == 0 {
            return Err(foreign());
        }
        Ok(PageToken { root, index })
    }

    fn render(root: Digest, index: usize) -> String {
        format!("{}-{}-{index}", root.hash_hex(), root.size())
    }
}

/// The breadth-first order of recently completed walks, by root, within
/// [`CACHED_DIGESTS`] digests in all (oldest walks go first).
#[derive(Debug, Default)]
pub(crate) struct TreeOrders {
    state: Mutex<TreeOrdersState>,
}

#[derive(Debug, Default)]
struct TreeOrdersState {
    orders: HashMap<Digest, Arc<Vec<Digest>>>,
    /// Insertion order, for eviction.
    roots: VecDeque<Digest>,
    digests: usize,
}

impl TreeOrders {
    fn get(&self, root: &Digest) -> Option<Arc<Vec<Digest>>> {
        self.state.lock().unwrap().orders.get(root).cloned()
    }

    fn insert(&self, root: Digest, order: Vec<Digest>) {
        if order.len() > CACHED_DIGESTS {
            return;
        }
        let mut state = self.state.lock().unwrap();
        if state.orders.contains_key(&root) {
            return;
        }
        while state.digests + order.len() > CACHED_DIGESTS {
            let Some(oldest) = state.roots.pop_front() else {
                break;
            };
            if let Some(evicted) = state.orders.remove(&oldest) {
                state.digests -= evicted.len();
            }
        }
        state.digests += order.len();
        state.roots.push_back(root);
        state.orders.insert(root, Arc::new(order));
    }

    #[cfg(test)]
    fn contains(&self, root: &Digest) -> bool {
        self.state.lock().unwrap().orders.contains_key(root)
    }
}

/// Pages out of a walk, with their tokens.
struct Pager {
    root: Digest,
    page_size: usize,
    /// Index in the walk's order of the next directory.
    index: usize,
    /// Directories before this index are not sent.
    start: usize,
    page: Vec<reapi::Directory>,
    pages: mpsc::Sender<Result<reapi::GetTreeResponse, Status>>,
}

impl Pager {
    /// Adds a directory; sends the page when full. False once the client
    /// has gone.
    async fn push(&mut self, directory: reapi::Directory, more: bool) -> bool {
        self.index += 1;
        if self.index <= self.start {
            return true;
        }
        self.page.push(directory);
        if self.page.len() < self.page_size || !more {
            return true;
        }
        self.send(PageToken::render(self.root, self.index)).await
    }

    async fn send(&mut self, next_page_token: String) -> bool {
        let page = reapi::GetTreeResponse {
            directories: std::mem::take(&mut self.page),
            next_page_token,
        };
        self.pages.send(Ok(page)).await.is_ok()
    }

    /// Sends the last page (possibly empty: the directories after the last
    /// full page were all missing).
    async fn finish(mut self) -> Result<(), Status> {
        if self.index < self.start {
            return Err(Status::invalid_argument(format!(
                "page_token index {} is past the end of the tree under {} ({} directories)",
                self.start, self.root, self.index
            )));
        }
        self.send(String::new()).await;
        Ok(())
    }
}

/// Streams the pages of the tree under `start.root` from `start.index` into
/// `pages`; errors end the stream.
pub(crate) async fn stream_tree(
    farm: Arc<Farm>,
    orders: Arc<TreeOrders>,
    start: PageToken,
    page_size: usize,
    pages: mpsc::Sender<Result<reapi::GetTreeResponse, Status>>,
) {
    let errors = pages.clone();
    let mut pager = Pager {
        root: start.root,
        page_size,
        index: 0,
        start: start.index,
        page: Vec::new(),
        pages,
    };
    let result = match orders.get(&start.root) {
        Some(order) if start.index > 0 => resume(&farm, &order, pager).await,
        _ => walk(&farm, &orders, &mut pager)
            .await
            .and(pager.finish().await),
    };
    if let Err(status) = result {
        let _ = errors.send(Err(status)).await;
    }
}

/// Pages from a cached order: only the directories from the token on are
/// read.
async fn resume(farm: &Farm, order: &[Digest], mut pager: Pager) -> Result<(), Status> {
    if pager.start > order.len() {
        return pager.finish().await; // past the end: the error
    }
    pager.index = pager.start;
    for (i, digest) in order.iter().enumerate().skip(pager.start) {
        pager.index = i;
        // Evicted since: skipped, as a missing directory is in a walk.
        let Some(directory) = farm
            .read_bounded_message::<reapi::Directory>(digest, "directory")
            .await?
        else {
            continue;
        };
        if !pager.push(directory, i + 1 < order.len()).await {
            return Ok(());
        }
    }
    pager.finish().await
}

/// Walks the tree breadth first, paging as it goes; a complete walk's order
/// is cached.
async fn walk(farm: &Farm, orders: &TreeOrders, pager: &mut Pager) -> Result<(), Status> {
    let root = pager.root;
    let mut order = Vec::new();
    let mut seen = HashSet::from([root]);
    let mut queue = VecDeque::from([root]);
    while let Some(digest) = queue.pop_front() {
        let Some(directory) = farm
            .read_bounded_message::<reapi::Directory>(&digest, "directory")
            .await?
        else {
            if digest == root {
                return Err(Status::not_found(format!(
                    "root directory {root} not found"
                )));
            }
            continue;
        };
        for child in &directory.directories {
            let child = Digest::from_field(child.digest.as_ref()).map_err(|e| {
                Status::invalid_argument(format!(
                    "directory {digest} entry {:?}: {e}",
                    child.name.chars().take(100).collect::<String>()
                ))
            })?;
            if seen.insert(child) {
                queue.push_back(child);
            }
        }
        order.push(digest);
        if !pager.push(directory, !queue.is_empty()).await {
            return Ok(()); // the client went away
        }
    }
    orders.insert(root, order);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use prost::Message as _;

    use crate::storage::{BlobSink, BlobStore, BlobStream, FsActionCache, FsCas, StorageError};

    /// A store that counts whole-blob reads (what a walk does per directory).
    struct CountingStore {
        inner: FsCas,
        gets: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl BlobStore for CountingStore {
        async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get(digest).await
        }
        async fn read(
            &self,
            digest: &Digest,
            offset: u64,
            len: u64,
        ) -> Result<Option<BlobStream>, StorageError> {
            self.inner.read(digest, offset, len).await
        }
        async fn put(&self, digest: Digest, data: Bytes) -> Result<(), StorageError> {
            self.inner.put(digest, data).await
        }
        async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, StorageError> {
            self.inner.find_missing(digests).await
        }
        async fn begin_write(&self, digest: Digest) -> Result<Box<dyn BlobSink>, StorageError> {
            self.inner.begin_write(digest).await
        }
    }

    /// Pages of one GetTree call from `token`.
    async fn call(
        farm: &Arc<Farm>,
        orders: &Arc<TreeOrders>,
        root: Digest,
        token: &str,
    ) -> Vec<Result<reapi::GetTreeResponse, Status>> {
        let (tx, mut rx) = mpsc::channel(2);
        let start = PageToken::parse(token, root).unwrap();
        tokio::spawn(stream_tree(farm.clone(), orders.clone(), start, 2, tx));
        let mut pages = Vec::new();
        while let Some(page) = rx.recv().await {
            pages.push(page);
        }
        pages
    }

    /// Issue 8, finding 11: GetTree re-walked the whole tree for every
    /// page. A resumed call now reads only the directories it sends.
    #[tokio::test]
    async fn a_resumed_call_reads_only_what_it_sends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CountingStore {
            inner: FsCas::open(&dir.path().join("cas"), u64::MAX)
                .await
                .unwrap(),
            gets: AtomicUsize::new(0),
        });
        // root -> 9 leaves, each distinct: 10 directories, 5 pages of 2.
        let mut leaves = Vec::new();
        for i in 0..9u8 {
            let leaf = reapi::Directory {
                symlinks: vec![reapi::SymlinkNode {
                    name: format!("l{i}"),
                    target: "t".into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let bytes = leaf.encode_to_vec();
            let digest = Digest::of_bytes(&bytes);
            store.put(digest, bytes.into()).await.unwrap();
            leaves.push(reapi::DirectoryNode {
                name: format!("d{i}"),
                digest: Some(digest.into()),
            });
        }
        let root_bytes = reapi::Directory {
            directories: leaves,
            ..Default::default()
        }
        .encode_to_vec();
        let root = Digest::of_bytes(&root_bytes);
        store.put(root, root_bytes.into()).await.unwrap();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let farm = Arc::new(Farm {
            cas: store.clone(),
            action_cache: Arc::new(FsActionCache::open(&dir.path().join("ac")).unwrap()),
            records: Arc::new(
                buildkube_records::FsRecords::open(&dir.path().join("records"))
                    .await
                    .unwrap(),
            ),
            scheduler: Arc::new(buildkube_scheduler::Scheduler::new(Default::default())),
            instances: crate::instances::Instances::new(&["main".into()]).unwrap(),
            metrics: Default::default(),
            stopping,
            limits: Default::default(),
            commands: Default::default(),
            live_logs: Default::default(),
        });
        let orders = Arc::new(TreeOrders::default());

        let pages = call(&farm, &orders, root, "").await;
        let pages: Vec<reapi::GetTreeResponse> = pages.into_iter().map(Result::unwrap).collect();
        assert_eq!(pages.len(), 5);
        assert!(pages.iter().all(|p| p.directories.len() == 2));
        assert_eq!(pages[4].next_page_token, "");
        assert_eq!(store.gets.swap(0, Ordering::SeqCst), 10);

        // Resume after the third page: two pages, four reads.
        let resumed = call(&farm, &orders, root, &pages[2].next_page_token).await;
        let resumed: Vec<reapi::GetTreeResponse> =
            resumed.into_iter().map(Result::unwrap).collect();
        assert_eq!(resumed, pages[3..].to_vec());
        assert_eq!(store.gets.swap(0, Ordering::SeqCst), 4);

        // Past the end, with the order cached or not.
        let beyond = PageToken::render(root, 11);
        for orders in [orders, Arc::default()] {
            let answer = call(&farm, &orders, root, &beyond).await;
            let status = answer.last().unwrap().as_ref().unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn tokens_name_their_root_and_a_place_in_it() {
        let root = Digest::of_bytes(b"root");
        let token = PageToken::render(root, 7);
        assert_eq!(
            PageToken::parse(&token, root).unwrap(),
            PageToken { root, index: 7 }
        );
        assert_eq!(PageToken::parse("", root).unwrap().index, 0);
        let other = Digest::of_bytes(b"other");
        for forged in [
            "7".to_string(),
            "abc".into(),
            PageToken::render(other, 7),
            PageToken::render(root, 0),
            format!("{}-{}-x", root.hash_hex(), root.size()),
            format!("{}-{}-7", root.hash_hex(), root.size() + 1),
            "z".repeat(16 << 10),
        ] {
            let status = PageToken::parse(&forged, root).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{forged}");
            assert!(status.message().len() < 300);
        }
    }

    #[test]
    fn cached_orders_stay_within_their_budget() {
        let orders = TreeOrders::default();
        let roots: Vec<Digest> = (0..3u8).map(|i| Digest::of_bytes(&[i])).collect();
        let half = vec![roots[0]; CACHED_DIGESTS / 2];
        orders.insert(roots[0], half.clone());
        orders.insert(roots[1], half.clone());
        assert!(orders.contains(&roots[0]) && orders.contains(&roots[1]));
        orders.insert(roots[2], vec![roots[2]]);
        assert!(!orders.contains(&roots[0]), "the oldest goes first");
        assert!(orders.contains(&roots[1]) && orders.contains(&roots[2]));
        orders.insert(roots[0], vec![roots[0]; CACHED_DIGESTS + 1]);
        assert!(!orders.contains(&roots[0]), "too big to cache");
        assert!(orders.state.lock().unwrap().digests <= CACHED_DIGESTS);
    }
}
