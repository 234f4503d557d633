//! The back-office HTTP API through real HTTP, against a real PostgreSQL (a fresh
//! database per test) and, where the answer comes from it, a real data plane: every
//! route with good input; bad input refused with the JSON error body and nothing
//! written; the bearer tokens; an adjustment retried ten times applied once; "set on
//! hand" reaching the books and the shard; and the OpenAPI document listing exactly
//! what is served.

mod common;

use std::time::Duration;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use stockplane_control_plane::api::ROUTES;
use stockplane_control_plane::App;
use stockplane_wire::{CartLine, HoldId, Status};

const WAIT: Duration = Duration::from_secs(30);

/// A control plane served over HTTP, and a client for it.
struct Api {
    app: App,
    base: String,
    http: reqwest::Client,
    /// Holds the UDP port the configuration names as the data plane, so nothing else
    /// answers there (for tests without a data plane).
    _closed_port: Option<std::net::UdpSocket>,
}

/// An answer: its status, its headers and its body as JSON (`Null` if it had none).
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Api {
    /// A control plane whose data plane never answers (its address is a UDP port we hold
    /// and its certificates do not exist), without the background sync.
    async fn without_dataplane() -> Api {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("hold a UDP port");
        let mut config = control_config(&fresh_database().await, None);
        config.dataplane.addr = closed.local_addr().expect("the held port");
        let dir = temp_dir("no-dp");
        config.dataplane.ca = dir.join("missing-ca.pem");
        config.dataplane.cert = dir.join("missing.pem");
        config.dataplane.key = dir.join("missing.key");
        let app = control_plane(config, false).await;
        Api::serve(app, Some(closed)).await
    }

    /// Like [`Api::without_dataplane`], but with the shard count recorded as if a
    /// one-shard data plane had been reached once, so adjustments can be recorded.
    async fn with_known_shards() -> Api {
        let api = Api::without_dataplane().await;
        api.app.db.shards_learn(1).await.expect("record the shard count");
        api
    }

    /// A control plane linked to `dataplane`, with the background sync running, once the
    /// link is up.
    async fn with_dataplane(dataplane: &TestDataplane) -> Api {
        let app = control_plane(control_config(&fresh_database().await, Some(dataplane)), true).await;
        app.link.wait().await;
        Api::serve(app, None).await
    }

    async fn serve(app: App, closed_port: Option<std::net::UdpSocket>) -> Api {
        let base = serve_http(&app).await;
        Api { app, base, http: reqwest::Client::new(), _closed_port: closed_port }
    }

    /// Sends raw bytes with a content type (or none) and a bearer token (or none).
    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request.send().await.expect("the API answers");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("read the body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("the body is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
        };
        Answer { status, headers, body }
    }

    /// Sends JSON (or nothing) with a token.
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("JSON"));
        let content_type = bytes.as_ref().map(|_| "application/json");
        self.raw(method, path, token, content_type, bytes).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, Some(ADMIN_TOKEN), None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(ADMIN_TOKEN), Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PUT, path, Some(ADMIN_TOKEN), Some(body)).await
    }

    async fn patch(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PATCH, path, Some(ADMIN_TOKEN), Some(body)).await
    }

    /// Sends a body that is not JSON at all, as JSON.
    async fn send_text(&self, method: Method, path: &str, text: &str) -> Answer {
        self.raw(method, path, Some(ADMIN_TOKEN), Some("application/json"), Some(text.as_bytes().to_vec())).await
    }

    /// A fingerprint of every table the API writes: equal before and after means the
    /// requests in between changed nothing.
    async fn fingerprint(&self) -> Vec<String> {
        let mut prints = Vec::new();
        for table in ["locations", "skus", "stock_levels", "adjustments", "sales"] {
            let print: String = sqlx::query_scalar(&format!(
                "SELECT count(*)::text || ':' || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
            ))
            .fetch_one(self.app.db.pool())
            .await
            .expect("fingerprint a table");
            prints.push(format!("{table}={print}"));
        }
        prints
    }

    /// Creates location `id` and SKU `sku` through the API.
    async fn seed(&self, sku: u64, location: u32) {
        let made = self.post("/v1/locations", json!({"id": location, "name": format!("location {location}")})).await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
        let made = self.post("/v1/skus", json!({"sku": sku, "name": format!("sku {sku}")})).await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    }
}

/// Asserts an error answer: its status, and the JSON body with its code and a message.
#[track_caller]
fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "body: {}", answer.body);
    assert_eq!(answer.body["error"], code, "body: {}", answer.body);
    let message = answer.body["message"].as_str().expect("a message");
    assert!(!message.is_empty(), "an empty message");
    assert_eq!(answer.body.as_object().map(|o| o.len()), Some(2), "only error and message: {}", answer.body);
}

/// The data plane's on-hand figures of a SKU, by location, through the API.
async fn availability(api: &Api, sku: u64) -> Option<Vec<(u64, i64)>> {
    let answer = api.get(&format!("/v1/skus/{sku}/availability")).await;
    if answer.status != StatusCode::OK {
        return None;
    }
    let levels = answer.body.as_array()?;
    Some(levels.iter().map(|l| (l["location"].as_u64().unwrap(), l["on_hand"].as_i64().unwrap())).collect())
}

// ---------------------------------------------------------------- catalog

#[tokio::test]
async fn locations_are_created_listed_read_and_renamed() {
    let api = Api::without_dataplane().await;
    let north = api.post("/v1/locations", json!({"id": 7, "name": "north"})).await;
    let made = &north;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["id"], 7);
    assert_eq!(made.body["name"], "north");
    assert!(made.body["created_at"].is_string() && made.body["updated_at"].is_string());
    assert_eq!(made.headers[reqwest::header::LOCATION], "/v1/locations/7");
    // The largest id the data plane can know (u32::MAX is its "any location").
    let made = api.post("/v1/locations", json!({"id": u32::MAX - 1, "name": "edge"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let made = api.post("/v1/locations", json!({"id": 0, "name": "zero"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);

    let read = api.get("/v1/locations/7").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["name"], "north");

    let page = api.get("/v1/locations").await;
    assert_eq!(page.status, StatusCode::OK);
    let ids: Vec<u64> = page.body["items"].as_array().unwrap().iter().map(|l| l["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![0, 7, u64::from(u32::MAX - 1)]);
    assert_eq!(page.body["next_after"], Value::Null);

    // Pages: a full page names the next one's `after`.
    let first = api.get("/v1/locations?limit=2").await;
    assert_eq!(first.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(first.body["next_after"], 7);
    let second = api.get("/v1/locations?after=7&limit=2").await;
    assert_eq!(second.body["items"][0]["id"], u64::from(u32::MAX - 1));
    assert_eq!(second.body["next_after"], Value::Null);
    let beyond = api.get(&format!("/v1/locations?after={}", u64::from(u32::MAX) + 5)).await;
    assert_eq!(beyond.status, StatusCode::OK);
    assert_eq!(beyond.body["items"], json!([]));

    let renamed = api.patch("/v1/locations/7", json!({"name": "north-east"})).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!(renamed.body["name"], "north-east");
    assert_eq!(renamed.body["created_at"], north.body["created_at"]);
    assert_eq!(api.get("/v1/locations/7").await.body["name"], "north-east");
}

#[tokio::test]
async fn bad_location_requests_are_refused_and_change_nothing() {
    let api = Api::without_dataplane().await;
    api.post("/v1/locations", json!({"id": 1, "name": "north"})).await;
    let before = api.fingerprint().await;

    let long = "x".repeat(201);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"id": 2, "name": "south", "extra": 1}), "an unknown field"),
        (json!({"id": "two", "name": "south"}), "a wrong type"),
        (json!({"id": 2}), "a missing field"),
        (json!({"name": "south"}), "a missing id"),
        (json!({"id": -1, "name": "south"}), "a negative id"),
        (json!({"id": u64::from(u32::MAX) + 1, "name": "south"}), "an id above u32"),
        (json!({"id": u32::MAX, "name": "south"}), "the id the data plane keeps for any location"),
        (json!({"id": 2, "name": ""}), "an empty name"),
        (json!({"id": 2, "name": long}), "a name too long"),
        (json!({"id": 2, "name": "so\u{0}uth"}), "a NUL in the name"),
        (json!({"id": 2, "name": null}), "a null name"),
        (json!([2, "south"]), "an array"),
    ];
    for (body, what) in cases {
        let answer = api.post("/v1/locations", body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {}", answer.body);
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_error(
        &api.send_text(Method::POST, "/v1/locations", r#"{"id": 2, "name": "#).await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(&api.send_text(Method::POST, "/v1/locations", "").await, StatusCode::BAD_REQUEST, "malformed_json");
    let no_type =
        api.raw(Method::POST, "/v1/locations", Some(ADMIN_TOKEN), None, Some(br#"{"id":2,"name":"s"}"#.to_vec())).await;
    assert_error(&no_type, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let huge = format!(r#"{{"id": 2, "name": "{}"}}"#, "x".repeat(100 * 1024));
    assert_error(
        &api.send_text(Method::POST, "/v1/locations", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    let dup = api.post("/v1/locations", json!({"id": 1, "name": "again"})).await;
    assert_error(&dup, StatusCode::CONFLICT, "already_exists");

    assert_error(&api.get("/v1/locations/north").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/locations/-1").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/locations/4294967296").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/locations/99").await, StatusCode::NOT_FOUND, "not_found");
    for query in ["limit=0", "limit=1001", "limit=ten", "after=-1", "after=", "colour=red"] {
        assert_error(&api.get(&format!("/v1/locations?{query}")).await, StatusCode::BAD_REQUEST, "invalid_request");
    }

    assert_error(&api.patch("/v1/locations/99", json!({"name": "x"})).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.patch("/v1/locations/1", json!({"name": ""})).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.patch("/v1/locations/1", json!({})).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(
        &api.patch("/v1/locations/1", json!({"name": "x", "id": 3})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &api.send_text(Method::PATCH, "/v1/locations/1", "{name}").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(&api.patch("/v1/locations/x", json!({"name": "x"})).await, StatusCode::BAD_REQUEST, "invalid_request");

    assert_eq!(api.fingerprint().await, before, "bad requests changed nothing");
    assert_eq!(api.get("/v1/locations/1").await.body["name"], "north");
}

#[tokio::test]
async fn skus_are_created_listed_read_and_changed() {
    let api = Api::without_dataplane().await;
    let made = api.post("/v1/skus", json!({"sku": 42, "name": "kettle"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["sku"], 42);
    assert_eq!(made.body["name"], "kettle");
    assert_eq!(made.body["backorder_limit"], 0, "the default");
    assert_eq!(made.body["version"], 1);
    assert_eq!(made.headers[reqwest::header::LOCATION], "/v1/skus/42");
    let made = api.post("/v1/skus", json!({"sku": 7, "name": "toaster", "backorder_limit": 3})).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    assert_eq!(made.body["backorder_limit"], 3);
    let made = api.post("/v1/skus", json!({"sku": i64::MAX as u64, "name": "the last"})).await;
    assert_eq!(made.status, StatusCode::CREATED, "the largest SKU the books hold: {}", made.body);

    let read = api.get("/v1/skus/42").await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body["name"], "kettle");

    let page = api.get("/v1/skus?limit=2").await;
    let skus: Vec<u64> = page.body["items"].as_array().unwrap().iter().map(|s| s["sku"].as_u64().unwrap()).collect();
    assert_eq!(skus, vec![7, 42]);
    assert_eq!(page.body["next_after"], 42);
    let rest = api.get("/v1/skus?after=42&limit=2").await;
    assert_eq!(rest.body["items"][0]["sku"], i64::MAX as u64);
    assert_eq!(rest.body["next_after"], Value::Null);
    let beyond = api.get(&format!("/v1/skus?after={}", u64::MAX)).await;
    assert_eq!(beyond.status, StatusCode::OK);
    assert_eq!(beyond.body["items"], json!([]));

    let renamed = api.patch("/v1/skus/42", json!({"name": "kettle 2"})).await;
    assert_eq!(renamed.status, StatusCode::OK, "{}", renamed.body);
    assert_eq!((renamed.body["name"].clone(), renamed.body["version"].clone()), (json!("kettle 2"), json!(2)));
    let limited = api.patch("/v1/skus/42", json!({"backorder_limit": 10})).await;
    assert_eq!(limited.status, StatusCode::OK, "{}", limited.body);
    assert_eq!(limited.body["backorder_limit"], 10);
    assert_eq!(limited.body["name"], "kettle 2", "a field left out is kept");
    assert_eq!(limited.body["version"], 3);
    let both = api.patch("/v1/skus/42", json!({"name": "kettle 3", "backorder_limit": 0})).await;
    assert_eq!((both.body["backorder_limit"].clone(), both.body["version"].clone()), (json!(0), json!(4)));
}

#[tokio::test]
async fn bad_sku_requests_are_refused_and_change_nothing() {
    let api = Api::without_dataplane().await;
    api.post("/v1/skus", json!({"sku": 1, "name": "kettle"})).await;
    let before = api.fingerprint().await;

    let too_big = i64::MAX as u64 + 1;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"sku": too_big, "name": "x"}), "a SKU above i64::MAX"),
        (json!({"sku": u64::MAX, "name": "x"}), "u64::MAX"),
        (json!({"sku": -5, "name": "x"}), "a negative SKU"),
        (json!({"sku": 1.5, "name": "x"}), "a fraction"),
        (json!({"sku": "2", "name": "x"}), "a string"),
        (json!({"sku": 2}), "no name"),
        (json!({"name": "x"}), "no SKU"),
        (json!({"sku": 2, "name": ""}), "an empty name"),
        (json!({"sku": 2, "name": "y".repeat(201)}), "a long name"),
        (json!({"sku": 2, "name": "x", "backorder_limit": -1}), "a negative limit"),
        (json!({"sku": 2, "name": "x", "backorder_limit": u64::from(u32::MAX) + 1}), "a limit above u32"),
        (json!({"sku": 2, "name": "x", "version": 9}), "an unknown field"),
    ];
    for (body, what) in cases {
        let answer = api.post("/v1/skus", body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {}", answer.body);
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_error(
        &api.send_text(Method::POST, "/v1/skus", "{'sku': 2}").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(
        &api.post("/v1/skus", json!({"sku": 1, "name": "again"})).await,
        StatusCode::CONFLICT,
        "already_exists",
    );

    assert_error(&api.get(&format!("/v1/skus/{too_big}")).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/skus/18446744073709551616").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/skus/kettle").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/skus/2").await, StatusCode::NOT_FOUND, "not_found");
    for query in ["limit=0", "limit=100000", "after=x", "sku=1"] {
        assert_error(&api.get(&format!("/v1/skus?{query}")).await, StatusCode::BAD_REQUEST, "invalid_request");
    }

    assert_error(&api.patch("/v1/skus/2", json!({"name": "x"})).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.patch("/v1/skus/1", json!({})).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.patch("/v1/skus/1", json!({"name": ""})).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.patch("/v1/skus/1", json!({"sku": 3})).await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(
        &api.patch("/v1/skus/1", json!({"backorder_limit": "lots"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    assert_error(
        &api.patch(&format!("/v1/skus/{too_big}"), json!({"name": "x"})).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );

    assert_eq!(api.fingerprint().await, before, "bad requests changed nothing");
    assert_eq!(api.get("/v1/skus/1").await.body["version"], 1);
}

// ---------------------------------------------------------------- stock (PostgreSQL only)

#[tokio::test]
async fn adjustments_and_sets_are_recorded_once_per_key() {
    let api = Api::with_known_shards().await;
    api.seed(1, 1).await;

    let ask = json!({"idempotency_key": "restock-1", "sku": 1, "location": 1, "delta": 5, "reason": "restock"});
    let made = api.post("/v1/stock/adjustments", ask.clone()).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let id = made.body["id"].as_str().expect("an id").to_string();
    assert_eq!(made.body["delta"], 5);
    assert_eq!(made.body["kind"], "adjust");
    assert_eq!(made.body["state"], "pending");
    assert_eq!(made.body["reason"], "restock");
    assert_eq!(made.body["idempotency_key"], "restock-1");
    assert!(made.headers.get("idempotent-replayed").is_none());

    let again = api.post("/v1/stock/adjustments", ask.clone()).await;
    assert_eq!(again.status, StatusCode::OK, "a retry: {}", again.body);
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(again.headers["idempotent-replayed"], "true");

    let read = api.get(&format!("/v1/stock/adjustments/{id}")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body, made.body);

    // A removal, and no reason at all.
    let removed = api
        .post("/v1/stock/adjustments", json!({"idempotency_key": "shrink-1", "sku": 1, "location": 1, "delta": -2}))
        .await;
    assert_eq!(removed.status, StatusCode::CREATED, "{}", removed.body);
    assert_eq!(removed.body["reason"], "");

    // Set on hand: the delta against the books (0) and what is pending (5 - 2).
    let set = api.put("/v1/stock/1/1", json!({"idempotency_key": "count-1", "on_hand": 50})).await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.body);
    assert_eq!(set.body["kind"], "set");
    assert_eq!(set.body["set_to"], 50);
    assert_eq!(set.body["delta"], 47);
    let set_again = api.put("/v1/stock/1/1", json!({"idempotency_key": "count-1", "on_hand": 50})).await;
    assert_eq!(set_again.status, StatusCode::OK);
    assert_eq!(set_again.body["id"], set.body["id"]);
    let same_figure = api.put("/v1/stock/1/1", json!({"idempotency_key": "count-2", "on_hand": 50})).await;
    assert_eq!(same_figure.status, StatusCode::OK, "{}", same_figure.body);
    assert_eq!(same_figure.body["outcome"], "no_change");
    let to_zero =
        api.put("/v1/stock/1/1", json!({"idempotency_key": "count-3", "on_hand": 0, "reason": "empty"})).await;
    assert_eq!(to_zero.status, StatusCode::CREATED, "{}", to_zero.body);
    assert_eq!(to_zero.body["delta"], -50);

    let list = api.get("/v1/skus/1/adjustments").await;
    assert_eq!(list.status, StatusCode::OK);
    let keys: Vec<&str> =
        list.body.as_array().unwrap().iter().map(|a| a["idempotency_key"].as_str().unwrap()).collect();
    assert_eq!(keys, vec!["count-3", "count-1", "shrink-1", "restock-1"], "newest first");
    let limited = api.get("/v1/skus/1/adjustments?limit=1").await;
    assert_eq!(limited.body.as_array().unwrap().len(), 1);

    // The books: nothing applied yet (no data plane), everything pending.
    let books = api.get("/v1/skus/1/books").await;
    assert_eq!(books.status, StatusCode::OK, "{}", books.body);
    assert_eq!(books.body, json!([{"sku": 1, "location": 1, "shard": 0, "on_hand": 0, "sold": 0, "pending_delta": 0}]));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM adjustments").fetch_one(api.app.db.pool()).await.unwrap();
    assert_eq!(count, 4, "one row per distinct request");

    // A SKU stocked nowhere has empty books.
    api.post("/v1/skus", json!({"sku": 2, "name": "empty"})).await;
    assert_eq!(api.get("/v1/skus/2/books").await.body, json!([]));
    assert_eq!(api.get("/v1/skus/2/adjustments").await.body, json!([]));
}

#[tokio::test]
async fn bad_stock_requests_are_refused_and_change_nothing() {
    let api = Api::with_known_shards().await;
    api.seed(1, 1).await;
    let first =
        api.post("/v1/stock/adjustments", json!({"idempotency_key": "k1", "sku": 1, "location": 1, "delta": 3})).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let before = api.fingerprint().await;

    let good = json!({"idempotency_key": "k2", "sku": 1, "location": 1, "delta": 3});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let cases: Vec<(Value, &str)> = vec![
        (with("delta", json!(0)), "a zero delta"),
        (with("delta", json!(1_000_000_001)), "a huge delta"),
        (with("delta", json!(-1_000_000_001)), "a huge removal"),
        (with("delta", json!(i64::MIN)), "i64::MIN"),
        (with("delta", json!(u64::MAX)), "a delta above i64"),
        (with("delta", json!("3")), "a delta as a string"),
        (with("delta", json!(2.5)), "a fractional delta"),
        (with("sku", json!(i64::MAX as u64 + 1)), "a SKU above i64::MAX"),
        (with("location", json!(-1)), "a negative location"),
        (with("idempotency_key", json!("")), "an empty key"),
        (with("idempotency_key", json!("k".repeat(201))), "a long key"),
        (with("idempotency_key", json!("k\n2")), "a control character in the key"),
        (with("idempotency_key", json!(2)), "a key as a number"),
        (with("reason", json!("r".repeat(1001))), "a long reason"),
        (with("reason", json!("a\u{0}b")), "a NUL in the reason"),
        (with("state", json!("applied")), "an unknown field"),
        (without("idempotency_key"), "no key"),
        (without("delta"), "no delta"),
        (without("sku"), "no SKU"),
        (without("location"), "no location"),
    ];
    for (body, what) in cases {
        let answer = api.post("/v1/stock/adjustments", body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {}", answer.body);
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_error(
        &api.send_text(Method::POST, "/v1/stock/adjustments", "{\"delta\": 3,,}").await,
        StatusCode::BAD_REQUEST,
        "malformed_json",
    );
    assert_error(&api.post("/v1/stock/adjustments", with("sku", json!(9))).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(
        &api.post("/v1/stock/adjustments", with("location", json!(9))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // The first key with another request: another delta, or another place.
    for other in [with("delta", json!(4)), with("location", json!(9)), with("delta", json!(-3))] {
        let mut other = other;
        other["idempotency_key"] = json!("k1");
        assert_error(&api.post("/v1/stock/adjustments", other).await, StatusCode::CONFLICT, "idempotency_key_reused");
    }

    let set = json!({"idempotency_key": "s1", "on_hand": 10});
    let set_cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/stock/1/1", json!({"idempotency_key": "s1", "on_hand": -1}), "a negative on_hand"),
        ("/v1/stock/1/1", json!({"idempotency_key": "s1", "on_hand": 1_000_000_001}), "a huge on_hand"),
        ("/v1/stock/1/1", json!({"idempotency_key": "", "on_hand": 1}), "an empty key"),
        ("/v1/stock/1/1", json!({"idempotency_key": "s1"}), "no on_hand"),
        ("/v1/stock/1/1", json!({"on_hand": 1}), "no key"),
        ("/v1/stock/1/1", json!({"idempotency_key": "s1", "on_hand": 1, "sku": 1}), "an unknown field"),
        ("/v1/stock/1/1", json!({"idempotency_key": "s1", "on_hand": "1"}), "a wrong type"),
        ("/v1/stock/x/1", set.clone(), "a SKU that is no number"),
        ("/v1/stock/1/-1", set.clone(), "a negative location"),
        ("/v1/stock/9223372036854775808/1", set.clone(), "a SKU above i64::MAX"),
    ];
    for (path, body, what) in set_cases {
        let answer = api.put(path, body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{what}: {}", answer.body);
        assert_error(&answer, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_error(&api.put("/v1/stock/9/1", set.clone()).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.put("/v1/stock/1/9", set.clone()).await, StatusCode::NOT_FOUND, "not_found");
    // A set under the key of the first adjustment.
    assert_error(
        &api.put("/v1/stock/1/1", json!({"idempotency_key": "k1", "on_hand": 3})).await,
        StatusCode::CONFLICT,
        "idempotency_key_reused",
    );

    assert_error(&api.get("/v1/stock/adjustments/not-a-uuid").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(
        &api.get("/v1/stock/adjustments/00000000-0000-0000-0000-000000000000").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(&api.get("/v1/skus/9/adjustments").await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.get("/v1/skus/1/adjustments?limit=0").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/skus/1/adjustments?after=1").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_error(&api.get("/v1/skus/9/books").await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.get("/v1/skus/x/books").await, StatusCode::BAD_REQUEST, "invalid_request");

    assert_eq!(api.fingerprint().await, before, "bad requests changed nothing");
}

#[tokio::test]
async fn before_the_data_plane_is_reached_stock_writes_and_live_reads_answer_503() {
    let api = Api::without_dataplane().await;
    api.seed(1, 1).await;
    let before = api.fingerprint().await;
    let adjust =
        api.post("/v1/stock/adjustments", json!({"idempotency_key": "k1", "sku": 1, "location": 1, "delta": 3})).await;
    assert_error(&adjust, StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable");
    let set = api.put("/v1/stock/1/1", json!({"idempotency_key": "k2", "on_hand": 3})).await;
    assert_error(&set, StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable");
    assert_error(&api.get("/v1/skus/1/availability").await, StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable");
    assert_error(
        &api.call(Method::POST, "/v1/reconcile", Some(ADMIN_TOKEN), None).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "dataplane_unavailable",
    );
    // What PostgreSQL alone answers still works.
    assert_eq!(api.get("/v1/skus/1/books").await.status, StatusCode::OK);
    // An unknown SKU is still unknown, and a bad one still bad.
    assert_error(&api.get("/v1/skus/2/availability").await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&api.get("/v1/skus/x/availability").await, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(api.fingerprint().await, before, "nothing was recorded");
}

#[tokio::test]
async fn sales_queries_are_checked() {
    let api = Api::without_dataplane().await;
    let empty = api.get("/v1/sales").await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.body);
    assert_eq!(empty.body, json!({"items": [], "next": null}));
    let filtered = api.get("/v1/sales?sku=1&hold=00000000-0000-0000-0000-000000000001&limit=5").await;
    assert_eq!(filtered.status, StatusCode::OK, "{}", filtered.body);
    let cursor = api.get("/v1/sales?after_shard=0&after_epoch=1&after_position=3").await;
    assert_eq!(cursor.status, StatusCode::OK, "{}", cursor.body);
    for query in [
        "after_shard=0",
        "after_shard=0&after_epoch=1",
        "after_position=1",
        "hold=nope",
        "sku=-1",
        "sku=9223372036854775808",
        "limit=0",
        "limit=1001",
        "after_shard=x&after_epoch=1&after_position=1",
        "colour=red",
    ] {
        assert_error(&api.get(&format!("/v1/sales?{query}")).await, StatusCode::BAD_REQUEST, "invalid_request");
    }
}

// ---------------------------------------------------------------- auth, routes, document

/// Every route with a concrete path, its method, and a body that reaches the handler.
fn route_probes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/v1/locations", None),
        (Method::POST, "/v1/locations", Some(json!({"id": 5, "name": "east"}))),
        (Method::GET, "/v1/locations/1", None),
        (Method::PATCH, "/v1/locations/1", Some(json!({"name": "renamed"}))),
        (Method::GET, "/v1/skus", None),
        (Method::POST, "/v1/skus", Some(json!({"sku": 5, "name": "new"}))),
        (Method::GET, "/v1/skus/1", None),
        (Method::PATCH, "/v1/skus/1", Some(json!({"name": "renamed"}))),
        (Method::GET, "/v1/skus/1/adjustments", None),
        (Method::GET, "/v1/skus/1/books", None),
        (Method::GET, "/v1/skus/1/availability", None),
        (
            Method::POST,
            "/v1/stock/adjustments",
            Some(json!({"idempotency_key": "auth-1", "sku": 1, "location": 1, "delta": 1})),
        ),
        (Method::GET, "/v1/stock/adjustments/00000000-0000-0000-0000-000000000000", None),
        (Method::PUT, "/v1/stock/1/1", Some(json!({"idempotency_key": "auth-2", "on_hand": 9}))),
        (Method::GET, "/v1/sales", None),
        (Method::POST, "/v1/reconcile", None),
    ]
}

#[tokio::test]
async fn every_route_needs_a_token_and_writes_need_an_admin_token() {
    let api = Api::with_known_shards().await;
    api.seed(1, 1).await;
    let before = api.fingerprint().await;
    for (method, path, body) in route_probes() {
        let what = format!("{method} {path}");
        let none = api.call(method.clone(), path, None, body.clone()).await;
        assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
        let wrong = api.call(method.clone(), path, Some("not-a-token-0123456789"), body.clone()).await;
        assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
        // A known token's prefix, or the token with a byte more, is not the token.
        let prefix = api.call(method.clone(), path, Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]), body.clone()).await;
        assert_error(&prefix, StatusCode::UNAUTHORIZED, "unauthorized");
        let longer = api.call(method.clone(), path, Some(&format!("{ADMIN_TOKEN}x")), body.clone()).await;
        assert_error(&longer, StatusCode::UNAUTHORIZED, "unauthorized");
        let read = api.call(method.clone(), path, Some(READ_TOKEN), body.clone()).await;
        if method == Method::GET {
            assert_ne!(read.status, StatusCode::UNAUTHORIZED, "{what}: {}", read.body);
            assert_ne!(read.status, StatusCode::FORBIDDEN, "{what}: {}", read.body);
        } else {
            assert_error(&read, StatusCode::FORBIDDEN, "forbidden");
        }
    }
    // Other schemes carry no bearer token; the scheme's name is case-insensitive.
    let authorized = |value: String| {
        let request = api.http.get(format!("{}/v1/skus", api.base)).header(reqwest::header::AUTHORIZATION, value);
        async move { request.send().await.expect("an answer").status() }
    };
    assert_eq!(authorized(format!("Basic {ADMIN_TOKEN}")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(authorized(format!("Token {ADMIN_TOKEN}")).await, StatusCode::UNAUTHORIZED);
    assert_eq!(authorized(ADMIN_TOKEN.to_string()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(authorized("Bearer".to_string()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(authorized("Bearer ".to_string()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(authorized(format!("bearer {ADMIN_TOKEN}")).await, StatusCode::OK);
    assert_eq!(api.fingerprint().await, before, "refused requests changed nothing");

    // Read tokens read: every GET that has something to show answers 200.
    for path in [
        "/v1/locations",
        "/v1/locations/1",
        "/v1/skus",
        "/v1/skus/1",
        "/v1/skus/1/adjustments",
        "/v1/skus/1/books",
        "/v1/sales",
    ] {
        let read = api.call(Method::GET, path, Some(READ_TOKEN), None).await;
        assert_eq!(read.status, StatusCode::OK, "GET {path}: {}", read.body);
        assert_eq!(read.body, api.get(path).await.body, "read and admin tokens see the same");
    }
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_what_is_served() {
    let api = Api::with_known_shards().await;
    api.seed(1, 1).await;
    let answer = api.raw(Method::GET, "/openapi.json", None, None, None).await;
    assert_eq!(answer.status, StatusCode::OK, "no token needed");
    let document = answer.body;
    assert!(document["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{}", document["openapi"]);
    assert!(document["components"]["securitySchemes"]["bearer"].is_object(), "a bearer scheme");
    assert_eq!(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    for schema in ["ErrorBody", "Location", "Sku", "Books", "Adjustment", "Sale", "Report", "StockLevel"] {
        assert!(document["components"]["schemas"][schema].is_object(), "the schema {schema}");
    }

    let paths = document["paths"].as_object().expect("paths");
    let documented: std::collections::BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served: std::collections::BTreeSet<&str> = ROUTES.iter().map(|(path, _)| *path).collect();
    assert_eq!(documented, served, "the document and the router list the same paths");

    // Every documented operation is served: none answers "no such route" or "method".
    let probes = route_probes();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let Ok(method) = method.to_uppercase().parse::<Method>() else { continue };
            if !operation.is_object() {
                continue;
            }
            operations += 1;
            assert!(operation["security"].is_array() || document["security"].is_array(), "{method} {path}");
            let (_, concrete, body) = probes
                .iter()
                .find(|(m, p, _)| *m == method && path_matches(path, p))
                .unwrap_or_else(|| panic!("no probe for the documented {method} {path}"));
            let answer = api.call(method.clone(), concrete, Some(ADMIN_TOKEN), body.clone()).await;
            assert_ne!(answer.body["error"], "route_not_found", "{method} {path}");
            assert_ne!(answer.body["error"], "method_not_allowed", "{method} {path}");
            let documented_statuses = operation["responses"].as_object().unwrap();
            assert!(
                documented_statuses.contains_key(answer.status.as_str()),
                "{method} {path} answered {} which the document does not list: {}",
                answer.status,
                answer.body
            );
        }
    }
    assert_eq!(operations, probes.len(), "every probe is a documented operation");
}

/// Whether a concrete path fits a pattern with `{param}` segments.
fn path_matches(pattern: &str, path: &str) -> bool {
    let (pattern, path): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(a, b)| a.starts_with('{') || a == b)
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let api = Api::without_dataplane().await;
    assert_error(&api.get("/v1/nothing").await, StatusCode::NOT_FOUND, "route_not_found");
    assert_error(&api.get("/v2/skus").await, StatusCode::NOT_FOUND, "route_not_found");
    let delete = api.call(Method::DELETE, "/v1/skus", Some(ADMIN_TOKEN), None).await;
    assert_error(&delete, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let put = api.call(Method::PUT, "/v1/locations/1", Some(ADMIN_TOKEN), Some(json!({"name": "x"}))).await;
    assert_error(&put, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    // A read token is refused before the method is looked at.
    let delete = api.call(Method::DELETE, "/v1/skus", Some(READ_TOKEN), None).await;
    assert_error(&delete, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn requests_are_counted_by_route_and_status() {
    // The in-process data plane of other tests installs the process's recorder; its
    // installer gives every caller the same one.
    let handle = stockplane_dataplane::admin::install_recorder().expect("the process's recorder");
    let api = Api::without_dataplane().await;
    assert_error(&api.get("/v1/locations/12345").await, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(api.get("/v1/locations").await.status, StatusCode::OK);
    let text = handle.render();
    let counted = |route: &str, status: &str| {
        text.lines().any(|line| {
            line.starts_with("stockplane_cp_http_requests_total")
                && line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(counted("/v1/locations/{id}", "404"), "{text}");
    assert!(counted("/v1/locations", "200"), "{text}");
}

// ---------------------------------------------------------------- with a data plane

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adjustment_posted_ten_times_changes_the_data_plane_once() {
    let dataplane = TestDataplane::start(1);
    let api = Api::with_dataplane(&dataplane).await;
    api.seed(3, 1).await;
    let ask = json!({"idempotency_key": "restock-3", "sku": 3, "location": 1, "delta": 7, "reason": "delivery"});
    let first = api.post("/v1/stock/adjustments", ask.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let id = first.body["id"].clone();
    for _ in 0..9 {
        let again = api.post("/v1/stock/adjustments", ask.clone()).await;
        assert_eq!(again.status, StatusCode::OK, "{}", again.body);
        assert_eq!(again.body["id"], id);
    }
    eventually("the adjustment to reach the data plane", WAIT, || async {
        (availability(&api, 3).await? == vec![(1, 7)]).then_some(())
    })
    .await;
    eventually("the adjustment to be in the books", WAIT, || async {
        let books = api.get("/v1/skus/3/books").await.body;
        (books[0]["on_hand"] == 7 && books[0]["pending_delta"] == 0).then_some(())
    })
    .await;
    let read = api.get(&format!("/v1/stock/adjustments/{}", id.as_str().unwrap())).await;
    assert_eq!(read.body["state"], "applied");
    // Once applied, a retry is still the same adjustment and changes nothing more.
    let late = api.post("/v1/stock/adjustments", ask).await;
    assert_eq!((late.status, late.body["id"].clone()), (StatusCode::OK, id));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM adjustments").fetch_one(api.app.db.pool()).await.unwrap();
    assert_eq!(count, 1);
    let report = api.call(Method::POST, "/v1/reconcile", Some(ADMIN_TOKEN), None).await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.body);
    assert_eq!(report.body["differences"], json!([]), "the books reconcile: {}", report.body);
    assert_eq!(report.body["rows"], 1);
    assert_eq!(availability(&api, 3).await, Some(vec![(1, 7)]), "applied exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_on_hand_reaches_the_books_and_the_data_plane() {
    let dataplane = TestDataplane::start(1);
    let api = Api::with_dataplane(&dataplane).await;
    api.seed(4, 1).await;
    api.post("/v1/locations", json!({"id": 2, "name": "south"})).await;
    assert_eq!(availability(&api, 4).await, Some(vec![]), "not yet stocked anywhere");

    let set = api.put("/v1/stock/4/1", json!({"idempotency_key": "count-1", "on_hand": 40})).await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.body);
    let set = api.put("/v1/stock/4/2", json!({"idempotency_key": "count-2", "on_hand": 15})).await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.body);
    // The books and what is pending say 40 at once; the shard once it is pushed.
    let books = api.get("/v1/skus/4/books").await.body;
    let intended = |books: &Value, index: usize| {
        books[index]["on_hand"].as_i64().unwrap() + books[index]["pending_delta"].as_i64().unwrap()
    };
    assert_eq!((intended(&books, 0), intended(&books, 1)), (40, 15), "{books}");
    eventually("the set to reach the data plane", WAIT, || async {
        (availability(&api, 4).await? == vec![(1, 40), (2, 15)]).then_some(())
    })
    .await;
    eventually("the set to drain into the books", WAIT, || async {
        let books = api.get("/v1/skus/4/books").await.body;
        (books[0]["on_hand"] == 40 && books[0]["pending_delta"] == 0).then_some(())
    })
    .await;

    // Sell 3 there, then count 25: the set is the delta against the books (-12).
    let client = dataplane.client("checkout").await;
    let hold = HoldId(0xfeed);
    let reserved = client.reserve(hold, 60_000, vec![CartLine { sku: 4, location: Some(1), qty: 3 }]).await.unwrap();
    assert_eq!(reserved.status, Status::Reserved);
    let held = api.get("/v1/skus/4/availability").await.body;
    assert_eq!((held[0]["held"].clone(), held[0]["available"].clone()), (json!(3), json!(37)), "{held}");
    assert_eq!(client.commit(hold, None).await.unwrap().status, Status::Committed);
    eventually("the sale to drain", WAIT, || async {
        let books = api.get("/v1/skus/4/books").await.body;
        (books[0]["on_hand"] == 37 && books[0]["sold"] == 3).then_some(())
    })
    .await;
    let sales = api.get("/v1/sales?sku=4").await.body;
    assert_eq!(sales["items"].as_array().map(Vec::len), Some(1), "{sales}");
    assert_eq!(sales["items"][0]["qty"], 3);
    assert_eq!(sales["items"][0]["hold_id"], uuid::Uuid::from_u128(0xfeed).to_string());
    let by_hold = api.get(&format!("/v1/sales?hold={}", uuid::Uuid::from_u128(0xfeed))).await.body;
    assert_eq!(by_hold["items"], sales["items"]);
    let page = api.get("/v1/sales?limit=1").await.body;
    let cursor = &page["next"];
    assert_eq!(cursor["after_position"], sales["items"][0]["position"], "a full page names its end");
    let after = api
        .get(&format!(
            "/v1/sales?after_shard={}&after_epoch={}&after_position={}",
            cursor["after_shard"], cursor["after_epoch"], cursor["after_position"]
        ))
        .await
        .body;
    assert_eq!(after["items"], json!([]));

    let recount = api.put("/v1/stock/4/1", json!({"idempotency_key": "count-3", "on_hand": 25})).await;
    assert_eq!(recount.status, StatusCode::CREATED, "{}", recount.body);
    assert_eq!(recount.body["delta"], -12);
    eventually("the recount to reach the data plane", WAIT, || async {
        (availability(&api, 4).await? == vec![(1, 25), (2, 15)]).then_some(())
    })
    .await;

    // A changed backorder limit is pushed too.
    let patched = api.patch("/v1/skus/4", json!({"backorder_limit": 5})).await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    eventually("the backorder limit to reach the data plane", WAIT, || async {
        let levels = api.get("/v1/skus/4/availability").await.body;
        let levels = levels.as_array()?;
        (levels.len() == 2 && levels.iter().all(|l| l["backorder_limit"] == 5)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_that_went_away_makes_live_reads_answer_503() {
    let mut dataplane = TestDataplane::start(1);
    let api = Api::with_dataplane(&dataplane).await;
    api.seed(5, 1).await;
    assert_eq!(availability(&api, 5).await, Some(vec![]));
    dataplane.stop();
    assert_error(&api.get("/v1/skus/5/availability").await, StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable");
    let report = api.call(Method::POST, "/v1/reconcile", Some(ADMIN_TOKEN), None).await;
    assert_error(&report, StatusCode::SERVICE_UNAVAILABLE, "dataplane_unavailable");
    // Writes go on: they are recorded, to be pushed once the data plane is back.
    let made = api
        .post("/v1/stock/adjustments", json!({"idempotency_key": "while-away", "sku": 5, "location": 1, "delta": 2}))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
}
