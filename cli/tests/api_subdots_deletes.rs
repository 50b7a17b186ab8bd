//! The API routes the CSI driver needs: add a subdot to a dot, delete a commit, delete a branch; their refusals
//! (404 unknown, 409 a head or a parent, 400 bad ids, 401 without the key), and that what they did survives a
//! `kill -9` restart (they flush before answering).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use blockmesh::api::{Commit, Dot};
use common::Daemon;
use serde_json::json;

struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Client {
    fn new(d: &Daemon) -> Client {
        Client {
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build(),
            base: d.api.clone(),
            auth: format!("Bearer {}", d.key()),
        }
    }

    /// (status, body) of a request.
    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, String) {
        let req = self.agent.request(method, &format!("{}{path}", self.base)).set("Authorization", &self.auth);
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    fn ok<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> T {
        let (code, text) = self.call(method, path, body);
        assert_eq!(code, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }
}

#[test]
fn subdots_commits_and_branches_can_be_added_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = Client::new(&d);
    let _: Dot = c.ok("POST", "/v1/dots", Some(json!({"name": "admin/app", "size_bytes": 1 << 20})));

    // a subdot joins the dot; the same name again is 409, a bad name 400, an unknown dot 404
    let dot: Dot = c.ok("POST", "/v1/dots/admin/app/subdots", Some(json!({"name": "logs", "size_bytes": 2 << 20})));
    let names: Vec<(&str, u64)> = dot.subdots.iter().map(|s| (s.name.as_str(), s.size_bytes)).collect();
    assert_eq!(names, [("__default__", 1 << 20), ("logs", 2 << 20)]);
    let sub = |name: &str| Some(json!({"name": name, "size_bytes": 1 << 20}));
    assert_eq!(c.call("POST", "/v1/dots/admin/app/subdots", sub("logs")).0, 409);
    assert_eq!(c.call("POST", "/v1/dots/admin/app/subdots", sub("a/b")).0, 400);
    assert_eq!(c.call("POST", "/v1/dots/admin/nope/subdots", sub("x")).0, 404);

    // commits c1 <- c2 on master: c1 is a parent, c2 the head; neither can go
    let c1: Commit = c.ok("POST", "/v1/dots/admin/app/commits", Some(json!({"message": "one"})));
    let c2: Commit = c.ok("POST", "/v1/dots/admin/app/commits", Some(json!({"message": "two"})));
    assert_eq!(c1.subdots.len(), 2, "a commit covers every subdot");
    let (code, msg) = c.call("DELETE", &format!("/v1/dots/admin/app/commits/{}", c1.id), None);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("parent"), "{msg}");
    let (code, msg) = c.call("DELETE", &format!("/v1/dots/admin/app/commits/{}", c2.id), None);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("head of branch master"), "{msg}");
    assert_eq!(c.call("DELETE", "/v1/dots/admin/app/commits/master", None).0, 400, "names only by full id");
    assert_eq!(c.call("DELETE", &format!("/v1/dots/admin/app/commits/{}", "0".repeat(32)), None).0, 404);

    // a branch from c1, then a commit on it: deleting the branch frees that commit, which can then go
    let _: Dot = c.ok("POST", "/v1/dots/admin/app/branches", Some(json!({"name": "side", "from": c1.id})));
    let _: Dot = c.ok("POST", "/v1/dots/admin/app/checkout", Some(json!({"branch": "side"})));
    let c3: Commit = c.ok("POST", "/v1/dots/admin/app/commits", Some(json!({"message": "three"})));
    let _: Dot = c.ok("POST", "/v1/dots/admin/app/checkout", Some(json!({"branch": "master"})));
    assert_eq!(c.call("DELETE", &format!("/v1/dots/admin/app/commits/{}", c3.id), None).0, 409);
    assert_eq!(c.call("DELETE", "/v1/dots/admin/app/branches/master", None).0, 400, "the current branch stays");
    assert_eq!(c.call("DELETE", "/v1/dots/admin/app/branches/nope", None).0, 404);
    let _: serde_json::Value = c.ok("DELETE", "/v1/dots/admin/app/branches/side", None);
    let _: serde_json::Value = c.ok("DELETE", &format!("/v1/dots/admin/app/commits/{}", c3.id), None);
    assert_eq!(c.call("DELETE", &format!("/v1/dots/admin/app/commits/{}", c3.id), None).0, 404);

    // without the key: 401, nothing changes
    let anon = ureq::AgentBuilder::new().build();
    let r =
        anon.post(&format!("{}/v1/dots/admin/app/subdots", d.api)).send_json(json!({"name": "x", "size_bytes": 512}));
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));

    // all of it is durable: kill -9, restart, same dot
    let api_before: Dot = c.ok("GET", "/v1/dots/admin/app", None);
    d.kill9();
    let d = Daemon::start(dir.path());
    let c = Client::new(&d);
    let after: Dot = c.ok("GET", "/v1/dots/admin/app", None);
    assert_eq!(after.subdots, api_before.subdots);
    assert_eq!(after.branches.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["master"]);
    let all: Vec<Commit> = c.ok("GET", "/v1/dots/admin/app/commits?all=true", None);
    assert_eq!(all.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(), [c1.id.as_str(), c2.id.as_str()]);
}

#[test]
fn a_subdot_is_removed_unless_a_client_uses_it_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = Client::new(&d);
    let _: Dot = c.ok(
        "POST",
        "/v1/dots",
        Some(json!({"name": "admin/app", "size_bytes": 1 << 20, "subdots": ["data", "logs"]})),
    );
    let _: serde_json::Value =
        c.ok("PUT", "/v1/dots/admin/app/qos", Some(json!({"subdot": "logs", "limits": {"iops": 100}})));
    // an NBD client on the logs head: 409 naming it; a client of another subdot does not count
    let mut held = if common::have("nbdsh") {
        let spawn = |export: &str| {
            // Debian's python3 (with the libnbd module) first on the PATH, not another python
            let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
            std::process::Command::new("nbdsh")
                .env("PATH", path)
                .args(["-u", &format!("nbd://{}/{export}", d.nbd), "-c", "import time; time.sleep(30)"])
                .spawn()
                .unwrap()
        };
        let (logs, data) = (spawn("admin/app.logs"), spawn("admin/app.data"));
        let connected = || {
            let (_, text) = c.call("GET", "/metrics", None);
            common::sample(&text, "blockmesh_nbd_connections")
        };
        let start = std::time::Instant::now();
        while connected() < 2.0 {
            assert!(start.elapsed() < Duration::from_secs(30), "the NBD clients did not connect");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, text) = c.call("DELETE", "/v1/dots/admin/app/subdots/logs", None);
        assert_eq!(code, 409, "{text}");
        assert!(text.contains("1 connected NBD client"), "{text}");
        vec![logs, data]
    } else {
        Vec::new()
    };
    // forced: the connection is closed and the subdot goes
    let dot: Dot = c.ok("DELETE", "/v1/dots/admin/app/subdots/logs?force=true", None);
    assert_eq!(dot.subdots.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["data"]);
    assert!(dot.qos.is_empty(), "its limits went with it: {:?}", dot.qos);
    for child in &mut held {
        let _ = child.kill();
        let _ = child.wait();
    }
    // refusals: unknown subdot 404, the last one 400, unknown dot 404
    assert_eq!(c.call("DELETE", "/v1/dots/admin/app/subdots/logs", None).0, 404);
    assert_eq!(c.call("DELETE", "/v1/dots/admin/app/subdots/data", None).0, 400);
    assert_eq!(c.call("DELETE", "/v1/dots/admin/nope/subdots/data", None).0, 404);
    // it survives a kill -9 (flushed before the answer) and can be added again
    d.kill9();
    let d = Daemon::start(dir.path());
    let c = Client::new(&d);
    let dot: Dot = c.ok("GET", "/v1/dots/admin/app", None);
    assert_eq!(dot.subdots.len(), 1);
    let dot: Dot = c.ok("POST", "/v1/dots/admin/app/subdots", Some(json!({"name": "logs", "size_bytes": 1 << 20})));
    assert_eq!(dot.subdots.len(), 2);
}
