//! A small client of the Yardmaster HTTP API for tests.

use std::time::Duration;

use serde_json::{json, Value};

use crate::wait_until;

#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Api {
            base: base.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            token: None,
        }
    }

    /// The same client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_token(&self, token: &str) -> Api {
        Api {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .authorized(self.http.get(self.url(path)))
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .authorized(self.http.get(self.url(path)))
            .send()
            .await
            .expect("GET");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        Self::send_json(self.authorized(self.http.post(self.url(path))), body).await
    }

    /// POST with an `Idempotency-Key` header: the same key again is the same submission.
    pub async fn post_with_key(&self, path: &str, body: Value, key: &str) -> (u16, Value) {
        let request = self
            .authorized(self.http.post(self.url(path)))
            .header("idempotency-key", key);
        Self::send_json(request, body).await
    }

    pub async fn put_json(&self, path: &str, body: Value) -> (u16, Value) {
        Self::send_json(self.authorized(self.http.put(self.url(path))), body).await
    }

    /// Sends `request` with a JSON `body`: the status and the JSON answer (null if none).
    async fn send_json(request: reqwest::RequestBuilder, body: Value) -> (u16, Value) {
        let response = request.json(&body).send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (u16, Value) {
        let response = self
            .authorized(self.http.post(self.url(path)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the API answers health checks.
    pub async fn wait_healthy(&self) {
        let http = self.http.clone();
        let url = self.url("/healthz");
        wait_until("the API to answer /healthz", Duration::from_secs(30), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                match http.get(&url).send().await {
                    Ok(response) if response.status().is_success() => Some(()),
                    _ => None,
                }
            }
        })
        .await
    }

    /// Waits until `count` agents are registered and idle.
    pub async fn wait_agents(&self, count: usize) {
        wait_until(
            &format!("{count} idle agents"),
            Duration::from_secs(30),
            || async {
                let (_, body) = self.get("/api/v1/agents").await;
                let idle = body["agents"]
                    .as_array()?
                    .iter()
                    .filter(|agent| agent["status"] == "idle")
                    .count();
                (idle >= count).then_some(())
            },
        )
        .await
    }

    /// Forces a build of `builder` with `properties` and `priority`; returns its id.
    pub async fn force_with_priority(&self, builder: &str, properties: Value, priority: i32) -> String {
        let (status, body) = self
            .post(
                &format!("/api/v1/builders/{builder}/force"),
                json!({ "properties": properties, "priority": priority }),
            )
            .await;
        assert_eq!(status, 202, "force {builder}: {body}");
        body["id"].as_str().expect("build id").to_owned()
    }

    /// Forces a build of `builder` with `properties`; returns its id.
    pub async fn force(&self, builder: &str, properties: Value) -> String {
        let (status, body) = self
            .post(
                &format!("/api/v1/builders/{builder}/force"),
                json!({ "properties": properties }),
            )
            .await;
        assert_eq!(status, 202, "force {builder}: {body}");
        body["id"].as_str().expect("build id").to_owned()
    }

    pub async fn build(&self, id: &str) -> Value {
        self.get(&format!("/api/v1/builds/{id}")).await.1
    }

    /// Waits until the build is finished and returns it.
    pub async fn wait_finished(&self, id: &str, deadline: Duration) -> Value {
        self.wait_build(id, deadline, |build| build["state"] == "finished")
            .await
    }

    /// Waits until the build satisfies `predicate` and returns it.
    pub async fn wait_build(
        &self,
        id: &str,
        deadline: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(&format!("build {id}"), deadline, || async {
            let build = self.build(id).await;
            predicate(&build).then_some(build)
        })
        .await
    }

    pub async fn step_log(&self, id: &str, index: usize) -> String {
        let (status, text) = self
            .get_text(&format!("/api/v1/builds/{id}/steps/{index}/log"))
            .await;
        assert_eq!(status, 200, "log of build {id} step {index}: {text}");
        text
    }
}
