//! Dot properties: opaque key/value pairs kept with a dot (the daemon stores quality-of-service limits there). Set,
//! replace, remove; durable through the log (replay after a crash) and through checkpoints; bounded; gone with the
//! dot; not copied by clones. Ends with reopen + integrity check.
#![allow(clippy::unwrap_used)]

mod common;

use blockmesh_engine::{
    CommitRequest, Error, Pool, DEFAULT_SUBDOT, MAX_DOT_PROPERTIES, MAX_PROPERTY_KEY_BYTES, MAX_PROPERTY_VALUE_BYTES,
};
use common::{sim_pool, small_opts};

fn props(pool: &Pool, dot: &str) -> Vec<(String, String)> {
    pool.dot(dot).unwrap().properties.into_iter().collect()
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

#[test]
fn properties_are_set_replaced_and_removed() {
    let (dev, pool) = sim_pool(16 << 20, 1);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    assert!(props(&pool, "admin/db").is_empty());
    pool.set_dot_property("admin/db", "qos.__default__", Some("read_iops=10")).unwrap();
    pool.set_dot_property("admin/db", "owner", Some("team-a")).unwrap();
    pool.set_dot_property("admin/db", "qos.__default__", Some("read_iops=20")).unwrap();
    assert_eq!(props(&pool, "admin/db"), vec![pair("owner", "team-a"), pair("qos.__default__", "read_iops=20")]);
    pool.set_dot_property("admin/db", "owner", None).unwrap();
    pool.set_dot_property("admin/db", "never-set", None).unwrap();
    assert_eq!(props(&pool, "admin/db"), vec![pair("qos.__default__", "read_iops=20")]);
    assert!(matches!(pool.set_dot_property("admin/nope", "k", Some("v")), Err(Error::NoSuchDot(_))));
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(1)).unwrap();
    assert_eq!(props(&pool, "admin/db"), vec![pair("qos.__default__", "read_iops=20")]);
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn a_flushed_property_survives_a_crash_and_an_unflushed_one_may_not() {
    let (dev, pool) = sim_pool(16 << 20, 2);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    pool.set_dot_property("admin/db", "qos.__default__", Some("write_iops=5")).unwrap();
    pool.flush().unwrap();
    pool.set_dot_property("admin/db", "later", Some("x")).unwrap();
    let crashed = dev.crash_losing_all_unsynced();
    drop(pool);
    let pool = Pool::open(crashed, small_opts(2)).unwrap();
    let p = props(&pool, "admin/db");
    assert_eq!(p[p.len() - 1], pair("qos.__default__", "write_iops=5"), "replayed from the log: {p:?}");
    assert!(p.len() <= 2);
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn properties_come_back_from_a_checkpoint_and_from_replay_after_it() {
    let (dev, pool) = sim_pool(16 << 20, 3);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    pool.set_dot_property("admin/db", "a", Some("1")).unwrap();
    pool.checkpoint().unwrap();
    pool.set_dot_property("admin/db", "b", Some("2")).unwrap();
    pool.set_dot_property("admin/db", "a", None).unwrap();
    pool.flush().unwrap();
    let crashed = dev.crash_losing_all_unsynced();
    drop(pool);
    let pool = Pool::open(crashed.clone(), small_opts(3)).unwrap();
    assert_eq!(props(&pool, "admin/db"), vec![pair("b", "2")]);
    pool.close().unwrap();
    let pool = Pool::open(crashed, small_opts(3)).unwrap();
    assert_eq!(props(&pool, "admin/db"), vec![pair("b", "2")]);
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn properties_are_bounded() {
    let (dev, pool) = sim_pool(16 << 20, 4);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    let long_key = "k".repeat(MAX_PROPERTY_KEY_BYTES + 1);
    assert!(matches!(pool.set_dot_property("admin/db", &long_key, Some("v")), Err(Error::InvalidArgument(_))));
    assert!(matches!(pool.set_dot_property("admin/db", "", Some("v")), Err(Error::InvalidArgument(_))));
    assert!(matches!(pool.set_dot_property("admin/db", "a\nb", Some("v")), Err(Error::InvalidArgument(_))));
    let long_value = "v".repeat(MAX_PROPERTY_VALUE_BYTES + 1);
    assert!(matches!(pool.set_dot_property("admin/db", "k", Some(&long_value)), Err(Error::InvalidArgument(_))));
    let key = "k".repeat(MAX_PROPERTY_KEY_BYTES);
    let value = "v".repeat(MAX_PROPERTY_VALUE_BYTES);
    pool.set_dot_property("admin/db", &key, Some(&value)).unwrap();
    for i in 1..MAX_DOT_PROPERTIES {
        pool.set_dot_property("admin/db", &format!("p{i}"), Some(&value)).unwrap();
    }
    assert!(matches!(pool.set_dot_property("admin/db", "one-more", Some("v")), Err(Error::Limit(_))));
    // replacing one at the limit is fine
    pool.set_dot_property("admin/db", "p1", Some("short")).unwrap();
    // a checkpoint holds the largest set
    pool.checkpoint().unwrap();
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(4)).unwrap();
    let p = pool.dot("admin/db").unwrap().properties;
    assert_eq!(p.len(), MAX_DOT_PROPERTIES);
    assert_eq!(p[&key], value);
    assert_eq!(p["p1"], "short");
    assert!(pool.check().unwrap().is_ok());
}

#[test]
fn properties_go_with_their_dot_and_are_not_cloned() {
    let (dev, pool) = sim_pool(16 << 20, 5);
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    pool.set_dot_property("admin/db", "qos.__default__", Some("read_iops=1")).unwrap();
    let c = pool.commit("admin/db", CommitRequest { message: "m".into(), ..Default::default() }).unwrap();
    pool.clone_dot("admin/db", c, "admin/copy").unwrap();
    assert!(props(&pool, "admin/copy").is_empty(), "a clone starts without the source's properties");
    pool.delete_dot("admin/db").unwrap();
    pool.create_dot("admin/db", &[(DEFAULT_SUBDOT, 1 << 20)]).unwrap();
    assert!(props(&pool, "admin/db").is_empty(), "a new dot of the same name starts without properties");
    pool.close().unwrap();
    let pool = Pool::open(dev, small_opts(5)).unwrap();
    assert!(props(&pool, "admin/db").is_empty());
    assert!(pool.check().unwrap().is_ok());
}
