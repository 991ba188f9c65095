//! Helpers for the cluster tests: members' data directories and shared
//! admin token, members with and without engines, and reading their JSON.

use std::path::{Path, PathBuf};

use crate::{Nats, Server, client, models_dir, venv};

/// The model the examples use; the cluster tests serve it.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Members' data directories and the cluster's admin token file.
pub struct Setup {
    pub tmp: tempfile::TempDir,
    pub token_file: PathBuf,
}

impl Default for Setup {
    fn default() -> Self {
        Setup::new()
    }
}

impl Setup {
    pub fn new() -> Setup {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token_file = tmp.path().join("admin-token");
        std::fs::write(&token_file, "cluster-secret-for-tests\n").expect("token");
        Setup { tmp, token_file }
    }

    pub fn data(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name).join("data")
    }

    /// The `serve` arguments of member `name` (a router: `--devices none`).
    pub fn args(&self, nats: &Nats, name: &str) -> Vec<String> {
        [
            "--cluster",
            &nats.url,
            "--node-name",
            name,
            "--admin-token-file",
            self.token_file.to_str().expect("utf-8"),
            "--devices",
            "none",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Member `name` with the CPU engine and its own, empty models folder.
    pub fn engine_member(&self, nats: &Nats, name: &str) -> Server {
        let models = self.tmp.path().join(name).join("models");
        std::fs::create_dir_all(&models).expect("models dir");
        let mut args = self.args(nats, name);
        args.truncate(args.len() - 2);
        args.extend([
            "--models-dir".into(),
            models.to_str().expect("utf-8").into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let venv = venv();
        Server::start_with(
            &self.data(name),
            &[("SLINFER_VENV", venv.to_str().expect("utf-8"))],
            &args,
        )
    }

    /// Member `name` with the CPU engine and the imported default model in
    /// its models folder (its files linked, not copied): the member
    /// publishes the model to the cluster if the cluster lacks it.
    pub fn engine_member_with_model(&self, nats: &Nats, name: &str) -> Server {
        self.engine_member_with(nats, name, &[DEFAULT_MODEL])
    }

    /// Member `name` with the CPU engine and `models` in its models folder:
    /// each the imported default model under that name.
    pub fn engine_member_with(&self, nats: &Nats, name: &str, models: &[&str]) -> Server {
        for model in models {
            let package = self.tmp.path().join(name).join("models").join(model);
            if !package.exists() {
                link_files(&models_dir().join(DEFAULT_MODEL), &package);
                let toml = package.join("model.toml");
                let text = std::fs::read_to_string(&toml).expect("model.toml");
                std::fs::remove_file(&toml).expect("unlink model.toml");
                let renamed = text.replace(
                    &format!("name = \"{DEFAULT_MODEL}\""),
                    &format!("name = \"{model}\""),
                );
                std::fs::write(&toml, renamed).expect("model.toml");
            }
        }
        self.engine_member(nats, name)
    }

    /// Member `name` without engines: it serves functions and routes.
    pub fn member(&self, nats: &Nats, name: &str) -> Server {
        let args = self.args(nats, name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_with(&self.data(name), &[], &args)
    }

    /// Member `a` without engines and member `c` serving the default model,
    /// once `a` sees `c` serve it (within 20 s).
    pub async fn router_and_engine(&self, nats: &Nats) -> (Server, Server) {
        let c = self.engine_member_with_model(nats, "c");
        let a = self.member(nats, "a");
        let seen = crate::wait_for(std::time::Duration::from_secs(20), || async {
            served_by(&a, DEFAULT_MODEL).await == ["c"]
        })
        .await;
        assert!(seen.is_some(), "{}", get_json(&a, "/v1/cluster").await);
        (a, c)
    }
}

/// A copy of the folder `from` at `to` whose files are symbolic links.
fn link_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("the imported model (run ./dev build)") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            link_files(&entry.path(), &target);
        } else {
            std::os::unix::fs::symlink(entry.path(), &target).expect("symlink");
        }
    }
}

/// GET `path` on `s` with its admin token, as JSON.
pub async fn get_json(s: &Server, path: &str) -> serde_json::Value {
    client()
        .get(format!("{}{path}", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON")
}

/// The members that serve `model`, as `s` sees the cluster.
pub async fn served_by(s: &Server, model: &str) -> Vec<String> {
    let v = get_json(s, "/v1/cluster").await;
    v["models"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["name"] == model)
        .flat_map(|m| m["served_by"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// Requests live in `s`'s inference service now (0 without one).
pub async fn live_requests(s: &Server) -> u64 {
    get_json(s, "/v1/status").await["inference"]["live_requests"]
        .as_u64()
        .unwrap_or(0)
}
