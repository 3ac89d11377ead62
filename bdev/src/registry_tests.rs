use std::time::{Duration, Instant};

use super::*;
use crate::module::malloc::{MallocBdev, MallocOptions};
use crate::testutil::{malloc, run};
use serde_json::json;

fn malloc_ops(name: &str) -> (BdevProps, Box<dyn Bdev>) {
    let b = MallocBdev::new(MallocOptions {
        name: name.into(),
        uuid: uuid::Uuid::new_v4(),
        num_blocks: 8,
        block_size: 512,
        physical_block_size: 0,
        optimal_io_boundary: 0,
    })
    .unwrap();
    (b.props(), Box::new(b))
}

/// A create that takes 30 ms between reserving its name and registering.
fn slow_create(name: &'static str) -> glommio::task::JoinHandle<()> {
    let res = reserve(name).unwrap();
    reactor::spawn_local_joinable(async move {
        reactor::sleep(Duration::from_millis(30)).await;
        let (props, ops) = malloc_ops(name);
        register(res, props, ops).await.unwrap();
    })
}

#[test]
fn a_name_is_taken_from_the_moment_its_create_starts() {
    run(|| async {
        let create = slow_create("S0");
        assert_eq!(reserve("S0").err().map(|e| e.errno()), Some(libc::EEXIST));
        assert!(lookup("S0").is_none(), "half-made bdev visible");
        assert!(list().is_empty());
        create.await;
        assert!(lookup("S0").is_some());
        assert_eq!(reserve("S0").err().map(|e| e.errno()), Some(libc::EEXIST));
    });
}

#[test]
fn a_delete_racing_a_create_waits_for_it() {
    run(|| async {
        let create = slow_create("S1");
        let t = Instant::now();
        unregister("S1", None).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(25));
        assert!(lookup("S1").is_none());
        create.await;
        assert!(list().is_empty());
        // A failed create: the waiting delete finds nothing.
        let res = reserve("S2").unwrap();
        reactor::spawn_local(async move {
            reactor::sleep(Duration::from_millis(10)).await;
            drop(res);
        });
        assert_eq!(
            unregister("S2", None).await.unwrap_err().errno(),
            libc::ENODEV
        );
        malloc("S2", 8, 512).await;
    });
}

#[test]
fn wait_for_examine_covers_bdevs_an_examine_creates() {
    run(|| async {
        register_examine("test", |b: BdevHandle| {
            Box::pin(async move {
                if b.name() == "Parent" {
                    // The examine keeps the parent invisible while it runs.
                    assert!(lookup("Parent").is_none());
                    let res = reserve("Child").unwrap();
                    reactor::spawn_local(async move {
                        reactor::sleep(Duration::from_millis(20)).await;
                        let (props, ops) = malloc_ops("Child");
                        register(res, props, ops).await.unwrap();
                    });
                }
            })
        });
        malloc("Parent", 8, 512).await;
        assert!(lookup("Child").is_none());
        wait_for_examine().await;
        assert!(lookup("Child").is_some());
    });
}

#[test]
fn unregister_tells_holders_and_waits_for_them_to_close() {
    run(|| async {
        malloc("H", 8, 512).await;
        let slot = std::sync::Arc::new(std::sync::Mutex::new(None::<Descriptor>));
        let s2 = slot.clone();
        let desc = open(
            "H",
            true,
            Some(Box::new(move || {
                // Close a little later, as a real holder draining I/O would.
                let s3 = s2.clone();
                reactor::spawn_local(async move {
                    reactor::sleep(Duration::from_millis(20)).await;
                    s3.lock().unwrap().take();
                });
            })),
        )
        .unwrap();
        desc.claim("test").unwrap();
        assert_eq!(
            open("H", true, None).err().map(|e| e.errno()),
            Some(libc::EPERM)
        );
        assert!(open("H", false, None).is_ok());
        *slot.lock().unwrap() = Some(desc);
        let t = Instant::now();
        unregister("H", None).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(15));
        assert!(slot.lock().unwrap().is_none());
        assert!(lookup("H").is_none());
        assert_eq!(
            unregister("H", None).await.unwrap_err().errno(),
            libc::ENODEV
        );
    });
}

fn claim_json(name: &str) -> (serde_json::Value, serde_json::Value) {
    let j = crate::bdev_rpc::bdev_json(&lookup(name).unwrap());
    (j["claimed"].clone(), j["claim_type"].clone())
}

#[test]
fn read_many_claims_share_a_bdev_and_keep_writers_out_until_the_last_closes() {
    run(|| async {
        malloc("RO", 8, 512).await;
        let eperm = Some(libc::EPERM);
        assert_eq!(claim_json("RO"), (json!(false), serde_json::Value::Null));
        // Not through a writable descriptor, and not while one is open.
        let w = open("RO", true, None).unwrap();
        assert_eq!(
            w.claim_as("a", ClaimType::ReadManyWriteNone)
                .map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        let r1 = open("RO", false, None).unwrap();
        assert_eq!(
            r1.claim_as("a", ClaimType::ReadManyWriteNone)
                .err()
                .map(|e| e.errno()),
            eperm,
            "another descriptor writes"
        );
        assert_eq!(claim_json("RO").0, json!(false), "nothing changed");
        drop(w);
        // Two holders.
        r1.claim_as("a", ClaimType::ReadManyWriteNone).unwrap();
        let r2 = open("RO", false, None).unwrap();
        r2.claim_as("b", ClaimType::ReadManyWriteNone).unwrap();
        assert_eq!(
            r2.claim_as("b", ClaimType::ReadManyWriteNone)
                .err()
                .map(|e| e.errno()),
            eperm,
            "one claim per descriptor"
        );
        assert_eq!(
            claim_json("RO"),
            (json!(true), json!("read_many_write_none"))
        );
        // Held: no writer, no exclusive claim; readers still open.
        assert_eq!(open("RO", true, None).err().map(|e| e.errno()), eperm);
        let r3 = open("RO", false, None).unwrap();
        assert_eq!(r3.claim("c").err().map(|e| e.errno()), eperm);
        drop(r1);
        assert_eq!(open("RO", true, None).err().map(|e| e.errno()), eperm);
        drop(r2);
        assert_eq!(claim_json("RO").0, json!(false), "released by the last");
        let w = open("RO", true, None).unwrap();
        w.claim("c").unwrap();
        assert_eq!(claim_json("RO"), (json!(true), json!("exclusive_write")));
        // Exclusive: no read-many claim beside it.
        assert_eq!(
            r3.claim_as("d", ClaimType::ReadManyWriteNone)
                .err()
                .map(|e| e.errno()),
            eperm
        );
    });
}
