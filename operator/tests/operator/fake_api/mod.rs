//! An in-process fake of the Kubernetes API server for the controller tests: it keeps objects (JSON, by collection
//! path and name), serves get, list (label and field selectors of the `a=b` form), watch (an open stream that sends
//! nothing), create (409 when the name is taken), replace (`PUT`: 404 when missing, 409 Conflict when the body's
//! `resourceVersion` is not the stored one, as a real API server does; used for leases), delete (404 when missing)
//! and patch (a status apply replaces the status; other patches merge), and records every call as `METHOD /path`.
//! Every write gives the object a new `resourceVersion`. Errors can be injected per call, or for every call until
//! healed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};

/// Timestamp the fake gives every object it creates.
pub const CREATED_AT: &str = "2027-01-15T08:00:00Z";

#[derive(Default)]
pub struct State {
    /// collection path (`/api/v1/namespaces/blockmesh/pods`) -> name -> object
    pub objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// every call, `METHOD /path`
    pub calls: Vec<String>,
    /// request bodies of the calls that had one, in order: (call, body)
    pub bodies: Vec<(String, Value)>,
    /// (METHOD, path prefix) -> HTTP code answered instead, once
    pub inject: Vec<(Method, String, u16)>,
    /// (METHOD, path prefix) -> HTTP code answered instead, every time until [`FakeApi::heal`]
    pub failing: Vec<(Method, String, u16)>,
    next_uid: u64,
    /// the last resourceVersion given out (one counter for every object, as etcd's revision)
    revision: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
}

pub const NS: &str = "blockmesh";
pub const PODS: &str = "/api/v1/namespaces/blockmesh/pods";
pub const PVCS: &str = "/api/v1/namespaces/blockmesh/persistentvolumeclaims";
pub const NODES: &str = "/api/v1/nodes";
pub const CONFIGMAPS: &str = "/api/v1/namespaces/blockmesh/configmaps";
pub const CLUSTERS: &str = "/apis/blockmesh.io/v1alpha1/namespaces/blockmesh/blockmeshclusters";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/blockmesh/events";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/blockmesh/leases";

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code })
}

fn full(code: u16, v: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn matches_selector(obj: &Value, selector: &str, field: bool) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|req| {
        let (k, v) = req.split_once('=').unwrap();
        if field {
            k == "metadata.name" && obj.pointer("/metadata/name").and_then(Value::as_str) == Some(v)
        } else {
            obj.pointer("/metadata/labels").and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v)
        }
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap();
            out.push(h);
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Splits a path into (collection path, name, subresource).
fn split(path: &str) -> (String, Option<String>, Option<String>) {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix_len = if segs.first() == Some(&"api") { 2 } else { 3 };
    let rest = &segs[prefix_len..];
    let coll_len = if rest.first() == Some(&"namespaces") && rest.len() >= 3 { 3 } else { 1 };
    let coll = format!("/{}", segs[..prefix_len + coll_len].join("/"));
    let name = rest.get(coll_len).map(|s| s.to_string());
    let sub = rest.get(coll_len + 1).map(|s| s.to_string());
    (coll, name, sub)
}

fn kind_of_list(coll: &str) -> &'static str {
    if coll.ends_with("/pods") {
        "PodList"
    } else if coll.ends_with("/persistentvolumeclaims") {
        "PersistentVolumeClaimList"
    } else if coll.ends_with("/nodes") {
        "NodeList"
    } else if coll.ends_with("/configmaps") {
        "ConfigMapList"
    } else if coll.ends_with("/leases") {
        "LeaseList"
    } else {
        "List"
    }
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl State {
    /// The next resourceVersion.
    fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        kube::Client::new(svc, NS)
    }

    /// Puts an object in (as if someone else made it).
    pub fn put(&self, coll: &str, obj: Value) {
        let mut st = self.state.lock().unwrap();
        let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap().to_string();
        st.objects.entry(coll.to_string()).or_default().insert(name, obj);
    }

    pub fn remove(&self, coll: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.objects.entry(coll.to_string()).or_default().remove(name);
    }

    pub fn get(&self, coll: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(coll).and_then(|c| c.get(name)).cloned()
    }

    pub fn names(&self, coll: &str) -> Vec<String> {
        self.state.lock().unwrap().objects.get(coll).map(|c| c.keys().cloned().collect()).unwrap_or_default()
    }

    /// Sets a stored object's field (a pod's status, say), giving it a new resourceVersion.
    pub fn patch(&self, coll: &str, name: &str, patch: Value) {
        let mut st = self.state.lock().unwrap();
        let rv = st.next_revision();
        if let Some(o) = st.objects.get_mut(coll).and_then(|c| c.get_mut(name)) {
            merge(o, &patch);
            merge(o, &json!({ "metadata": { "resourceVersion": rv } }));
        }
    }

    /// The calls made since the last take.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().calls)
    }

    pub fn take_bodies(&self) -> Vec<(String, Value)> {
        std::mem::take(&mut self.state.lock().unwrap().bodies)
    }

    pub fn inject(&self, method: Method, path_prefix: &str, code: u16) {
        self.state.lock().unwrap().inject.push((method, path_prefix.to_string(), code));
    }

    /// Answers `code` to every `method` call under `path_prefix` until [`FakeApi::heal`].
    pub fn fail(&self, method: Method, path_prefix: &str, code: u16) {
        self.state.lock().unwrap().failing.push((method, path_prefix.to_string(), code));
    }

    /// Ends every [`FakeApi::fail`].
    pub fn heal(&self) {
        self.state.lock().unwrap().failing.clear();
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<BoxBody<Bytes, Infallible>> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let body: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or("").to_string();
        let method = parts.method.clone();
        let watch = query_param(&query, "watch").as_deref() == Some("true");
        let call = format!("{}{} {path}", method, if watch { " (watch)" } else { "" });
        let mut st = self.state.lock().unwrap();
        st.calls.push(call.clone());
        if !body.is_null() {
            st.bodies.push((call.clone(), body.clone()));
        }
        if let Some(i) = st.inject.iter().position(|(m, p, _)| *m == method && path.starts_with(p.as_str())) {
            let (_, _, code) = st.inject.remove(i);
            return full(code, &status(code, "Injected", "injected by the test"));
        }
        if let Some((_, _, code)) = st.failing.iter().find(|(m, p, _)| *m == method && path.starts_with(p.as_str())) {
            let code = *code;
            return full(code, &status(code, "Injected", "failing until healed by the test"));
        }
        let (coll, name, sub) = split(&path);
        if watch {
            drop(st);
            let never = futures::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(never).boxed())
                .unwrap();
        }
        match (method.clone(), name) {
            (Method::GET, None) => {
                let labels = query_param(&query, "labelSelector").unwrap_or_default();
                let fields = query_param(&query, "fieldSelector").unwrap_or_default();
                let items: Vec<Value> = st
                    .objects
                    .get(&coll)
                    .map(|c| {
                        c.values()
                            .filter(|o| matches_selector(o, &labels, false) && matches_selector(o, &fields, true))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                full(
                    200,
                    &json!({ "apiVersion": "v1", "kind": kind_of_list(&coll), "metadata": { "resourceVersion": "1" }, "items": items }),
                )
            }
            (Method::GET, Some(n)) => match st.objects.get(&coll).and_then(|c| c.get(&n)) {
                Some(o) => full(200, o),
                None => full(404, &status(404, "NotFound", &format!("{n} not found"))),
            },
            (Method::POST, None) => {
                let mut obj = body;
                let n = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
                if st.objects.get(&coll).is_some_and(|c| c.contains_key(&n)) {
                    return full(409, &status(409, "AlreadyExists", &format!("{n} already exists")));
                }
                st.next_uid += 1;
                let uid = format!("uid-{}", st.next_uid);
                let rv = st.next_revision();
                merge(
                    &mut obj,
                    &json!({ "metadata": { "uid": uid, "resourceVersion": rv, "creationTimestamp": CREATED_AT } }),
                );
                if let Some(ns) = coll.split('/').skip_while(|s| *s != "namespaces").nth(1) {
                    merge(&mut obj, &json!({ "metadata": { "namespace": ns } }));
                }
                st.objects.entry(coll).or_default().insert(n, obj.clone());
                full(201, &obj)
            }
            (Method::PUT, Some(n)) => {
                let rv = st.next_revision();
                let Some(stored) = st.objects.get_mut(&coll).and_then(|c| c.get_mut(&n)) else {
                    return full(404, &status(404, "NotFound", &format!("{n} not found")));
                };
                let sent = body.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                let current = stored.pointer("/metadata/resourceVersion").and_then(Value::as_str);
                if sent.is_some_and(|s| Some(s) != current) {
                    let message = format!(
                        "Operation cannot be fulfilled on {n}: the object has been modified; please apply your changes \
                         to the latest version and try again"
                    );
                    return full(409, &status(409, "Conflict", &message));
                }
                let mut obj = body;
                let keep = json!({ "metadata": { "uid": stored.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                                   "creationTimestamp": CREATED_AT, "resourceVersion": rv } });
                merge(&mut obj, &keep);
                *stored = obj.clone();
                full(200, &obj)
            }
            (Method::DELETE, Some(n)) => match st.objects.get_mut(&coll).and_then(|c| c.remove(&n)) {
                Some(o) => full(200, &o),
                None => full(404, &status(404, "NotFound", &format!("{n} not found"))),
            },
            (Method::PATCH, Some(n)) => match st.objects.get_mut(&coll).and_then(|c| c.get_mut(&n)) {
                Some(o) => {
                    if sub.as_deref() == Some("status") {
                        o["status"] = body.get("status").cloned().unwrap_or(Value::Null);
                    } else {
                        merge(o, &body);
                    }
                    full(200, o)
                }
                None => full(404, &status(404, "NotFound", &format!("{n} not found"))),
            },
            _ => full(405, &status(405, "MethodNotAllowed", "not supported by the fake")),
        }
    }
}

/// A node object.
pub fn node(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "kubernetes.io/hostname": name } },
            "status": { "conditions": [ { "type": "Ready", "status": "True" } ] } })
}

/// The `blockmesh` ConfigMap.
pub fn config_map(data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "blockmesh", "namespace": NS }, "data": data })
}
