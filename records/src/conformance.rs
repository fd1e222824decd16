//! The conformance suite every [`RecordStore`] passes. A store's tests
//! invoke [`record_store_conformance!`](crate::record_store_conformance)
//! with an async block yielding `(store, guard)` (the guard is kept alive
//! for the test: a temp dir, a schema); it expands to one `#[tokio::test]`
//! per property below. Each property works in a kind of its own, so stores
//! shared between tests (one database) do not see each other's records.

use bytes::Bytes;

use crate::{RecordChange, RecordError, RecordStore, MAX_KEY_BYTES, MAX_RECORD_BYTES};

/// A kind no other test (or earlier run against the same database) uses.
pub fn unique_kind(tag: &str) -> String {
    format!("t-{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// put, get, load_all (ordered by key), replace, delete, delete of an absent key.
pub async fn put_get_replace_delete(store: &dyn RecordStore) {
    let kind = unique_kind("basic");
    assert_eq!(store.get(&kind, "a").await.unwrap(), None);
    assert!(store.load_all(&kind).await.unwrap().is_empty());
    store
        .put(&kind, "b", Bytes::from_static(b"two"))
        .await
        .unwrap();
    store
        .put(&kind, "a", Bytes::from_static(b"one"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&kind, "a").await.unwrap(),
        Some(Bytes::from_static(b"one"))
    );
    assert_eq!(
        store.load_all(&kind).await.unwrap(),
        vec![
            ("a".to_string(), Bytes::from_static(b"one")),
            ("b".to_string(), Bytes::from_static(b"two"))
        ]
    );
    store
        .put(&kind, "a", Bytes::from_static(b"uno"))
        .await
        .unwrap();
    assert_eq!(
        store.get(&kind, "a").await.unwrap(),
        Some(Bytes::from_static(b"uno"))
    );
    store.delete(&kind, "a").await.unwrap();
    store.delete(&kind, "a").await.unwrap();
    store.delete(&kind, "never-there").await.unwrap();
    assert_eq!(store.get(&kind, "a").await.unwrap(), None);
    assert_eq!(
        store.load_all(&kind).await.unwrap(),
        vec![("b".to_string(), Bytes::from_static(b"two"))]
    );
}

/// One apply's changes take effect in order; kinds are separate key spaces.
pub async fn apply_is_ordered_and_kinds_are_separate(store: &dyn RecordStore) {
    let (ops, jobs) = (unique_kind("ops"), unique_kind("jobs"));
    store
        .apply(vec![
            RecordChange::put(&ops, "k", b"first".to_vec()),
            RecordChange::delete(&ops, "k"),
            RecordChange::put(&ops, "k2", b"x".to_vec()),
            RecordChange::put(&ops, "k2", b"y".to_vec()),
            RecordChange::delete(&jobs, "k3"),
            RecordChange::put(&jobs, "k3", b"z".to_vec()),
            RecordChange::put(&jobs, "k", b"job".to_vec()),
        ])
        .await
        .unwrap();
    assert_eq!(store.get(&ops, "k").await.unwrap(), None);
    assert_eq!(
        store.get(&ops, "k2").await.unwrap(),
        Some(Bytes::from_static(b"y"))
    );
    assert_eq!(
        store.get(&jobs, "k3").await.unwrap(),
        Some(Bytes::from_static(b"z"))
    );
    assert_eq!(
        store.get(&jobs, "k").await.unwrap(),
        Some(Bytes::from_static(b"job"))
    );
    assert_eq!(store.load_all(&ops).await.unwrap().len(), 1);
    assert_eq!(store.load_all(&jobs).await.unwrap().len(), 2);
    store.apply(vec![]).await.unwrap();
}

/// Empty, binary and large values, and keys with `/`, spaces and non-ASCII, round-trip.
pub async fn values_and_keys_round_trip(store: &dyn RecordStore) {
    let kind = unique_kind("bytes");
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let keys = [
        "main/operations/0b7c",
        "with space",
        "ünïcødé ✓",
        &"k".repeat(MAX_KEY_BYTES),
    ];
    for key in keys {
        store
            .put(&kind, key, Bytes::from(binary.clone()))
            .await
            .unwrap();
    }
    store.put(&kind, "empty", Bytes::new()).await.unwrap();
    for key in keys {
        assert_eq!(
            store.get(&kind, key).await.unwrap().as_deref(),
            Some(&binary[..]),
            "{key}"
        );
    }
    assert_eq!(store.get(&kind, "empty").await.unwrap(), Some(Bytes::new()));
    let mut expected: Vec<&str> = keys.to_vec();
    expected.push("empty");
    expected.sort();
    let loaded: Vec<String> = store
        .load_all(&kind)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(loaded, expected);
}

/// Bad kinds, keys and values are refused with an error naming them, and
/// nothing of the apply they were in is written.
pub async fn bad_input_is_refused_and_writes_nothing(store: &dyn RecordStore) {
    let kind = unique_kind("bad");
    let invalid = |e: RecordError| match e {
        RecordError::Invalid(message) => message,
        other => panic!("expected Invalid, got {other}"),
    };
    let message = invalid(store.put("Bad/Kind", "k", Bytes::new()).await.unwrap_err());
    assert!(message.contains("Bad/Kind"), "{message}");
    let message = invalid(store.load_all("").await.unwrap_err());
    assert!(message.contains("record kind"), "{message}");
    let long_key = "k".repeat(MAX_KEY_BYTES + 1);
    let message = invalid(
        store
            .apply(vec![
                RecordChange::put(&kind, "fine", b"v".to_vec()),
                RecordChange::put(&kind, &long_key, b"v".to_vec()),
            ])
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains(&kind) && message.contains("key"),
        "{message}"
    );
    let huge = Bytes::from(vec![0u8; MAX_RECORD_BYTES + 1]);
    let message = invalid(store.put(&kind, "huge", huge).await.unwrap_err());
    assert!(
        message.contains("huge") && message.contains("limit"),
        "{message}"
    );
    assert!(
        store.load_all(&kind).await.unwrap().is_empty(),
        "a refused apply wrote something"
    );
}

/// Many concurrent applies all land.
pub async fn concurrent_applies_all_land(store: &dyn RecordStore) {
    let kind = unique_kind("many");
    let writes = (0..200).map(|i| {
        let kind = kind.clone();
        async move {
            store
                .apply(vec![
                    RecordChange::put(&kind, &format!("k{i:03}"), format!("v{i}").into_bytes()),
                    RecordChange::put(&kind, &format!("gone{i:03}"), b"x".to_vec()),
                    RecordChange::delete(&kind, &format!("gone{i:03}")),
                ])
                .await
        }
    });
    for result in futures_join_all(writes).await {
        result.unwrap();
    }
    let loaded = store.load_all(&kind).await.unwrap();
    assert_eq!(loaded.len(), 200);
    for (i, (key, value)) in loaded.iter().enumerate() {
        assert_eq!(key, &format!("k{i:03}"));
        assert_eq!(value, &Bytes::from(format!("v{i}")));
    }
}

/// Runs futures concurrently on the current task (no futures crate needed).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for future in futures {
        set.push(Box::pin(future));
    }
    let mut outputs: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in set.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.unwrap()).collect()
}

/// Expands to one `#[tokio::test]` per property of the suite, each running
/// against the store the given async block yields as `(store, guard)`.
#[macro_export]
macro_rules! record_store_conformance {
    ($make:expr) => {
        $crate::record_store_conformance!(@each $make;
            put_get_replace_delete,
            apply_is_ordered_and_kinds_are_separate,
            values_and_keys_round_trip,
            bad_input_is_refused_and_writes_nothing,
            concurrent_applies_all_land);
    };
    (@each $make:expr; $($name:ident),*) => {
        mod record_store_conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = $make.await;
                    $crate::conformance::$name(&*store).await;
                }
            )*
        }
    };
}
