//! One contract, two backends: every check runs against the embedded store (a redb file) and
//! against a real etcd started on a loopback port.

use std::time::Duration;

use serde_json::json;
use trellis_store::{Change, Event, Expect, Key, Store, StoreError, Write};
use trellis_test_support::etcd::Etcd;

fn put(key: &Key, doc: serde_json::Value, expect: Expect) -> Write {
    Write {
        key: key.clone(),
        doc: Some(doc),
        expect,
    }
}

fn del(key: &Key, expect: Expect) -> Write {
    Write {
        key: key.clone(),
        doc: None,
        expect,
    }
}

async fn next(w: &mut trellis_store::Watch) -> Change {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a change within 10 s")
        .expect("watch alive")
}

async fn suite(store: Store) {
    let a = Key::new("Service", "shop", "a");
    let b = Key::new("Service", "shop", "b");
    let (start, mut watch) = store.list_and_watch().await.unwrap();
    assert!(start.objects.is_empty());

    // Create; versions are revisions and grow.
    let r1 = store
        .write(vec![put(&a, json!({"n": 1}), Expect::Absent)])
        .await
        .unwrap();
    assert!(r1 > start.revision);
    let got = store.get(&a).await.unwrap().unwrap();
    assert_eq!((got.version, &got.doc), (r1, &json!({"n": 1})));

    // Creating again is a conflict.
    let e = store
        .write(vec![put(&a, json!({"n": 9}), Expect::Absent)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");

    // Update at the right version works; at a stale one it is refused.
    let r2 = store
        .write(vec![put(&a, json!({"n": 2}), Expect::Version(r1))])
        .await
        .unwrap();
    assert!(r2 > r1);
    let e = store
        .write(vec![put(&a, json!({"n": 3}), Expect::Version(r1))])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { key, .. } if *key == a),
        "{e}"
    );
    assert_eq!(store.get(&a).await.unwrap().unwrap().doc, json!({"n": 2}));

    // A batch with one stale precondition writes nothing.
    let e = store
        .write(vec![
            put(&b, json!({"n": 1}), Expect::Absent),
            put(&a, json!({"n": 4}), Expect::Version(r1)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    assert!(store.get(&b).await.unwrap().is_none(), "half-applied batch");

    // A good batch writes every document at one revision.
    let r3 = store
        .write(vec![
            put(&b, json!({"n": 1}), Expect::Any),
            put(&a, json!({"n": 5}), Expect::Any),
        ])
        .await
        .unwrap();
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, r3);
    let versions: Vec<(String, u64)> = listing
        .objects
        .iter()
        .map(|o| (o.key.name.clone(), o.version))
        .collect();
    assert_eq!(versions, [("a".into(), r3), ("b".into(), r3)]);

    // Deletes: a missing key is NotFound; a stale version a conflict.
    let missing = Key::new("Service", "shop", "zz");
    let e = store
        .write(vec![del(&missing, Expect::Any)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
    let e = store
        .write(vec![del(&b, Expect::Version(r1))])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
    let r4 = store
        .write(vec![del(&b, Expect::Version(r3))])
        .await
        .unwrap();
    assert!(store.get(&b).await.unwrap().is_none());

    // The watcher saw every committed batch, in order, and nothing refused.
    let c = next(&mut watch).await;
    assert_eq!(c.revision, r1);
    let c = next(&mut watch).await;
    assert_eq!(c.revision, r2);
    let c = next(&mut watch).await;
    assert_eq!(c.revision, r3);
    assert_eq!(c.events.len(), 2);
    let c = next(&mut watch).await;
    assert_eq!(
        (c.revision, &c.events[..]),
        (r4, &[Event::Delete(b.clone())][..])
    );

    // A watch started now begins after the listing: no repeat of old batches.
    let (listing, mut w2) = store.list_and_watch().await.unwrap();
    assert_eq!(listing.revision, r4);
    let r5 = store
        .write(vec![put(&b, json!({"n": 6}), Expect::Absent)])
        .await
        .unwrap();
    let c = next(&mut w2).await;
    assert_eq!(c.revision, r5);
    match &c.events[..] {
        [Event::Put(o)] => assert_eq!((&o.key, o.version, &o.doc), (&b, r5, &json!({"n": 6}))),
        other => panic!("unexpected events {other:?}"),
    }
}

#[tokio::test]
async fn embedded_store_conformance() {
    let dir = std::env::temp_dir().join(format!("trellis-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open("embedded", &dir).await.unwrap();
    suite(store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn embedded_store_survives_reopen() {
    let dir = std::env::temp_dir().join(format!("trellis-store-reopen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let key = Key::new("Workload", "shop", "w");
    let rev = {
        let store = Store::open("embedded", &dir).await.unwrap();
        store
            .write(vec![put(&key, json!({"x": true}), Expect::Absent)])
            .await
            .unwrap()
    };
    let store = Store::open("embedded", &dir).await.unwrap();
    let listing = store.list().await.unwrap();
    assert_eq!(listing.revision, rev);
    assert_eq!(listing.objects.len(), 1);
    assert_eq!(listing.objects[0].version, rev);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn etcd_store_conformance() {
    let etcd = Etcd::start().await;
    let store = Store::open(&etcd.url(), std::path::Path::new("/nonexistent"))
        .await
        .unwrap();
    suite(store).await;
}

#[tokio::test]
async fn etcd_unreachable_is_an_error_not_a_hang() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("etcd://127.0.0.1:{port}");
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        Store::open(&url, std::path::Path::new("/nonexistent")),
    )
    .await
    .expect("connect gives up within its timeout");
    assert!(matches!(r, Err(StoreError::Backend(_))));
}
