//! Against real OpenStack: `tests/openstack/harness.py` runs Keystone, Nova (API, metadata,
//! conductor, scheduler, compute with the fake virt driver), Neutron, Glance and Placement from
//! PyPI on MariaDB and RabbitMQ, on loopback; these tests bring it up when it is not (about a
//! minute, once). Each test boots its own server as the `demo` user and runs the real
//! `exoagent` binary in sandbox mode with that server's identity and a real JupyterLab:
//!
//! - tags and `exoSetup`/`exoAgent` metadata appear and follow service state, through the
//!   access-rule-restricted application credential; `openstack server show` agrees;
//! - a wrong secret is a local credential error while JupyterLab keeps serving;
//! - nova-api stopped while the state changes: once it is back the newest state lands and no
//!   stale tag remains;
//! - the passphrase is published once through the metadata service; a restarted agent that
//!   posts again gets 409 and carries on;
//! - identity from a config drive only (its documents are what nova-metadata serves for the
//!   server: the fake virt driver builds no ISO), from the metadata service only, and neither.
//! - Exosphere's notebook link: `exoCustomWorkflow` written once in Exosphere's encoding and
//!   never over a value already there; the console's `exoWorkflowToken` (read with Exosphere's
//!   rules) logs into the real JupyterLab on port 8888.
//!
//! The metadata service is reached through the harness's stand-in for Neutron's metadata proxy
//! (signed `X-Instance-ID` headers); the instance is named in the URL's first path segment.
//! Tests run one at a time: one of them stops nova-api.
//!
//! Every test here is `#[ignore]`d so a plain `cargo test` does not start a whole OpenStack (it
//! lists them as ignored, with the reason); `tests/run-all.sh` passes `--include-ignored`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::{repo_root, run_ok, Sandbox};
use exoagent::cloud::clouds::{self, CloudConfig};
use exoagent::cloud::keystone::Keystone;
use exoagent::cloud::nova::Nova;
use serde_json::{json, Value};

const COMPUTE_VERSION: &str = "compute 2.96";

/// One test at a time (the outage test stops nova-api for everyone).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn poll<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The running harness: its env.json and an HTTP client acting as the `demo` user.
struct Stack {
    env: Value,
    http: reqwest::blocking::Client,
    demo_token: String,
}

impl Stack {
    fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| {
            let up = Command::new("bash")
                .arg(repo_root().join("tests/openstack/up.sh"))
                .stdin(Stdio::null())
                .output()
                .expect("run tests/openstack/up.sh");
            assert!(
                up.status.success(),
                "the OpenStack harness did not come up:\n{}{}",
                String::from_utf8_lossy(&up.stdout),
                String::from_utf8_lossy(&up.stderr)
            );
            let state = std::env::var("EXOAGENT_OPENSTACK_DIR")
                .unwrap_or_else(|_| "/var/tmp/exoagent-openstack".into());
            let env: Value =
                serde_json::from_slice(&fs::read(Path::new(&state).join("env.json")).unwrap())
                    .unwrap();
            let http = reqwest::blocking::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let demo = &env["demo"];
            let demo_token = keystone_token(
                &http,
                env["keystone_url"].as_str().unwrap(),
                demo["username"].as_str().unwrap(),
                demo["password"].as_str().unwrap(),
                demo["project"].as_str().unwrap(),
            );
            Stack {
                env,
                http,
                demo_token,
            }
        })
    }

    fn str(&self, key: &str) -> &str {
        self.env[key].as_str().unwrap()
    }

    fn compute(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.str("compute_url")))
            .header("X-Auth-Token", &self.demo_token)
            .header("OpenStack-API-Version", COMPUTE_VERSION)
    }

    /// Boot a server as `demo` and wait until it is ACTIVE.
    fn boot(&self, name: &str) -> Server<'_> {
        self.boot_with(name, json!({}))
    }

    /// Boot a server with `extra` fields in its request (user_data, metadata).
    fn boot_with(&self, name: &str, extra: Value) -> Server<'_> {
        let mut request = json!({
            "name": name,
            "imageRef": self.str("image_id"),
            "flavorRef": self.str("flavor_id"),
            "networks": [{"uuid": self.str("network_id")}],
        });
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let reply = self
            .compute(reqwest::Method::POST, "/servers")
            .json(&json!({ "server": request }))
            .send()
            .unwrap();
        assert_eq!(
            reply.status().as_u16(),
            202,
            "boot {name}: {:?}",
            reply.text()
        );
        let id = reply.json::<Value>().unwrap()["server"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let server = Server { stack: self, id };
        poll(
            "the server to become ACTIVE",
            Duration::from_secs(120),
            || {
                let status = server.show()["status"].as_str().unwrap_or("").to_owned();
                assert_ne!(status, "ERROR", "server {} went to ERROR", server.id);
                (status == "ACTIVE").then_some(())
            },
        );
        server
    }

    /// Run the harness with `args` (e.g. `stop nova-api`).
    fn harness(&self, args: &[&str]) {
        let what = format!("harness {args:?}");
        run_ok(
            Command::new("python3").arg(self.str("harness")).args(args),
            &what,
        );
    }

    /// A token from one of the harness's application credentials.
    fn app_credential_token(&self, name: &str) -> String {
        let credential = &self.env["app_credentials"][name];
        let reply = self
            .http
            .post(format!("{}/auth/tokens", self.str("keystone_url")))
            .json(&json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": {"id": credential["id"], "secret": credential["secret"]},
            }}}))
            .send()
            .unwrap();
        assert_eq!(reply.status().as_u16(), 201, "token for {name}");
        reply.headers()["X-Subject-Token"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// A clouds.yaml holding one cloud, `agent`, copied from the harness's `name`; `edit`
    /// may change its auth block.
    fn clouds_yaml(
        &self,
        dir: &Path,
        name: &str,
        edit: impl FnOnce(&mut serde_norway::Value),
    ) -> PathBuf {
        let text = fs::read_to_string(self.str("clouds_yaml")).unwrap();
        let all: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let mut cloud = all["clouds"][name].clone();
        edit(&mut cloud);
        let mut clouds = serde_norway::Mapping::new();
        clouds.insert("agent".into(), cloud);
        let mut file = serde_norway::Mapping::new();
        file.insert("clouds".into(), serde_norway::Value::Mapping(clouds));
        fs::create_dir_all(dir).unwrap();
        let path = dir.join("clouds.yaml");
        fs::write(&path, serde_norway::to_string(&file).unwrap()).unwrap();
        path
    }
}

fn keystone_token(
    http: &reqwest::blocking::Client,
    keystone: &str,
    user: &str,
    password: &str,
    project: &str,
) -> String {
    let reply = http
        .post(format!("{keystone}/auth/tokens"))
        .json(&json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": user, "domain": {"id": "default"}, "password": password}}},
            "scope": {"project": {"name": project, "domain": {"id": "default"}}},
        }}))
        .send()
        .unwrap();
    assert_eq!(reply.status().as_u16(), 201, "token for {user}");
    reply.headers()["X-Subject-Token"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// A server owned by `demo`, deleted on drop.
struct Server<'a> {
    stack: &'a Stack,
    id: String,
}

impl Server<'_> {
    /// `method` on `/servers/<id><rest>` as `demo`; the JSON reply (null when empty).
    fn call(&self, method: reqwest::Method, rest: &str, body: Option<Value>) -> Value {
        let path = format!("/servers/{}{rest}", self.id);
        let mut request = self.stack.compute(method.clone(), &path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply = request.send().unwrap();
        assert!(
            reply.status().is_success(),
            "{method} {path}: {}",
            reply.status()
        );
        reply.json::<Value>().unwrap_or(Value::Null)
    }

    fn show(&self) -> Value {
        self.call(reqwest::Method::GET, "", None)["server"].clone()
    }

    /// All the server's tags.
    fn tags(&self) -> BTreeSet<String> {
        self.call(reqwest::Method::GET, "/tags", None)["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    }

    /// The server's `exoagent:` tags.
    fn agent_tags(&self) -> BTreeSet<String> {
        let mut tags = self.tags();
        tags.retain(|t| t.starts_with("exoagent:"));
        tags
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        let reply = self.call(reqwest::Method::GET, "/metadata", None);
        serde_json::from_value(reply["metadata"].clone()).unwrap()
    }

    fn add_tag(&self, tag: &str) {
        self.call(reqwest::Method::PUT, &format!("/tags/{tag}"), None);
    }

    fn set_metadata(&self, key: &str, value: &str) {
        let body = json!({"meta": {key: value}});
        self.call(
            reqwest::Method::PUT,
            &format!("/metadata/{key}"),
            Some(body),
        );
    }

    fn delete_metadata(&self, key: &str) {
        self.call(reqwest::Method::DELETE, &format!("/metadata/{key}"), None);
    }

    /// What Nova holds from the password endpoint.
    fn password(&self) -> String {
        self.call(reqwest::Method::GET, "/os-server-password", None)["password"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Wait until `exoSetup` says `status`; returns all metadata.
    fn wait_setup_metadata(&self, status: &str) -> BTreeMap<String, String> {
        poll(
            &format!("exoSetup {status}"),
            Duration::from_secs(30),
            || {
                let metadata = self.metadata();
                let setup = json_of(metadata.get("exoSetup")?);
                (setup["status"] == status).then_some(metadata)
            },
        )
    }

    /// Until the metadata has not changed for `quiet` (at most a minute).
    fn wait_metadata_still(&self, quiet: Duration) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = self.metadata();
        let mut since = Instant::now();
        while since.elapsed() < quiet && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.metadata();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
    }

    /// The instance's metadata URL, through the harness's metadata proxy.
    fn metadata_url(&self) -> String {
        format!("{}/{}", self.stack.str("metadata_proxy_url"), self.id)
    }

    /// Wait until the server's `exoagent:` tags are exactly `wanted`.
    fn wait_tags(&self, wanted: &[&str], timeout: Duration, agent: &Sandbox) -> BTreeSet<String> {
        let wanted: BTreeSet<String> = wanted.iter().map(|t| t.to_string()).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let tags = self.agent_tags();
            if tags == wanted {
                return tags;
            }
            assert!(
                Instant::now() < deadline,
                "Nova tags {tags:?}, wanted {wanted:?}; agent status: {}\nagent output:\n{}",
                agent.status(),
                agent.agent_output()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        let _ = self
            .stack
            .compute(reqwest::Method::DELETE, &format!("/servers/{}", self.id))
            .send();
    }
}

/// The `exoagent` binary in sandbox mode without the fixture identity, serving JupyterLab on a
/// free port, with `cloud` as its `[cloud]` table.
fn agent_with(cloud: &str) -> Sandbox {
    Sandbox::new(&format!(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\n\n\
         [supervise]\nliveness_interval_s = 1\nliveness_failures = 2\n\n\
         [cloud]\nmetadata_timeout_s = 20\n{cloud}\n"
    ))
    .with_start_args(&["--no-fixture-identity"])
}

fn jupyterlab_answers(agent: &Sandbox) -> bool {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/api", agent.base()))
        .send()
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

fn table(agent: &Sandbox) -> String {
    String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned()
}

fn cloud_table(metadata_url: Option<&str>, clouds_yaml: Option<&Path>) -> String {
    let mut out = String::new();
    if let Some(url) = metadata_url {
        out += &format!("metadata_url = \"{url}\"\n");
    }
    if let Some(path) = clouds_yaml {
        out += &format!(
            "clouds_yaml = \"{}\"\ncloud_name = \"agent\"\n",
            path.display()
        );
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The library's Keystone and Nova clients for cloud `agent` in the clouds.yaml at `path`.
fn clients(path: &Path) -> (CloudConfig, Arc<Keystone>, Nova) {
    let config = clouds::load(path, "agent").unwrap_or_else(|e| panic!("{e}"));
    let http = Keystone::http_client(&config).unwrap();
    let keystone = Arc::new(Keystone::new(config.clone(), http.clone()));
    let nova = Nova::new(keystone.clone(), http);
    (config, keystone, nova)
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn tags_and_metadata_follow_service_state_through_the_restricted_credential() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-follow");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    // The credential really is restricted: its token may read tags but not the server.
    let restricted = stack.app_credential_token("agent-tags");
    let with_restricted = |path: &str| {
        stack
            .http
            .get(format!("{}{path}", stack.str("compute_url")))
            .header("X-Auth-Token", &restricted)
            .header("OpenStack-API-Version", COMPUTE_VERSION)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        with_restricted(&format!("/servers/{}/tags", server.id)),
        200
    );
    assert_eq!(with_restricted(&format!("/servers/{}", server.id)), 401);

    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), Some(&clouds)));
    agent.start_agent();
    let status = agent.wait_complete(300);
    assert_eq!(status["instance"]["uuid"], server.id.as_str());
    assert_eq!(status["instance"]["source"], "metadata-service");
    let ready = ["exoagent:setup:complete", "exoagent:jupyterlab:ready"];
    server.wait_tags(&ready, Duration::from_secs(60), &agent);
    // Tags are written first, then metadata.
    let metadata = server.wait_setup_metadata("complete");
    agent.wait_for("nova reporting ok", Duration::from_secs(30), |s| {
        s["nova"]["state"] == "ok"
    });
    let setup = json_of(&metadata["exoSetup"]);
    assert_eq!(setup["epoch"], status["setup"]["since_ms"]);
    let summary = json_of(&metadata["exoAgent"]);
    assert_eq!(summary["setup"], "complete");
    assert_eq!(
        summary["svc"]["jupyterlab"],
        format!("ready:{}", agent.port)
    );

    // `openstack server show`, the operator's view, agrees.
    let venv_bin = Path::new(stack.str("state_dir")).join("venv/bin/openstack");
    let show = Command::new(venv_bin)
        .args(["--os-cloud", "demo", "--os-compute-api-version", "2.96"])
        .args(["server", "show", &server.id, "-f", "json"])
        .env("OS_CLIENT_CONFIG_FILE", stack.str("clouds_yaml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    let shown_tags: BTreeSet<String> = shown["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    assert_eq!(shown_tags, ready.iter().map(|t| t.to_string()).collect());
    assert_eq!(
        shown["properties"]["exoSetup"],
        metadata["exoSetup"].as_str()
    );

    // A hung JupyterLab (SIGSTOP) turns degraded; Nova follows, and back.
    let pid = status["services"][0]["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    server.wait_tags(
        &["exoagent:setup:complete", "exoagent:jupyterlab:degraded"],
        Duration::from_secs(60),
        &agent,
    );
    let wanted = format!("degraded:{}", agent.port);
    poll("exoAgent to show degraded", Duration::from_secs(30), || {
        let summary = json_of(&server.metadata()["exoAgent"]);
        (summary["svc"]["jupyterlab"] == wanted.as_str()).then_some(())
    });
    unsafe { libc::kill(pid, libc::SIGCONT) };
    server.wait_tags(&ready, Duration::from_secs(60), &agent);
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_wrong_secret_is_a_local_error_and_services_keep_running() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-wrong-secret");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |cloud| {
        cloud["auth"]["application_credential_secret"] = "not-the-secret".into();
    });
    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), Some(&clouds)));
    agent.start_agent();
    agent.wait_complete(300);
    let status = agent.wait_for("nova reporting failed", Duration::from_secs(60), |s| {
        s["nova"]["state"] == "failed"
    });
    assert_eq!(
        status["nova"]["reason"]["code"], "credential-rejected",
        "{status}"
    );
    assert!(jupyterlab_answers(&agent), "JupyterLab must keep serving");
    let table = table(&agent);
    assert!(
        table.contains("nova reporting: failed: credential-rejected:"),
        "{table}"
    );
    assert!(server.agent_tags().is_empty());
    assert!(
        !agent.agent_output().contains("not-the-secret"),
        "the secret leaked into the log"
    );
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn after_a_nova_outage_the_newest_state_lands_and_no_stale_tag_remains() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-outage");
    // What an earlier, interrupted run would have left behind.
    server.add_tag("exoagent:setup:running");
    server.add_tag("exoagent:jupyterlab:installing");
    server.set_metadata("exoSetup", r#"{"status":"running","epoch":1}"#);
    server.add_tag("researcher-tag");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-full", |_| {});
    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), Some(&clouds)));

    struct Restart<'a>(&'a Stack);
    impl Drop for Restart<'_> {
        fn drop(&mut self) {
            self.0.harness(&["start", "nova-api"]);
        }
    }
    stack.harness(&["stop", "nova-api"]);
    let restart = Restart(stack);
    agent.start_agent();
    agent.wait_complete(300);
    let status = agent.wait_for("nova reporting pending", Duration::from_secs(30), |s| {
        s["nova"]["state"] == "pending"
    });
    assert_eq!(
        status["nova"]["reason"]["code"], "nova-unreachable",
        "{status}"
    );
    drop(restart);

    server.wait_tags(
        &["exoagent:setup:complete", "exoagent:jupyterlab:ready"],
        Duration::from_secs(120),
        &agent,
    );
    server.wait_setup_metadata("complete");
    let all_tags = server.tags();
    assert!(
        all_tags.contains("researcher-tag"),
        "tags not the agent's own must stay: {all_tags:?}"
    );
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn the_passphrase_is_published_once_and_a_second_start_accepts_409() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-password");
    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), None));
    agent.start_agent();
    let status = agent.wait_complete(300);
    assert_eq!(status["instance"]["source"], "metadata-service");
    let passphrase = agent.passphrase();
    assert_eq!(server.password(), passphrase);
    let marker = agent.root().join("var/lib/exoagent/password-published");
    assert!(marker.exists());

    // nova-metadata caches for 15 s; once its GET shows the password, a POST gets 409.
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("{}/openstack/latest/password", server.metadata_url());
    poll(
        "the metadata cache to show the password",
        Duration::from_secs(60),
        || {
            let body = http.get(&url).send().ok()?.text().ok()?;
            (body == passphrase).then_some(())
        },
    );
    agent.kill_agent(libc::SIGTERM);
    fs::remove_file(&marker).unwrap();
    agent.start_agent();
    agent.wait_for("a second complete run", Duration::from_secs(120), |s| {
        s["setup"]["state"] == "complete" && s["instance"]["uuid"] == server.id.as_str()
    });
    poll("the 409 to be handled", Duration::from_secs(30), || {
        agent
            .agent_output()
            .contains("AlreadyPublished")
            .then_some(())
    });
    assert!(marker.exists(), "the marker is written again after a 409");
    assert_eq!(
        server.password(),
        passphrase,
        "the published passphrase is unchanged"
    );
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn identity_from_a_config_drive_alone_reports_to_nova() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-config-drive");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let mut agent = agent_with(&cloud_table(None, Some(&clouds)));
    // The config drive holds what nova-metadata serves for this server.
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let latest = agent.root().join("config-drive/openstack/latest");
    fs::create_dir_all(&latest).unwrap();
    for document in ["meta_data.json", "network_data.json", "vendor_data2.json"] {
        let url = format!("{}/openstack/latest/{document}", server.metadata_url());
        let reply = http.get(&url).send().unwrap();
        assert!(reply.status().is_success(), "{url}: {}", reply.status());
        fs::write(latest.join(document), reply.bytes().unwrap()).unwrap();
    }
    agent.start_agent();
    let status = agent.wait_complete(300);
    assert_eq!(status["instance"]["uuid"], server.id.as_str());
    assert_eq!(status["instance"]["source"], "config-drive");
    server.wait_tags(
        &["exoagent:setup:complete", "exoagent:jupyterlab:ready"],
        Duration::from_secs(60),
        &agent,
    );
    assert_eq!(
        server.password(),
        "",
        "no metadata service: nothing published"
    );
}

#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn without_config_drive_or_metadata_service_the_agent_runs_local_only() {
    let _one = serial();
    let stack = Stack::get();
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let mut agent = agent_with(&cloud_table(None, Some(&clouds)));
    agent.start_agent();
    let status = agent.wait_complete(300);
    assert_eq!(status["instance"]["source"], "local-only", "{status}");
    assert!(status["instance"]["uuid"].is_null());
    assert_eq!(status["nova"]["state"], "failed");
    assert_eq!(status["nova"]["reason"]["code"], "identity-unknown");
    assert!(jupyterlab_answers(&agent));
    let table = table(&agent);
    assert!(
        table.contains("instance: local-only: no config drive"),
        "{table}"
    );
}

/// The library's typed readers on the documents real Nova serves, from the metadata service and
/// from a config drive holding the same files: the same values either way.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn documents_read_the_same_from_the_metadata_service_and_a_config_drive() {
    use base64::Engine as _;
    use exoagent::cloud::{ConfigDrive, MetadataService};

    let _one = serial();
    let stack = Stack::get();
    let user_data = "#cloud-config\n# exoagent test\n";
    let server = stack.boot_with(
        "exoagent-documents",
        json!({
            "user_data": base64::engine::general_purpose::STANDARD.encode(user_data),
            "metadata": {"exoGuac": r#"{"ssh":true,"vnc":false}"#},
        }),
    );
    let service = MetadataService::new(
        &server.metadata_url(),
        MetadataService::default_client().unwrap(),
    );
    let runtime = runtime();
    let (identity, network, vendor, served_user_data) = runtime.block_on(async {
        (
            service.identity().await.unwrap().unwrap(),
            service.network_data().await.unwrap().unwrap(),
            service.vendor_data().await.unwrap().unwrap(),
            service.user_data().await.unwrap(),
        )
    });
    // Nova's EC2-compatible document: no floating address attached, so none for the
    // certificate (a floating address is not exercised: the harness has no L3).
    let floating = runtime.block_on(service.public_ipv4()).unwrap();
    assert_eq!(floating, None);
    assert_eq!(identity.uuid, server.id);
    assert_eq!(identity.name.as_deref(), Some("exoagent-documents"));
    assert!(identity.exo_guac().unwrap().ssh);
    assert_eq!(served_user_data.as_deref(), Some(user_data));
    assert_eq!(network.links.len(), 1);
    assert_eq!(network.links[0].kind.as_deref(), Some("ovs"));
    assert_eq!(network.networks[0].kind, "ipv4_dhcp");
    assert_eq!(network.services[0].kind, "dns");
    assert_eq!(vendor.providers["static"]["exoagent-harness"], true);

    let drive_dir = tempfile::tempdir().unwrap();
    let latest = drive_dir.path().join("openstack/latest");
    fs::create_dir_all(&latest).unwrap();
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    for document in [
        "meta_data.json",
        "network_data.json",
        "vendor_data2.json",
        "user_data",
    ] {
        let url = format!("{}/openstack/latest/{document}", server.metadata_url());
        fs::write(
            latest.join(document),
            http.get(&url).send().unwrap().bytes().unwrap(),
        )
        .unwrap();
    }
    let drive = ConfigDrive::new(drive_dir.path());
    assert_eq!(drive.identity().unwrap(), identity);
    assert_eq!(drive.network_data().unwrap(), Some(network));
    assert_eq!(drive.vendor_data().unwrap(), Some(vendor));
    assert_eq!(drive.user_data().unwrap(), served_user_data);

    // A server without user data: `None`, not an error.
    let bare = stack.boot("exoagent-documents-bare");
    let service = MetadataService::new(
        &bare.metadata_url(),
        MetadataService::default_client().unwrap(),
    );
    let none = runtime.block_on(service.user_data()).unwrap();
    assert_eq!(none, None);
}

/// The library's Keystone and Nova clients on real services: every supported way to
/// authenticate from clouds.yaml, one token for many calls, re-authentication after the token
/// is revoked, the catalog's interface and region honoured, 404s on removal tolerated.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn keystone_and_nova_clients_work_with_every_supported_credential() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-clients");
    let scratch = tempfile::tempdir().unwrap();
    let demo = &stack.env["demo"];
    let by_name = stack.env["app_credentials"]["agent-full"]["name"].clone();
    let variants: Vec<(&str, PathBuf)> = vec![
        (
            "application credential by id",
            stack.clouds_yaml(&scratch.path().join("id"), "agent-full", |_| {}),
        ),
        (
            "application credential by name and user",
            stack.clouds_yaml(&scratch.path().join("name"), "agent-full", |cloud| {
                let auth = cloud["auth"].as_mapping_mut().unwrap();
                auth.remove("application_credential_id");
                auth.insert(
                    "application_credential_name".into(),
                    by_name.as_str().unwrap().into(),
                );
                auth.insert("username".into(), demo["username"].as_str().unwrap().into());
                auth.insert("user_domain_name".into(), "Default".into());
            }),
        ),
        (
            "password",
            stack.clouds_yaml(&scratch.path().join("password"), "demo", |_| {}),
        ),
        (
            "internal interface",
            stack.clouds_yaml(&scratch.path().join("internal"), "agent-full", |cloud| {
                cloud["interface"] = "internal".into();
            }),
        ),
    ];
    let runtime = runtime();
    for (what, path) in variants {
        let (config, keystone, nova) = clients(&path);
        let tag = format!("exoagent:test:{}", what.replace(' ', "-"));
        let token = runtime.block_on(async {
            nova.add_tag(&server.id, &tag)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                nova.tags(&server.id).await.unwrap().contains(&tag),
                "{what}"
            );
            nova.set_metadata(&server.id, "exoAgent", "{}")
                .await
                .unwrap();
            nova.delete_metadata(&server.id, "exoAgent").await.unwrap();
            nova.delete_metadata(&server.id, "exoAgent").await.unwrap(); // 404: already gone
            nova.remove_tag(&server.id, &tag).await.unwrap();
            nova.remove_tag(&server.id, &tag).await.unwrap(); // 404: already gone
            assert_eq!(
                keystone.tokens_issued(),
                1,
                "{what}: one token for every call"
            );

            let token = keystone.token().await.unwrap();
            let compute = token
                .endpoint("compute", &config.interface, config.region.as_deref())
                .unwrap();
            let expected = if config.interface == "internal" {
                "http://localhost:8774/v2.1"
            } else {
                "http://127.0.0.1:8774/v2.1"
            };
            assert_eq!(
                compute, expected,
                "{what}: the catalog's {} URL",
                config.interface
            );
            let elsewhere = token
                .endpoint("compute", "public", Some("Elsewhere"))
                .unwrap_err();
            assert_eq!(elsewhere.reason(), "endpoint-missing");
            token
        });

        // Revoked behind the client's back: Nova says 401, the client re-authenticates once.
        let revoked = stack
            .http
            .delete(format!("{}/auth/tokens", stack.str("keystone_url")))
            .header("X-Auth-Token", &stack.demo_token)
            .header("X-Subject-Token", token.value())
            .send()
            .unwrap();
        assert_eq!(revoked.status().as_u16(), 204, "{what}: revoke");
        runtime.block_on(async {
            assert!(
                !nova.tags(&server.id).await.unwrap().contains(&tag),
                "{what}"
            );
            assert_eq!(
                keystone.tokens_issued(),
                2,
                "{what}: one new token after the 401"
            );
        });
    }
}

/// A credential whose access rules lack the metadata calls: Nova answers 401 even to a fresh
/// token, so the agent reports `credential-not-permitted` locally and stops asking — no loop —
/// while the tags it may write are written.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_call_outside_the_access_rules_is_reported_once_not_retried() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-not-permitted");
    let demo_user = stack.env["users"]["demo"].as_str().unwrap();
    let keystone = stack.str("keystone_url");
    let created = stack
        .http
        .post(format!(
            "{keystone}/users/{demo_user}/application_credentials"
        ))
        .header("X-Auth-Token", &stack.demo_token)
        .json(&json!({"application_credential": {
            "name": format!("tags-only-{}", server.id),
            "access_rules": [
                {"service": "compute", "method": "GET", "path": "/v2.1/servers/*/tags"},
                {"service": "compute", "method": "PUT", "path": "/v2.1/servers/*/tags/*"},
                {"service": "compute", "method": "DELETE", "path": "/v2.1/servers/*/tags/*"},
            ],
        }}))
        .send()
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let credential = created.json::<Value>().unwrap()["application_credential"].clone();
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |cloud| {
        cloud["auth"]["application_credential_id"] = credential["id"].as_str().unwrap().into();
        cloud["auth"]["application_credential_secret"] =
            credential["secret"].as_str().unwrap().into();
    });
    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), Some(&clouds)));
    agent.start_agent();
    agent.wait_complete(300);
    let status = agent.wait_for("not permitted", Duration::from_secs(60), |s| {
        s["nova"]["state"] == "failed"
    });
    assert_eq!(
        status["nova"]["reason"]["code"], "credential-not-permitted",
        "{status}"
    );
    assert!(jupyterlab_answers(&agent));
    assert!(
        !server.agent_tags().is_empty(),
        "the permitted tag calls were made"
    );

    let access_log = Path::new(stack.str("state_dir")).join("log/nova-api-access.log");
    let metadata_calls = || {
        fs::read_to_string(&access_log)
            .unwrap()
            .lines()
            .filter(|l| {
                l.contains(&server.id) && l.contains("/metadata/") && l.contains("exoagent/")
            })
            .count()
    };
    // Refused calls are made once per state (one PUT, one more with a fresh token), never in
    // a loop. The write of the final state can land seconds after `complete` on a loaded
    // machine (settle time plus two Keystone round trips), so wait until the calls stop, then
    // check that each pair matches one "stopped until the state changes" in the agent's log,
    // that nothing was retried as transient, and that the count then stays put.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled = metadata_calls();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(8) {
        assert!(
            Instant::now() < deadline,
            "the refused metadata calls never stopped: {settled} so far"
        );
        std::thread::sleep(Duration::from_millis(500));
        let now = metadata_calls();
        if now != settled {
            settled = now;
            quiet_since = Instant::now();
        }
    }
    assert!(settled >= 2 && settled % 2 == 0, "{settled} metadata calls");
    let output = agent.agent_output();
    let refusals = output
        .matches("reporting to Nova stopped until the state changes")
        .count();
    assert_eq!(
        settled,
        2 * refusals,
        "one pair of calls per refusal:\n{output}"
    );
    assert!(
        !output
            .lines()
            .any(|l| l.contains("will retry") && l.contains("credential-not-permitted")),
        "a refusal was retried as if transient:\n{output}"
    );
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(metadata_calls(), settled, "no retry loop on a refused call");
    let _ = stack
        .http
        .delete(format!(
            "{keystone}/users/{demo_user}/application_credentials/{}",
            credential["id"].as_str().unwrap()
        ))
        .header("X-Auth-Token", &stack.demo_token)
        .send();
}

/// A server that already carries Nova's limit of 50 tags: Nova refuses the agent's tag with
/// 400. That is reported locally and not retried until the state changes; services run on.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_server_at_the_tag_limit_is_a_local_error_not_a_retry_loop() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-tag-limit");
    let owner_tags: Vec<String> = (0..50).map(|i| format!("owner-{i}")).collect();
    server.call(
        reqwest::Method::PUT,
        "/tags",
        Some(json!({ "tags": owner_tags })),
    );
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-full", |_| {});
    let mut agent = agent_with(&cloud_table(Some(&server.metadata_url()), Some(&clouds)));
    agent.start_agent();
    agent.wait_complete(300);
    let status = agent.wait_for("reporting failed", Duration::from_secs(60), |s| {
        s["nova"]["state"] == "failed"
    });
    assert_eq!(status["nova"]["reason"]["code"], "nova-error", "{status}");
    let detail = status["nova"]["reason"]["detail"].as_str().unwrap();
    assert!(detail.contains("HTTP 400"), "{detail}");
    assert!(jupyterlab_answers(&agent));
    assert_eq!(server.tags().len(), 50, "the owner's tags are untouched");

    let access_log = Path::new(stack.str("state_dir")).join("log/nova-api-access.log");
    let tag_puts = || {
        fs::read_to_string(&access_log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(&server.id) && l.contains("PUT") && l.contains("exoagent/"))
            .count()
    };
    std::thread::sleep(Duration::from_secs(5));
    let before = tag_puts();
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(tag_puts(), before, "no retry loop on a refused tag");
}

/// Keystone behind real TLS (the harness's `keystone-tls`, certificate from its own throw-away
/// CA): trusted through clouds.yaml's `cacert`; without it the certificate is refused with a
/// reason that says so; `verify: false` is honoured.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn keystone_over_tls_trusts_the_ca_bundle_named_in_clouds_yaml() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-tls");
    let scratch = tempfile::tempdir().unwrap();
    let tls_url = stack.str("keystone_tls_url").to_owned();
    let ca = stack.str("tls_ca").to_owned();
    let runtime = runtime();
    let tags_through = |dir: &str, edit: &dyn Fn(&mut serde_norway::Value)| {
        let path = stack.clouds_yaml(&scratch.path().join(dir), "agent-full", |cloud| {
            cloud["auth"]["auth_url"] = tls_url.as_str().into();
            edit(cloud);
        });
        let (_, _, nova) = clients(&path);
        runtime.block_on(nova.tags(&server.id))
    };

    let with_ca = tags_through("with-ca", &|cloud| cloud["cacert"] = ca.as_str().into());
    assert!(with_ca.is_ok(), "{:?}", with_ca.err());

    let err = tags_through("system-roots-only", &|_| {}).unwrap_err();
    assert_eq!(err.reason(), "keystone-unreachable");
    let text = err.to_string();
    assert!(text.contains("certificate"), "the reason says why: {text}");

    let unverified = tags_through("verify-false", &|cloud| cloud["verify"] = false.into());
    assert!(unverified.is_ok(), "{:?}", unverified.err());
}

/// First-boot work is keyed by the instance UUID: restarting on the same instance (a reboot)
/// keeps the passphrase and publishes nothing again; the same disk under a new UUID (an image
/// or snapshot of the instance booted as another server) provisions afresh: a new passphrase,
/// published for the new server, and Nova tags on the new server.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_snapshot_provisions_afresh_and_a_reboot_does_not() {
    let _one = serial();
    let stack = Stack::get();
    let first = stack.boot("exoagent-original");
    let second = stack.boot("exoagent-from-snapshot");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let mut agent = agent_with(&cloud_table(None, Some(&clouds)));
    let root = agent.root().to_owned();
    // "Boot" as `server`: its config drive, its metadata service.
    let boot_as = |server: &Server| {
        let latest = root.join("config-drive/openstack/latest");
        fs::create_dir_all(&latest).unwrap();
        let url = format!("{}/openstack/latest/meta_data.json", server.metadata_url());
        let meta = http.get(&url).send().unwrap().bytes().unwrap();
        fs::write(latest.join("meta_data.json"), meta).unwrap();
        let config = root.join("etc/exoagent/config.toml");
        let text = fs::read_to_string(&config).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("metadata_url"))
            .collect();
        let mut text = kept.join("\n");
        text.push_str(&format!("\nmetadata_url = \"{}\"\n", server.metadata_url()));
        fs::write(&config, text).unwrap();
    };
    let instance_id = || fs::read_to_string(root.join("var/lib/exoagent/instance-id")).unwrap();
    let ready = ["exoagent:setup:complete", "exoagent:jupyterlab:ready"];

    boot_as(&first);
    agent.start_agent();
    agent.wait_complete(300);
    let original = agent.passphrase();
    assert_eq!(first.password(), original);
    assert_eq!(instance_id(), first.id);
    first.wait_tags(&ready, Duration::from_secs(60), &agent);

    // Reboot: same instance.
    agent.kill_agent(libc::SIGTERM);
    agent.start_agent();
    agent.wait_for("a second complete run", Duration::from_secs(120), |s| {
        s["setup"]["state"] == "complete" && s["instance"]["uuid"] == first.id.as_str()
    });
    assert_eq!(
        agent.passphrase(),
        original,
        "a reboot keeps the passphrase"
    );
    let runs = agent.agent_output();
    assert_eq!(
        runs.matches("Published(").count(),
        1,
        "published on the first boot only:\n{runs}"
    );
    assert!(runs.contains("AlreadyDone"), "{runs}");

    // The same disk booted as another server.
    agent.kill_agent(libc::SIGTERM);
    boot_as(&second);
    agent.start_agent();
    agent.wait_for(
        "complete as the new server",
        Duration::from_secs(120),
        |s| s["setup"]["state"] == "complete" && s["instance"]["uuid"] == second.id.as_str(),
    );
    let fresh = agent.passphrase();
    assert_ne!(fresh, original, "a new instance gets a new passphrase");
    assert_eq!(second.password(), fresh);
    assert_eq!(instance_id(), second.id);
    second.wait_tags(&ready, Duration::from_secs(60), &agent);
}

/// [`agent_with`] reporting on `server` through the restricted credential (its clouds.yaml in
/// `scratch`), with JupyterLab on 127.0.0.1:8888: the only port Exosphere's link leads to.
fn agent_at_8888(stack: &Stack, server: &Server<'_>, scratch: &Path) -> Sandbox {
    let clouds = stack.clouds_yaml(scratch, "agent-tags", |_| {});
    let cloud = cloud_table(Some(&server.metadata_url()), Some(&clouds));
    let mut agent = agent_with(&cloud);
    agent.port = 8888;
    agent.rewrite_config(&format!(
        "[services.jupyterlab]\nenabled = true\nbind = \"127.0.0.1\"\nport = @PORT@\n\n\
         [supervise]\nliveness_interval_s = 1\nliveness_failures = 2\n\n\
         [cloud]\nmetadata_timeout_s = 20\n{cloud}\n"
    ));
    agent
}

/// Exosphere's `parseConsoleLogForWorkflowToken` (src/Helpers/Helpers.elm): per line, what
/// follows the first `{`, decoded whole as an object with a string `exoWorkflowToken`; the last
/// that decodes wins.
fn exosphere_workflow_token(console: &str) -> Option<String> {
    console
        .split('\n')
        // The last line that decodes wins: look from the end.
        .rev()
        .map(|line| line.find('{').map_or(line, |i| &line[i..]))
        .find_map(|rest| {
            let value: Value = serde_json::from_str(rest).ok()?;
            value.get("exoWorkflowToken")?.as_str().map(str::to_owned)
        })
}

/// The JupyterLab link the unmodified Exosphere UI shows (`exoCustomWorkflow` + the token line):
/// written once in Exosphere's format through the restricted credential, never over a value
/// Exosphere (or anyone) set, and the token in it logs into the real JupyterLab. Runs
/// JupyterLab on port 8888, the only port Exosphere links to.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn exospheres_notebook_link_is_published_once_and_its_token_logs_in() {
    let _one = serial();
    let stack = Stack::get();
    assert!(
        std::net::TcpListener::bind("127.0.0.1:8888").is_ok(),
        "this test needs 127.0.0.1:8888 free (Exosphere's link always leads to port 8888)"
    );
    let server = stack.boot("exoagent-link");
    let scratch = tempfile::tempdir().unwrap();
    let mut agent = agent_at_8888(stack, &server, scratch.path());
    agent.start_agent();
    let status = agent.wait_complete(300);
    let version = exoagent::services::jupyterlab::link::pinned_version(
        exoagent::services::jupyterlab::REQUIREMENTS,
    )
    .unwrap();
    // Exosphere's own encoding (`encodeCustomWorkflowSource`): v, repo, ref, path, no spaces.
    let expected = format!(
        r#"{{"v":1,"repo":"https://github.com/jupyterlab/jupyterlab","ref":"v{version}","path":"/lab"}}"#
    );
    let metadata = poll("exoCustomWorkflow in Nova", Duration::from_secs(60), || {
        let metadata = server.metadata();
        metadata
            .contains_key("exoCustomWorkflow")
            .then_some(metadata)
    });
    assert_eq!(metadata["exoCustomWorkflow"], expected);

    // The console (the sandbox writes it to stdout) gives Exosphere the token.
    let token = poll("the token line", Duration::from_secs(30), || {
        exosphere_workflow_token(&agent.agent_output())
    });
    assert_eq!(token.len(), 48);
    let stored = fs::read_to_string(
        agent
            .root()
            .join("var/lib/exoagent/secrets/jupyterlab-link-token"),
    )
    .unwrap();
    assert_eq!(stored.trim(), token);
    // The console is the token's only channel: not the agent's log, not JupyterLab's (which
    // shows a configured token as "...").
    let agent_log = fs::read_to_string(agent.root().join("agent-1.stderr")).unwrap();
    assert!(
        !agent_log.contains(&token),
        "the token is in the agent's log"
    );
    let service_log =
        fs::read_to_string(agent.root().join("var/log/exoagent/jupyterlab.log")).unwrap();
    assert!(service_log.contains("8888"), "{service_log}");
    assert!(
        !service_log.contains(&token),
        "the token is in JupyterLab's log"
    );
    // Exosphere's link: <path> + "/?token=" + token, on port 8888.
    let http = reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let link = format!("http://127.0.0.1:8888/lab/?token={token}");
    // As a browser follows it: JupyterLab drops the slash (301, the query kept), then serves
    // the lab itself, not the login page.
    let browser = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let page = browser.get(&link).send().unwrap();
    assert_eq!(page.status().as_u16(), 200, "{link}");
    assert_eq!(page.url().path(), "/lab", "{}", page.url());
    assert!(page.text().unwrap().contains("JupyterLab"));
    let api = |query: &str| {
        http.get(format!("http://127.0.0.1:8888/api/status{query}"))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(api(&format!("?token={token}")), 200);
    assert_eq!(api(""), 403, "without the token nothing is served");
    assert_eq!(
        api("?token=0123456789abcdef0123456789abcdef0123456789abcdef"),
        403
    );

    // Written once: a value set afterwards (by Exosphere, or the user) is left alone while the
    // agent keeps reporting state changes. Set once the agent's own writes have landed: Nova's
    // metadata update saves the whole set it read, so a write of ours still in flight (a slow
    // Nova) could put back the value it read, which is Nova's race, not the agent's doing.
    server.wait_setup_metadata("complete");
    server.wait_metadata_still(Duration::from_secs(3));
    server.set_metadata(
        "exoCustomWorkflow",
        r#"{"v":1,"repo":"r","ref":"x","path":"/"}"#,
    );
    let pid = status["services"][0]["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    server.wait_tags(
        &["exoagent:setup:complete", "exoagent:jupyterlab:degraded"],
        Duration::from_secs(60),
        &agent,
    );
    unsafe { libc::kill(pid, libc::SIGCONT) };
    server.wait_tags(
        &["exoagent:setup:complete", "exoagent:jupyterlab:ready"],
        Duration::from_secs(60),
        &agent,
    );
    assert_eq!(
        server.metadata()["exoCustomWorkflow"],
        r#"{"v":1,"repo":"r","ref":"x","path":"/"}"#
    );
    // A restarted agent reads the value in the metadata service and does not write it again.
    agent.kill_agent(libc::SIGTERM);
    agent.start_agent();
    agent.wait_complete(120);
    agent.wait_for("nova reporting ok", Duration::from_secs(60), |s| {
        s["nova"]["state"] == "ok"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        server.metadata()["exoCustomWorkflow"],
        r#"{"v":1,"repo":"r","ref":"x","path":"/"}"#
    );
    // The same token after the restart: the link stays valid.
    assert_eq!(api(&format!("?token={token}")), 200);
}

/// A server Exosphere launched with its own `exoCustomWorkflow` keeps it.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_custom_workflow_exosphere_set_at_launch_is_never_overwritten() {
    let _one = serial();
    let stack = Stack::get();
    let exosphere = r#"{"v":1,"repo":"https://github.com/binder-examples/requirements","ref":"master","path":"/lab"}"#;
    let server = stack.boot_with(
        "exoagent-own-workflow",
        json!({"metadata": {"exoCustomWorkflow": exosphere}}),
    );
    let scratch = tempfile::tempdir().unwrap();
    let mut agent = agent_at_8888(stack, &server, scratch.path());
    agent.start_agent();
    agent.wait_complete(300);
    server.wait_setup_metadata("complete");
    agent.wait_for("nova reporting ok", Duration::from_secs(60), |s| {
        s["nova"]["state"] == "ok"
    });
    assert_eq!(server.metadata()["exoCustomWorkflow"], exosphere);
}

/// A tmpfs the test mounts, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        fs::create_dir_all(&at).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(&at),
            "mount tmpfs",
        );
        Self(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Resource alerts, real end to end: a real tmpfs filled past `disk_percent` raises
/// `disk-high` for it in the status API, `exoagent status`, the login banner, Nova's tags and
/// `exoAgent`; deleting the file clears it everywhere, and the setup stays `complete`
/// throughout. Memory is the machine's real `/proc/meminfo` under a 1 % threshold: raised too.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_filled_volume_raises_an_alert_on_every_channel_and_freeing_it_clears_it() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-alerts");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let volume = Tmpfs::mount(scratch.path().join("volume"), "1m");
    let mut agent = Sandbox::new(&format!(
        "[services.jupyterlab]\nenabled = false\n\n\
         [cloud]\nmetadata_timeout_s = 20\n{}\n\
         [alerts]\nmemory_percent = 1\ndisk_percent = 90\npaths = [\"{}\"]\ninterval_s = 1\n",
        cloud_table(Some(&server.metadata_url()), Some(&clouds)),
        volume.0.display()
    ))
    .with_start_args(&["--no-fixture-identity"]);
    agent.start_agent();
    agent.wait_complete(120);
    let memory_only = ["exoagent:alert:memory-high", "exoagent:setup:complete"];
    server.wait_tags(&memory_only, Duration::from_secs(60), &agent);
    let path = volume.0.display().to_string();
    let status = agent.status();
    assert_eq!(status["alerts"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["alerts"][0]["code"], "memory-high");

    // 980 KiB of a 1 MiB tmpfs: 96 % used. (The sandbox's own directory is on the machine's
    // root disk, watched too: this test needs it under 90 %.)
    fs::write(volume.0.join("fill"), vec![7u8; 980 * 1024]).unwrap();
    let status = agent.wait_for("the disk alert", Duration::from_secs(30), |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a["code"] == "disk-high"))
    });
    let disk = status["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["code"] == "disk-high")
        .unwrap()
        .clone();
    assert_eq!(disk["resource"], "filesystem");
    assert_eq!(disk["path"], path.as_str());
    assert_eq!(disk["threshold_percent"], 90);
    let used = disk["used_percent"].as_u64().unwrap();
    assert!((95..=97).contains(&used), "{disk}");
    assert_eq!(status["setup"]["state"], "complete");
    server.wait_tags(
        &[
            "exoagent:alert:disk-high",
            "exoagent:alert:memory-high",
            "exoagent:setup:complete",
        ],
        Duration::from_secs(60),
        &agent,
    );
    poll(
        "exoAgent to name the volume",
        Duration::from_secs(30),
        || {
            let summary = json_of(&server.metadata()["exoAgent"]);
            (summary["alert"] == format!("memory,{path}").as_str()).then_some(())
        },
    );
    let table = table(&agent);
    assert!(
        table.contains(&format!(
            "  disk-high: {path} {used}% used (alert at 90%, since "
        )),
        "{table}"
    );
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(
        banner.contains(&format!("  alert: {path} {used}% used (alert at 90%")),
        "{banner}"
    );

    fs::remove_file(volume.0.join("fill")).unwrap();
    agent.wait_for("the disk alert to clear", Duration::from_secs(30), |s| {
        s["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().all(|a| a["code"] != "disk-high"))
    });
    server.wait_tags(&memory_only, Duration::from_secs(60), &agent);
    poll(
        "exoAgent to drop the volume",
        Duration::from_secs(30),
        || {
            let summary = json_of(&server.metadata()["exoAgent"]);
            (summary["alert"] == "memory").then_some(())
        },
    );
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(!banner.contains(&path), "{banner}");
    assert_eq!(agent.status()["setup"]["state"], "complete");
}

/// `[idle]` for the idle tests: short times, one sample a second, and the host-load thresholds
/// at their maximum so that this shared machine's own CPU, disk and network (other suites,
/// compiles) cannot decide; those signals are proven by the detector's unit tests on the
/// kernel's real file formats. `extra` adds keys (the action).
fn idle_table(after_s: u64, extra: &str) -> String {
    format!(
        "\n[idle]\nafter_s = {after_s}\ninterval_s = 1\ncpu_percent = 100\n\
         disk_kib_per_s = 1073741824\nnetwork_kib_per_s = 1073741824\n{extra}\n"
    )
}

/// The researcher in JupyterLab: signed in with the passphrase through the login form, as a
/// browser is; its cookies are kept as one header for HTTP and the kernel's WebSocket.
struct Researcher {
    http: reqwest::blocking::Client,
    base: String,
    cookies: String,
    xsrf: String,
}

impl Researcher {
    fn sign_in(agent: &Sandbox) -> Self {
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let base = agent.base();
        let cookie_pairs = |reply: &reqwest::blocking::Response| -> Vec<String> {
            reply
                .headers()
                .get_all(reqwest::header::SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
                .collect()
        };
        let page = http.get(format!("{base}/login")).send().unwrap();
        let mut cookies = cookie_pairs(&page);
        let xsrf = cookies
            .iter()
            .find_map(|c| c.strip_prefix("_xsrf=").map(str::to_owned))
            .expect("the login page sets _xsrf");
        let reply = http
            .post(format!("{base}/login"))
            .header(reqwest::header::COOKIE, cookies.join("; "))
            .form(&[("_xsrf", xsrf.as_str()), ("password", &agent.passphrase())])
            .send()
            .unwrap();
        assert_eq!(reply.status().as_u16(), 302, "the passphrase signs in");
        cookies.extend(cookie_pairs(&reply));
        Self {
            http,
            base,
            cookies: cookies.join("; "),
            xsrf,
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::COOKIE, &self.cookies)
            .header("X-XSRFToken", &self.xsrf)
    }

    /// Something a researcher does in JupyterLab: list their files.
    fn browse(&self) {
        let reply = self
            .request(reqwest::Method::GET, "/api/contents")
            .send()
            .unwrap();
        assert_eq!(reply.status().as_u16(), 200);
    }

    fn start_kernel(&self) -> String {
        let kernel: Value = self
            .request(reqwest::Method::POST, "/api/kernels")
            .json(&json!({}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        kernel["id"].as_str().expect("a kernel id").to_owned()
    }

    /// Send `code` to the kernel to run (Jupyter's messaging over the kernel's WebSocket, the
    /// JSON form without a subprotocol); the socket is returned open while the cell runs.
    fn run_cell(
        &self,
        kernel: &str,
        code: &str,
    ) -> tokio_tungstenite::tungstenite::WebSocket<std::net::TcpStream> {
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let host = self.base.trim_start_matches("http://").to_owned();
        let session = uuid::Uuid::new_v4().to_string();
        let url = format!("ws://{host}/api/kernels/{kernel}/channels?session_id={session}");
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Cookie", self.cookies.parse().unwrap());
        let stream = std::net::TcpStream::connect(&host).unwrap();
        let (mut socket, _) = tokio_tungstenite::tungstenite::client(request, stream)
            .expect("the kernel's WebSocket");
        let message = json!({
            "header": {"msg_id": uuid::Uuid::new_v4().to_string(), "username": "researcher",
                       "session": session, "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": false, "store_history": true,
                        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
        });
        socket
            .send(Message::Text(message.to_string().into()))
            .unwrap();
        socket
    }
    /// Run `code` in the kernel and wait for its reply: its `status` (`ok`, or `error` with
    /// the exception's name).
    fn run_cell_to_the_end(&self, kernel: &str, code: &str) -> String {
        use tokio_tungstenite::tungstenite::Message;
        let mut socket = self.run_cell(kernel, code);
        socket
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        loop {
            let Message::Text(text) = socket.read().expect("the kernel's reply") else {
                continue;
            };
            let message: Value = serde_json::from_str(text.as_str()).unwrap();
            if message["msg_type"] == "execute_reply"
                || message["header"]["msg_type"] == "execute_reply"
            {
                let content = &message["content"];
                return match content["status"].as_str() {
                    Some("error") => {
                        format!("error: {}", content["ename"].as_str().unwrap_or("?"))
                    }
                    other => other.unwrap_or("?").to_owned(),
                };
            }
        }
    }
}

/// Idle detection against real Nova and a real JupyterLab: with nothing going on the instance
/// goes idle on every channel (status API, `exoagent status`, the banner, a console line, the
/// `exoagent:idle` tag and `exoAgent`); a researcher's kernel running a cell longer than the
/// idle time (a `sleep`: no output, so JupyterLab's `last_activity` does not move; only the busy
/// kernel shows) makes it active and keeps it so until the cell ends; then it is idle again.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn an_idle_sandbox_is_reported_idle_and_a_running_cell_keeps_it_active() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-idle");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let mut agent = agent_with(&format!(
        "{}{}",
        cloud_table(Some(&server.metadata_url()), Some(&clouds)),
        idle_table(6, "")
    ));
    agent.start_agent();
    agent.wait_complete(300);
    let idle_tags = [
        "exoagent:idle",
        "exoagent:jupyterlab:ready",
        "exoagent:setup:complete",
    ];
    let busy_tags = ["exoagent:jupyterlab:ready", "exoagent:setup:complete"];
    // Setting up counts as activity: idle only once the setup is complete and quiet.
    let status = agent.wait_for("idle", Duration::from_secs(60), |s| {
        s["idle"]["state"] == "idle"
    });
    assert_eq!(status["setup"]["state"], "complete");
    let complete_ms = status["setup"]["since_ms"].as_u64().unwrap();
    // (The last sample that saw the setup running is at most one interval before it ended.)
    assert!(
        status["idle"]["last_activity_ms"].as_u64().unwrap() + 1_000 >= complete_ms,
        "not idle since before the setup was complete: {status}"
    );
    server.wait_tags(&idle_tags, Duration::from_secs(60), &agent);
    let since = status["idle"]["last_activity_ms"].as_u64().unwrap();
    poll("exoAgent to say idle", Duration::from_secs(30), || {
        let summary = json_of(&server.metadata()["exoAgent"]);
        (summary["idle"].as_u64() == Some(since / 1000)).then_some(())
    });
    let table = table(&agent);
    assert!(table.contains("idle: idle since "), "{table}");
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(banner.contains("\n  idle: idle since "), "{banner}");
    assert!(
        agent
            .agent_output()
            .contains(&format!("{{\"idle\":\"idle\",\"idleSince\":{since}}}")),
        "the console line"
    );

    let researcher = Researcher::sign_in(&agent);
    let kernel = researcher.start_kernel();
    let cell = researcher.run_cell(&kernel, "import time\ntime.sleep(20)");
    let started = Instant::now();
    agent.wait_for("activity", Duration::from_secs(10), |s| {
        s["idle"]["state"] == "active"
            && s["idle"]["activity"]
                .as_array()
                .is_some_and(|a| a.iter().any(|k| k == "jupyterlab"))
    });
    server.wait_tags(&busy_tags, Duration::from_secs(30), &agent);
    // Well past the idle time while the cell runs: still active, the busy kernel seen.
    while started.elapsed() < Duration::from_secs(16) {
        let status = agent.status();
        assert_eq!(
            status["idle"]["state"], "active",
            "idle while a cell runs: {status}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(cell);
    // The cell ends at 20 s; idle again once the idle time has passed after it.
    agent.wait_for("idle after the cell", Duration::from_secs(30), |s| {
        s["idle"]["state"] == "idle"
    });
    server.wait_tags(&idle_tags, Duration::from_secs(30), &agent);
    let after = agent.status()["idle"]["last_activity_ms"].as_u64().unwrap();
    assert!(
        after > since + 15_000,
        "idle since the cell's end, not before: {after}"
    );
}

/// The optional action against real Nova: idle, the owner is warned (status, banner `WARNING`,
/// console line with the time, `exoagent:idle:shelve-pending`); the researcher using
/// JupyterLab during the grace period cancels it and the server stays ACTIVE; left idle again
/// through a whole grace period, the agent shelves its own server through the credential, seen
/// through Nova's API (SHELVED, then SHELVED_OFFLOADED with the fake virt driver).
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn an_idle_sandbox_shelves_its_server_after_a_warned_grace_period_that_activity_cancels() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-shelve");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-full", |_| {});
    let mut agent = agent_with(&format!(
        "{}{}",
        cloud_table(Some(&server.metadata_url()), Some(&clouds)),
        idle_table(4, "action = \"shelve\"\ngrace_s = 12")
    ));
    agent.start_agent();
    agent.wait_complete(300);
    let pending = agent.wait_for("a pending shelve", Duration::from_secs(60), |s| {
        s["idle"]["state"] == "shelve-pending"
    });
    let at = pending["idle"]["action_at_ms"].as_u64().unwrap();
    let since = pending["idle"]["last_activity_ms"].as_u64().unwrap();
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(
        banner.contains("\n  WARNING: idle since ")
            && banner.contains("the instance will be shelved in"),
        "{banner}"
    );
    assert!(
        agent.agent_output().contains(&format!(
            "{{\"idle\":\"shelve-pending\",\"idleSince\":{since},\"shelveAt\":{at}}}"
        )),
        "the console warning"
    );
    poll("the pending tag", Duration::from_secs(20), || {
        server
            .agent_tags()
            .contains("exoagent:idle:shelve-pending")
            .then_some(())
    });

    // The researcher comes back within the grace period.
    let researcher = Researcher::sign_in(&agent);
    researcher.browse();
    let back = agent.wait_for("the shelve cancelled", Duration::from_secs(10), |s| {
        s["idle"]["state"] == "active"
    });
    assert!(
        exoagent::state::now_ms() < at,
        "cancelled before the shelve was due: {back}"
    );
    assert!(agent.agent_output().contains("{\"idle\":\"active\"}"));
    assert_eq!(server.show()["status"], "ACTIVE");
    poll("the idle tags to go", Duration::from_secs(20), || {
        (!server.agent_tags().iter().any(|t| t.contains("idle"))).then_some(())
    });

    // Left alone: warned again, then shelved after the whole grace period.
    let pending = agent.wait_for("a second pending shelve", Duration::from_secs(30), |s| {
        s["idle"]["state"] == "shelve-pending"
    });
    let due = pending["idle"]["action_at_ms"].as_u64().unwrap();
    agent.wait_for("shelving", Duration::from_secs(30), |s| {
        s["idle"]["state"] == "shelving"
    });
    assert!(
        exoagent::state::now_ms() >= due,
        "not before the grace period ended"
    );
    poll("Nova to shelve the server", Duration::from_secs(60), || {
        let status = server.show()["status"].as_str().unwrap_or("").to_owned();
        status.starts_with("SHELVED").then_some(())
    });
    assert!(agent
        .agent_output()
        .contains("Nova accepted the shelve request"));
    poll("the shelving tag", Duration::from_secs(60), || {
        server
            .agent_tags()
            .contains("exoagent:idle:shelving")
            .then_some(())
    });
}

/// A credential whose access rules lack the server action: the shelve is refused by Nova,
/// reported (status `reason`, the banner) and not retried while the instance stays idle; the
/// server keeps running.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_shelve_the_credential_may_not_make_is_reported_once_and_the_server_runs_on() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-shelve-refused");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let mut agent = agent_with(&format!(
        "{}{}",
        cloud_table(Some(&server.metadata_url()), Some(&clouds)),
        idle_table(3, "action = \"shelve\"\ngrace_s = 2")
    ));
    agent.start_agent();
    agent.wait_complete(300);
    let status = agent.wait_for("the refusal", Duration::from_secs(60), |s| {
        s["idle"]["reason"]["code"] == "credential-not-permitted"
    });
    assert_eq!(status["idle"]["state"], "idle", "{status}");
    std::thread::sleep(Duration::from_secs(4));
    let output = agent.agent_output();
    assert_eq!(
        output
            .matches("shelving the idle instance through Nova")
            .count(),
        1,
        "asked once:\n{output}"
    );
    assert_eq!(server.show()["status"], "ACTIVE");
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(
        banner.contains("shelving failed (credential-not-permitted"),
        "{banner}"
    );
}

/// The cloud's request against real Nova and its metadata service: setting `exoAgentRequest`
/// on a running sandbox's server enables the desktop (real TigerVNC and Xfce) and the tags
/// follow; a kernel the researcher started before keeps its state (the unchanged
/// JupyterLab is adopted, not restarted); a malformed request is reported (status, tag,
/// `exoAgent`, banner) once and changes nothing; removing the request stops the service.
#[test]
#[ignore = "needs the OpenStack harness: cargo test --test openstack -- --include-ignored (tests/run-all.sh runs it)"]
fn a_request_in_the_metadata_changes_the_running_sandbox_and_a_bad_one_changes_nothing() {
    let _one = serial();
    let stack = Stack::get();
    let server = stack.boot("exoagent-request");
    let scratch = tempfile::tempdir().unwrap();
    let clouds = stack.clouds_yaml(scratch.path(), "agent-tags", |_| {});
    let mut agent = agent_with(&format!(
        "{}request_interval_s = 2\n",
        cloud_table(Some(&server.metadata_url()), Some(&clouds))
    ));
    agent.start_agent();
    let status = agent.wait_complete(300);
    let jupyterlab = status["services"][0]["pid"].as_i64().unwrap();
    server.wait_tags(
        &["exoagent:jupyterlab:ready", "exoagent:setup:complete"],
        Duration::from_secs(60),
        &agent,
    );
    let researcher = Researcher::sign_in(&agent);
    let kernel = researcher.start_kernel();
    assert_eq!(researcher.run_cell_to_the_end(&kernel, "x = 41"), "ok");

    // The desktop enabled through the metadata (a request must fit Nova's 255 characters).
    let display = common::free_display();
    let request = format!(
        r#"{{"v":1,"services":{{"desktop":{{"enabled":true,"port":{},"geometry":"1024x768"}}}}}}"#,
        5900 + display
    );
    assert!(request.len() <= 255, "{request}");
    server.set_metadata("exoAgentRequest", &request);
    let desktop_ready = |s: &Value| {
        s["services"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["service"] == "desktop" && x["state"] == "ready")
        }) && s["setup"]["state"] == "complete"
    };
    let status = agent.wait_for(
        "the desktop from the request",
        Duration::from_secs(90),
        desktop_ready,
    );
    assert_eq!(status["reload"]["trigger"], "cloud-request", "{status}");
    assert_eq!(status["reload"]["changes"][0], "desktop: added");
    assert_eq!(status["request"]["outcome"], "applied");
    let digest = status["request"]["digest"].as_str().unwrap().to_owned();
    let pid_of = |s: &Value, name: &str| {
        s["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["service"] == name)
            .and_then(|x| x["pid"].as_i64())
    };
    let desktop_pid = pid_of(&status, "desktop").unwrap();
    server.wait_tags(
        &[
            "exoagent:jupyterlab:ready",
            "exoagent:desktop:ready",
            "exoagent:setup:complete",
        ],
        Duration::from_secs(60),
        &agent,
    );
    poll(
        "exoAgent to name the request",
        Duration::from_secs(30),
        || {
            let summary = json_of(&server.metadata()["exoAgent"]);
            (summary["req"] == format!("applied:{digest}").as_str()).then_some(())
        },
    );
    assert_eq!(pid_of(&status, "jupyterlab"), Some(jupyterlab));
    assert_eq!(
        researcher.run_cell_to_the_end(&kernel, "assert x == 41"),
        "ok",
        "the kernel lost its state"
    );

    // A malformed request: reported everywhere, once; nothing changes.
    server.set_metadata(
        "exoAgentRequest",
        r#"{"v":1,"services":{"desktop":{"enabled":true,"geometry":"huge"}}}"#,
    );
    let status = agent.wait_for("the refusal", Duration::from_secs(60), |s| {
        s["request"]["outcome"] == "rejected"
    });
    assert_eq!(status["request"]["reason"]["code"], "invalid-request");
    let detail = status["request"]["reason"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("exoAgentRequest") && detail.contains("services.desktop.geometry"),
        "{detail}"
    );
    assert_eq!(status["setup"]["state"], "complete");
    poll("the rejected tag", Duration::from_secs(30), || {
        server
            .agent_tags()
            .contains("exoagent:request:rejected")
            .then_some(())
    });
    let banner = String::from_utf8_lossy(&agent.cli(&["motd"]).stdout).into_owned();
    assert!(
        banner.contains("  cloud request refused: invalid-request"),
        "{banner}"
    );
    std::thread::sleep(Duration::from_secs(5));
    let status = agent.status();
    assert_eq!(pid_of(&status, "jupyterlab"), Some(jupyterlab), "{status}");
    assert_eq!(pid_of(&status, "desktop"), Some(desktop_pid), "{status}");
    assert_eq!(
        agent
            .agent_output()
            .matches("new configuration rejected")
            .count(),
        1,
        "reported once, not every poll"
    );

    // The request removed: the desktop stops (its X server gone), the tags follow, JupyterLab
    // and its kernel stay.
    server.delete_metadata("exoAgentRequest");
    let status = agent.wait_for("the desktop stopped", Duration::from_secs(90), |s| {
        s["services"].as_array().is_some_and(|a| a.len() == 1) && s["setup"]["state"] == "complete"
    });
    assert!(status["request"].is_null(), "{status}");
    server.wait_tags(
        &["exoagent:jupyterlab:ready", "exoagent:setup:complete"],
        Duration::from_secs(60),
        &agent,
    );
    poll("the desktop to end", Duration::from_secs(15), || {
        (!Path::new(&format!("/proc/{desktop_pid}")).exists()
            && !Path::new(&format!("/tmp/.X{display}-lock")).exists())
        .then_some(())
    });
    assert_eq!(pid_of(&status, "jupyterlab"), Some(jupyterlab));
    assert_eq!(
        researcher.run_cell_to_the_end(&kernel, "assert x == 41"),
        "ok"
    );
}
