//! SPEC §2 through the real binary: concurrent clients racing creates of
//! one name, and deletes racing creates, many times over.

mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::Target;
use serde_json::{json, Value};

const ROUNDS: usize = 200;

fn delay_over(name: &str, base: &str) -> Value {
    json!({"name": name, "base_bdev_name": base, "avg_read_latency": 10,
           "p99_read_latency": 10, "avg_write_latency": 10, "p99_write_latency": 10})
}

#[test]
fn two_clients_creating_one_name_give_exactly_one_bdev() {
    let t = Arc::new(Target::start());
    for round in 0..ROUNDS {
        let name = format!("R{round}");
        let barrier = Arc::new(Barrier::new(2));
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (t, b, name) = (t.clone(), barrier.clone(), name.clone());
                thread::spawn(move || {
                    let mut c = t.client();
                    b.wait();
                    // One malloc, one null: the name is what they race for.
                    if i == 0 {
                        c.call(
                            "bdev_malloc_create",
                            json!({"name": name, "num_blocks": 64, "block_size": 512}),
                        )
                    } else {
                        c.call(
                            "bdev_null_create",
                            json!({"name": name, "num_blocks": 64, "block_size": 512}),
                        )
                    }
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {results:?}");
        let err = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert_eq!(err["code"], -17, "round {round}: {err}");
        let listed = t.ok("bdev_get_bdevs", json!({"name": name}));
        assert_eq!(listed.as_array().unwrap().len(), 1);
    }
    assert_eq!(t.bdev_names().len(), ROUNDS);
}

#[test]
fn a_delete_racing_a_create_finds_it_whole_or_not_at_all() {
    let t = Arc::new(Target::start());
    t.ok(
        "bdev_malloc_create",
        json!({"name": "Base", "num_blocks": 64, "block_size": 512}),
    );
    let (mut deleted, mut not_found) = (0, 0);
    for round in 0..ROUNDS {
        // Alternate a plain create and a vbdev create (which opens and
        // claims its base before registering).
        let vbdev = round % 2 == 1;
        let name = if vbdev {
            "D".to_string()
        } else {
            format!("M{round}")
        };
        let barrier = Arc::new(Barrier::new(3));
        let creator = {
            let (t, b, name) = (t.clone(), barrier.clone(), name.clone());
            thread::spawn(move || {
                let mut c = t.client();
                b.wait();
                if vbdev {
                    c.call("bdev_delay_create", delay_over(&name, "Base"))
                } else {
                    c.call(
                        "bdev_malloc_create",
                        json!({"name": name, "num_blocks": 64, "block_size": 512}),
                    )
                }
            })
        };
        let deleter = {
            let (t, b, name) = (t.clone(), barrier.clone(), name.clone());
            thread::spawn(move || {
                let mut c = t.client();
                b.wait();
                let m = if vbdev {
                    "bdev_delay_delete"
                } else {
                    "bdev_malloc_delete"
                };
                c.call(m, json!({"name": name}))
            })
        };
        // A third client lists throughout: never a half-made bdev.
        let lister = {
            let (t, b) = (t.clone(), barrier.clone());
            thread::spawn(move || {
                let mut c = t.client();
                b.wait();
                for _ in 0..3 {
                    let all = c.call("bdev_get_bdevs", Value::Null).unwrap();
                    for bd in all.as_array().unwrap() {
                        assert!(bd["num_blocks"].as_u64().unwrap() > 0);
                        assert!(bd["uuid"].is_string());
                    }
                }
            })
        };
        let created = creator.join().unwrap();
        let del = deleter.join().unwrap();
        lister.join().unwrap();
        assert!(created.is_ok(), "round {round}: create failed: {created:?}");
        match del {
            Ok(v) => {
                assert_eq!(v, json!(true));
                deleted += 1;
                assert_eq!(t.err_code("bdev_get_bdevs", json!({"name": name})), -19);
            }
            Err(e) => {
                assert_eq!(e["code"], -19, "round {round}: {e}");
                not_found += 1;
                // The create completed whole: delete it now.
                let m = if vbdev {
                    "bdev_delay_delete"
                } else {
                    "bdev_malloc_delete"
                };
                t.ok(m, json!({"name": name}));
            }
        }
        // Base is unclaimed again whichever way it went.
        let base = t.ok("bdev_get_bdevs", json!({"name": "Base"}));
        assert_eq!(base[0]["claimed"], false, "round {round}");
    }
    assert_eq!(t.bdev_names(), ["Base"]);
    eprintln!("delete won after create in {deleted} rounds, found nothing in {not_found}");
}
