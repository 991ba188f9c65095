//! The Grafana dashboard in `deploy/grafana/`: an importable dashboard
//! whose every query names a metric the real server exports. The live
//! check runs a small cluster (a member with the default model and one
//! that routes to it, over a real NATS server) so that every family the
//! dashboard reads, the cluster's routing included, has samples.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use slinfer_e2e::cluster::Setup;
use slinfer_e2e::{Nats, Server, client, package, package_variant, repo_root, wait_for};

const DASHBOARD: &str = "deploy/grafana/slinfer-dashboard.json";
const DATASOURCE: &str = "${datasource}";
const BOUND: Duration = Duration::from_secs(20);

/// Metrics the dashboard reads whose families stay empty (and so absent
/// from `/metrics`) until an event this test cannot cause cheaply, with the
/// source file that must register them under the quoted name.
const NOT_EXERCISED: &[(&str, &str, &str)] = &[(
    // Two models contending for one device's time slice or memory.
    "slinfer_llm_preemptions_total",
    "host/inference/src/metrics.rs",
    "\"preemptions\"",
)];

fn dashboard() -> Value {
    let path = repo_root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, those nested in collapsed rows included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The query variables' queries (a string, or an object since Grafana 10).
fn variable_queries(d: &Value) -> Vec<(&str, &str)> {
    d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            (
                v["name"].as_str().unwrap_or_default(),
                q.unwrap_or_default(),
            )
        })
        .collect()
}

/// Every PromQL expression: the panels' targets' and the variables'.
fn queries(d: &Value) -> Vec<String> {
    let targets = panels(d)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap_or_default().to_owned());
    let variables = variable_queries(d).into_iter().map(|(_, q)| q.to_owned());
    targets.chain(variables).collect()
}

/// The `slinfer_[a-z0-9_]+` names in `expr`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let part_of_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("slinfer_") {
        let starts_word = !rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let len = rest[at..]
            .find(|c: char| !part_of_name(c))
            .unwrap_or(rest.len() - at);
        if starts_word {
            names.insert(rest[at..at + len].to_owned());
        }
        rest = &rest[at + len..];
    }
    names
}

/// The sample names of a text exposition (`name{labels} value`).
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dashboard_is_an_importable_grafana_dashboard() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );
    assert!(!d["title"].as_str().unwrap_or_default().is_empty());
    assert!(!d["uid"].as_str().unwrap_or_default().is_empty());

    // The variables: a Prometheus data source, and node, model and function
    // whose All is `.*` (which also matches a server alone, without a node
    // label).
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().expect("a variable's name"), v))
        .collect();
    let ds = vars.get("datasource").expect("a datasource variable");
    assert_eq!(
        (&ds["type"], &ds["query"]),
        (&"datasource".into(), &"prometheus".into())
    );
    for name in ["node", "model", "function"] {
        let v = vars
            .get(name)
            .unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], DATASOURCE, "{name}");
        assert_eq!(v["multi"], true, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["allValue"], ".*", "{name}");
    }
    for (name, q) in variable_queries(&d) {
        assert!(q.starts_with("label_values("), "{name}: {q}");
        assert!(
            !metric_names(q).is_empty(),
            "{name} reads no slinfer metric: {q}"
        );
    }

    // Panels: unique ids, on the variable's data source, each target with
    // an expression filtered by node, laid out without overlapping.
    let all = panels(&d);
    assert!(all.iter().any(|p| p["type"] != "row"), "no panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        let id = p["id"].as_u64().unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "panel id {id} ({title}) is not unique");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24, "{title} is wider than the grid");
        for cell in (x..x + w).flat_map(|x| (y..y + h).map(move |y| (x, y))) {
            assert!(cells.insert(cell), "{title} overlaps another panel");
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], DATASOURCE, "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.is_empty(), "{title}: a target without expr");
            assert_eq!(t["datasource"]["uid"], DATASOURCE, "{title}: {expr}");
            assert!(refs.insert(t["refId"].to_string()), "{title}: refId twice");
            assert!(expr.contains("node=~\"$node\""), "{title}: {expr}");
            if expr.contains("_bucket") {
                assert!(
                    expr.contains("histogram_quantile(") && expr.contains("le)"),
                    "{title}: a bucket read other than by quantile: {expr}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let wanted: BTreeSet<String> = queries(&dashboard())
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    for (name, file, registered) in NOT_EXERCISED {
        assert!(
            wanted.contains(*name),
            "{name} is no longer on the dashboard"
        );
        let source = std::fs::read_to_string(repo_root().join(file)).expect(file);
        assert!(
            source.contains(registered),
            "{file} no longer registers {name}"
        );
    }

    // c serves the default model; a has no engine and routes to c.
    let nats = Nats::start();
    let setup = Setup::new();
    let (a, c) = setup.router_and_engine(&nats).await;
    // hello with one slot and no queue, so a second caller is refused.
    let hello = package_variant("hello", |m| {
        m.replace(
            "max_concurrency = 256",
            "max_concurrency = 1\nmax_queue = 0",
        )
    });
    a.deploy(hello.path());
    a.deploy(&package("chat"));
    let ready = wait_for(BOUND, || async {
        a.get("hello", "/").await.status() == 200 && a.get("chat", "/models").await.status() == 200
    })
    .await;
    assert!(
        ready.is_some(),
        "hello and chat never served on a: {}",
        a.log()
    );

    // A refused invocation (an error, and the function's queue) while a
    // slow one holds the slot (free again just after the last answer).
    let mut slow = None;
    for _ in 0..50 {
        let resp = a.get("hello", "/stream?chunks=10&delay_ms=300").await;
        if resp.status() == 200 {
            slow = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slow = slow.expect("hello's slot never came free");
    assert_eq!(a.get("hello", "/").await.status(), 429);
    slow.text().await.expect("the slow stream");

    // One short generation through a, run on c.
    let resp = client()
        .post(format!(
            "{}/fn/chat/?max_tokens=4&temperature=0&stream=false",
            a.url
        ))
        .body("Say hi.")
        .send()
        .await
        .expect("chat");
    let status = resp.status();
    let body = resp.text().await.expect("chat body");
    assert_eq!(status, 200, "{body}\n{}", a.log());

    // An invocation is counted once its instance has finished: wait.
    let missing = |exposed: &BTreeSet<String>| -> BTreeSet<String> {
        wanted
            .iter()
            .filter(|n| !exposed.contains(*n))
            .filter(|n| !NOT_EXERCISED.iter().any(|(x, _, _)| x == n))
            .cloned()
            .collect()
    };
    let members = [("a", &a), ("c", &c)];
    wait_for(BOUND, || async {
        missing(&exported(&members).await).is_empty()
    })
    .await;
    let exposed = exported(&members).await;
    let missing = missing(&exposed);
    assert!(
        missing.is_empty(),
        "{DASHBOARD} queries metrics no live server exports: {missing:?}\n\
         exported: {exposed:?}"
    );
    println!(
        "{} metrics on the dashboard, all exported (not exercised: {:?})",
        wanted.len(),
        NOT_EXERCISED.iter().map(|n| n.0).collect::<Vec<_>>()
    );
}

/// The sample names of the members' `/metrics`; every sample of a member
/// carries its `node` label.
async fn exported(members: &[(&str, &Server)]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (node, s) in members {
        let text = s.metrics().await;
        let label = format!("node=\"{node}\"");
        let unlabelled = text
            .lines()
            .find(|l| !l.is_empty() && !l.starts_with('#') && !l.contains(&label));
        assert!(unlabelled.is_none(), "{node}: {unlabelled:?}");
        names.extend(sample_names(&text));
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.5, sum by (le) (rate(slinfer_llm_ttft_seconds_bucket{node=~\"$node\"}[5m]))) / x_slinfer_no + slinfer_memory_bytes"
        ),
        BTreeSet::from([
            "slinfer_llm_ttft_seconds_bucket".to_owned(),
            "slinfer_memory_bytes".to_owned()
        ])
    );
}
