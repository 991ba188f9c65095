//! HTTP clients for `deploy`, `functions`, `models`, `status` and `invoke`.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use futures::StreamExt;

use super::{ClientArgs, FunctionsAction, ModelsAction, default_data_dir};
use crate::functions::package;
use crate::server::admin_token_path;
use slinfer_sandbox::limits::HostLimits;

#[derive(clap::Args, Debug)]
pub struct InvokeArgs {
    /// Function name.
    pub name: String,
    /// Path below the function (default `/`), with an optional query.
    pub path: Option<String>,
    /// Request body: a string, or `@file` to send a file.
    #[arg(short, long)]
    pub data: Option<String>,
    /// Method (default GET, or POST when --data is given).
    #[arg(short = 'X', long)]
    pub method: Option<String>,
    /// Extra header `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// Print the status line and response headers too.
    #[arg(short, long)]
    pub include: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn token(c: &ClientArgs) -> anyhow::Result<String> {
    if let Some(t) = &c.token {
        return Ok(t.clone());
    }
    let dir = c.data_dir.clone().unwrap_or_else(default_data_dir);
    let path = admin_token_path(&dir);
    let t = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no admin token: pass --token or SLINFER_ADMIN_TOKEN, or run next to the server (looked in {})",
            path.display()
        )
    })?;
    Ok(t.trim().to_owned())
}

fn url(c: &ClientArgs, path: &str) -> String {
    format!("{}{path}", c.server.trim_end_matches('/'))
}

/// Turn an error response into an error with the server's message.
async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    bail!("{status}: {message}")
}

/// GET an admin route's JSON.
async fn get_json(c: &ClientArgs, token: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let resp = reqwest::Client::new()
        .get(url(c, path))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("connecting to {}", c.server))?;
    Ok(check(resp).await?.json().await?)
}

/// DELETE an admin resource.
async fn delete(c: &ClientArgs, token: &str, path: &str) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .delete(url(c, path))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("connecting to {}", c.server))?;
    check(resp).await?;
    Ok(())
}

pub async fn deploy(c: &ClientArgs, dir: &Path) -> anyhow::Result<()> {
    let (manifest, archive) = package::pack(dir, &HostLimits::default())
        .with_context(|| format!("packing {}", dir.display()))?;
    let resp = reqwest::Client::new()
        .put(url(c, &format!("/v1/functions/{}", manifest.name)))
        .bearer_auth(token(c)?)
        .header("content-type", "application/gzip")
        .body(archive)
        .send()
        .await
        .with_context(|| format!("connecting to {}", c.server))?;
    let info: serde_json::Value = check(resp).await?.json().await?;
    println!(
        "deployed {} ({})",
        info["name"].as_str().unwrap_or_default(),
        info["digest"].as_str().unwrap_or_default()
    );
    Ok(())
}

pub async fn functions(c: &ClientArgs, action: FunctionsAction) -> anyhow::Result<()> {
    let token = token(c)?;
    match action {
        FunctionsAction::Ls => {
            let all: Vec<serde_json::Value> =
                serde_json::from_value(get_json(c, &token, "/v1/functions").await?)?;
            println!("{:<24} {:<16} {:>12}", "NAME", "DIGEST", "DEPLOYED_AT");
            for f in all {
                println!(
                    "{:<24} {:<16} {:>12}",
                    f["name"].as_str().unwrap_or_default(),
                    &f["digest"].as_str().unwrap_or_default()
                        [..12.min(f["digest"].as_str().unwrap_or_default().len())],
                    f["deployed_at_unix_s"]
                );
            }
        }
        FunctionsAction::Show { name } => {
            let info = get_json(c, &token, &format!("/v1/functions/{name}")).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        FunctionsAction::Rm { name } => {
            delete(c, &token, &format!("/v1/functions/{name}")).await?;
            println!("removed {name}");
        }
    }
    Ok(())
}

/// The package name a source imports under when `--name` is not given.
fn derived_name(source: &str) -> String {
    if source == "default" {
        return crate::models::DEFAULT_MODEL.to_string();
    }
    let p = Path::new(source.trim_end_matches('/'));
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.trim_start_matches(['.', '_', '-']).to_string()
}

async fn import_model(
    c: &ClientArgs,
    token: &str,
    source: &str,
    name: Option<String>,
) -> anyhow::Result<()> {
    let name = name.unwrap_or_else(|| derived_name(source));
    let req = reqwest::Client::new()
        .put(url(c, &format!("/v1/models/{name}")))
        .bearer_auth(token);
    let path = Path::new(source);
    let req = if source == "default" {
        req.json(&serde_json::json!({"source": "default"}))
    } else if path.is_dir() {
        let abs =
            std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        req.json(&serde_json::json!({"source": abs}))
    } else {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        eprintln!("uploading {}", path.display());
        req.header("content-type", "application/octet-stream")
            .body(reqwest::Body::from(file))
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("connecting to {}", c.server))?;
    let mut lines = check(resp).await?.bytes_stream();
    let mut buf = Vec::new();
    let mut last = serde_json::Value::Null;
    while let Some(chunk) = lines.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let v: serde_json::Value = serde_json::from_slice(&line)?;
            if let Some(p) = v["progress"].as_str() {
                eprintln!("{p}");
            } else {
                last = v;
            }
        }
    }
    if let Some(m) = last["error"]["message"].as_str() {
        bail!("{m}");
    }
    anyhow::ensure!(
        last["model"].is_object(),
        "the server ended the import without a result"
    );
    println!("imported {name}");
    Ok(())
}

pub async fn models(c: &ClientArgs, action: ModelsAction) -> anyhow::Result<()> {
    let token = token(c)?;
    match action {
        ModelsAction::Import { source, name } => {
            import_model(c, &token, &source, name).await?;
        }
        ModelsAction::Ls => {
            let all: Vec<serde_json::Value> =
                serde_json::from_value(get_json(c, &token, "/v1/models").await?)?;
            println!(
                "{:<32} {:<7} {:<8} {:>8} {:>12} {:>14}",
                "NAME", "KIND", "FAMILY", "CONTEXT", "KV_B/TOKEN", "WEIGHTS_BYTES"
            );
            let or_dash = |v: &serde_json::Value| {
                if v.is_null() {
                    "-".to_string()
                } else {
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                }
            };
            for m in all {
                println!(
                    "{:<32} {:<7} {:<8} {:>8} {:>12} {:>14}",
                    or_dash(&m["name"]),
                    or_dash(&m["kind"]),
                    or_dash(&m["family"]),
                    or_dash(&m["context_length_tokens"]),
                    or_dash(&m["kv_bytes_per_token"]),
                    or_dash(&m["weights_bytes"])
                );
            }
        }
        ModelsAction::Show { name } => {
            let info = get_json(c, &token, &format!("/v1/models/{name}")).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        ModelsAction::Rm { name } => {
            delete(c, &token, &format!("/v1/models/{name}")).await?;
            println!("removed {name}");
        }
    }
    Ok(())
}

pub async fn status(c: &ClientArgs) -> anyhow::Result<()> {
    let v = get_json(c, &token(c)?, "/v1/status").await?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `slinfer cluster status`: the members as the server sees them, one line
/// each, then the controller; `--json` prints the whole view.
pub async fn cluster_status(c: &ClientArgs, json: bool) -> anyhow::Result<()> {
    let v = get_json(c, &token(c)?, "/v1/cluster").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", cluster_table(&v));
    Ok(())
}

/// The text of `slinfer cluster status` for a `/v1/cluster` answer.
fn cluster_table(v: &serde_json::Value) -> String {
    let leader = &v["lease"]["leader"];
    let mut out = format!(
        "node {} · NATS {} ({}) · controller {}\n",
        v["node"].as_str().unwrap_or("?"),
        v["nats"].as_str().unwrap_or("?"),
        if v["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED"
        },
        match leader["node"].as_str() {
            Some(n) => format!("{n} (term {})", leader["term"]),
            None => "none yet".into(),
        },
    );
    out += &format!(
        "{:<16} {:<6} {:>9}  {:<28} {:>9}  {:<24} {}\n",
        "MEMBER", "STATE", "HEARTBEAT", "ADVERTISE", "FUNCTIONS", "DEVICES", "INSTANCES"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        let inference = &m["inference"];
        let devices: Vec<&str> = inference["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["name"].as_str())
            .collect();
        let instances: Vec<String> = inference["models"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|model| {
                model["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |i| {
                        format!(
                            "{}@{}",
                            model["name"].as_str().unwrap_or("?"),
                            i["device"].as_str().unwrap_or("?")
                        )
                    })
            })
            .collect();
        let controller = if m["controller"].as_bool() == Some(true) {
            "*"
        } else {
            ""
        };
        out += &format!(
            "{:<16} {:<6} {:>7}ms  {:<28} {:>9}  {:<24} {}\n",
            format!("{}{controller}", m["node"].as_str().unwrap_or("?")),
            if m["alive"].as_bool() == Some(true) {
                "alive"
            } else {
                "dead"
            },
            m["heartbeat_age_ms"],
            m["advertise"].as_str().unwrap_or("?"),
            m["functions"],
            if devices.is_empty() {
                "none (routes)".to_string()
            } else {
                devices.join(",")
            },
            if instances.is_empty() {
                "-".to_string()
            } else {
                instances.join(" ")
            },
        );
    }
    let models = v["models"].as_array().cloned().unwrap_or_default();
    if !models.is_empty() {
        out += &format!(
            "\n{:<32} {:>12}  {:<16} {}\n",
            "MODEL", "BYTES", "ORIGIN", "SERVED BY"
        );
    }
    for m in &models {
        let by: Vec<&str> = m["served_by"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str())
            .collect();
        out += &format!(
            "{:<32} {:>12}  {:<16} {}\n",
            m["name"].as_str().unwrap_or("?"),
            m["bytes"],
            m["origin"].as_str().unwrap_or("?"),
            if by.is_empty() {
                "-".to_string()
            } else {
                by.join(",")
            },
        );
    }
    let placed = v["books"]["placements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !placed.is_empty() {
        out += &format!(
            "\nPLACED BY THE CONTROLLER (latest last)\n{:<32} {:<16} {}\n",
            "MODEL", "ON", "WHY"
        );
    }
    for p in &placed {
        out += &format!(
            "{:<32} {:<16} {}\n",
            p["model"].as_str().unwrap_or("?"),
            p["node"].as_str().unwrap_or("?"),
            p["reason"].as_str().unwrap_or("?"),
        );
    }
    out
}

pub async fn invoke(a: InvokeArgs) -> anyhow::Result<()> {
    let path = a.path.as_deref().unwrap_or("/");
    let path = path.strip_prefix('/').unwrap_or(path);
    let body = match &a.data {
        Some(d) if d.starts_with('@') => {
            Some(std::fs::read(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?)
        }
        Some(d) => Some(d.clone().into_bytes()),
        None => None,
    };
    let method = match &a.method {
        Some(m) => reqwest::Method::from_bytes(m.to_uppercase().as_bytes())?,
        None if body.is_some() => reqwest::Method::POST,
        None => reqwest::Method::GET,
    };
    let mut req =
        reqwest::Client::new().request(method, url(&a.client, &format!("/fn/{}/{path}", a.name)));
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("header {h:?} is not `Name: value`"))?;
        req = req.header(k.trim(), v.trim());
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("connecting to {}", a.client.server))?;
    let status = resp.status();
    if a.include {
        println!("{status}");
        for (k, v) in resp.headers() {
            println!("{k}: {}", v.to_str().unwrap_or("<binary>"));
        }
        println!();
    }
    let mut out = std::io::stdout().lock();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    if !status.is_success() {
        bail!("the function answered {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_table_has_a_line_per_member_and_marks_the_controller() {
        let v = serde_json::json!({
            "node": "a", "nats": "nats://n:4222", "connected": true,
            "lease": {"leader": {"node": "b", "term": 3}, "held": false},
            "members": [
                {"node": "a", "alive": true, "heartbeat_age_ms": 120, "advertise": "http://a:8080",
                 "functions": 2, "controller": false, "inference": null},
                {"node": "b", "alive": false, "heartbeat_age_ms": 4100, "advertise": "http://b:8080",
                 "functions": 2, "controller": true,
                 "inference": {"devices": [{"name": "cpu:0"}],
                               "models": [{"name": "m", "instances": [{"device": "cpu:0"}]}]}}
            ]
        });
        let text = cluster_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "no models, no models table: {text}");
        assert!(lines[0].contains("controller b (term 3)") && lines[0].contains("connected"));
        assert!(
            lines[2].starts_with("a ")
                && lines[2].contains("alive")
                && lines[2].contains("none (routes)")
        );
        assert!(
            lines[3].starts_with("b* ")
                && lines[3].contains("dead")
                && lines[3].contains("m@cpu:0")
        );

        let mut v = v;
        v["models"] = serde_json::json!([
            {"name": "m", "bytes": 189, "origin": "b", "served_by": ["a", "b"]},
            {"name": "n", "bytes": 7, "origin": "a", "served_by": []},
        ]);
        let text = cluster_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        assert!(lines[5].starts_with("MODEL"));
        assert!(
            lines[6].starts_with("m ") && lines[6].ends_with("a,b"),
            "{text}"
        );
        assert!(
            lines[7].starts_with("n ") && lines[7].ends_with(" -"),
            "{text}"
        );

        // The controller's placement decisions, when it made any.
        v["books"] = serde_json::json!({"placements": [
            {"model": "m", "node": "b", "reason": "request", "at_unix_ms": 1},
            {"model": "n", "node": "a", "reason": "lost member", "at_unix_ms": 2},
        ]});
        let text = cluster_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13, "{text}");
        assert!(lines[9].starts_with("PLACED BY THE CONTROLLER"), "{text}");
        assert!(
            lines[11].starts_with("m ")
                && lines[11].contains(" b ")
                && lines[11].ends_with("request")
        );
        assert!(lines[12].starts_with("n ") && lines[12].ends_with("lost member"));
    }
}
