//! `slinfer simulate`, end to end: the real binary on a slice of the real
//! trace and profile; checks the `--json` contract scripts depend on and the
//! paper's ordering of policies.

use serde_json::Value;
use slinfer_e2e::simulate;

fn json(extra: &[&str]) -> Value {
    let out = simulate(extra);
    assert!(
        out.status.success(),
        "simulate {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn check_run_contract(run: &Value) {
    for key in [
        "policy",
        "models",
        "requests",
        "slo_met",
        "slo_attainment",
        "dropped",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "tpot_p99_s",
        "avg_nodes_in_use",
        "preemptions",
        "cold_starts",
        "nodes",
    ] {
        assert!(run.get(key).is_some(), "missing `{key}` in {run}");
    }
    let nodes = run["nodes"].as_array().expect("nodes is an array");
    assert!(!nodes.is_empty());
    for n in nodes {
        let cap = n["capacity_bytes"].as_u64().expect("capacity_bytes");
        let peak = n["peak_committed_bytes"]
            .as_u64()
            .expect("peak_committed_bytes");
        assert!(peak <= cap, "peak {peak} over capacity {cap}");
        assert!(matches!(n["kind"].as_str(), Some("gpu" | "cpu")));
    }
    let requests = run["requests"].as_u64().unwrap();
    let met = run["slo_met"].as_u64().unwrap();
    assert!(met <= requests);
    let ratio = run["slo_attainment"].as_f64().unwrap();
    assert!((ratio - met as f64 / requests as f64).abs() < 1e-9);
}

#[test]
fn single_runs_keep_the_json_contract_and_the_papers_order() {
    let slo_met = |policy: &str| {
        let run = json(&[
            "--policy",
            policy,
            "--models-per-group",
            "8",
            "--gpus",
            "4",
            "--duration-s",
            "180",
            "--json",
        ]);
        check_run_contract(&run);
        assert_eq!(run["policy"], policy);
        assert_eq!(run["models"], 128);
        assert_eq!(run["nodes"].as_array().unwrap().len(), 4);
        run["slo_met"].as_u64().unwrap()
    };
    let (sllm, shared, slinfer) = (slo_met("sllm"), slo_met("sllm+c+s"), slo_met("slinfer"));
    assert!(
        slinfer >= shared && shared >= sllm,
        "order broken: slinfer {slinfer}, sllm+c+s {shared}, sllm {sllm}"
    );
    assert!(
        slinfer > sllm,
        "sharing should serve more than exclusive GPUs"
    );
}

#[test]
fn sweep_reports_runs_capacity_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("figs");
    let report = json(&[
        "--sweep",
        "--policies",
        "sllm,slinfer,slinfer+p",
        "--ks",
        "1,2",
        "--gpus",
        "2",
        "--cpus",
        "1",
        "--duration-s",
        "120",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
        "--html",
        dir.path().join("report.html").to_str().unwrap(),
    ]);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 6);
    for r in runs {
        check_run_contract(r);
    }
    let models: Vec<u64> = runs.iter().map(|r| r["models"].as_u64().unwrap()).collect();
    assert_eq!(models, vec![16, 16, 16, 32, 32, 32]);
    let cap = report["capacity"].as_object().expect("capacity");
    for p in ["sllm", "slinfer", "slinfer+p"] {
        let c = cap[p].as_u64().expect("capacity per policy");
        assert!(c == 0 || c == 16 || c == 32);
    }
    let page = check_html_report(
        &dir.path().join("report.html"),
        &["sllm", "slinfer", "slinfer+p"],
        6,
        3,
    );
    assert!(
        page.contains("<dd>sllm, slinfer, slinfer+p</dd>"),
        "settings"
    );
    for f in ["goodput.svg", "nodes.svg", "ttft-cdf.svg"] {
        let text = std::fs::read_to_string(svg.join(f)).expect(f);
        assert!(text.starts_with("<svg") && text.contains("slinfer"), "{f}");
        // The HTML report holds the same figure inline.
        assert!(page.contains(&text), "{f} is not in the report");
    }
}

/// The `--html` page at `path`: self-contained, its summary table with
/// `rows` rows (each of `policies` among them), `figures` inline SVGs, each
/// captioned. Returns the page.
fn check_html_report(
    path: &std::path::Path,
    policies: &[&str],
    rows: usize,
    figures: usize,
) -> String {
    let page = std::fs::read_to_string(path).expect("the HTML report");
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("<title>slinfer simulate report</title>"));
    assert!(page.contains("<table id=\"summary\">"));
    assert_eq!(page.matches("<tr><td>").count(), rows, "a row per run");
    for p in policies {
        assert!(page.contains(&format!("<tr><td>{p}</td>")), "{p}");
    }
    assert_eq!(page.matches("<figure>").count(), figures);
    assert_eq!(page.matches("<figcaption>").count(), figures);
    assert_eq!(page.matches("<svg").count(), figures);
    for outside in ["src=", "href=", "<script", "<link", "https://"] {
        assert!(!page.contains(outside), "{outside}");
    }
    page
}

#[test]
fn a_single_run_writes_an_html_report_with_its_row_and_ttft_cdf() {
    let dir = tempfile::tempdir().unwrap();
    // A name that must be escaped where the page shows the command line.
    let file = dir.path().join("a <run> & \"it\".html");
    let out = simulate(&[
        "--policy",
        "sllm",
        "--models-per-group",
        "2",
        "--gpus",
        "2",
        "--duration-s",
        "60",
        "--html",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = check_html_report(&file, &["sllm"], 1, 1);
    assert!(page.contains("TTFT CDF"));
    assert!(page.contains("a &lt;run&gt; &amp; &quot;it&quot;.html"));
    assert!(!page.contains("<run>"));
}

#[test]
fn an_html_report_that_cannot_be_written_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no-such-dir/report.html");
    let out = simulate(&["--duration-s", "30", "--html", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("writing {}", bad.display())), "{err}");
    assert!(
        !err.contains("simulated in"),
        "refused after the run: {err}"
    );
    assert!(!bad.exists());
}

#[test]
fn unknown_policy_is_refused_with_the_known_names() {
    let out = simulate(&["--policy", "fastest", "--json"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sllm+c+s") && err.contains("slinfer+p"),
        "{err}"
    );
}

#[test]
fn a_cluster_run_keeps_the_contract_and_bad_cluster_flags_are_refused() {
    let args = [
        "--models-per-group",
        "2",
        "--gpus",
        "2",
        "--cpus",
        "1",
        "--duration-s",
        "120",
        "--json",
    ];
    let one = json(&args);
    let run = json(&[&args[..], &["--cluster"]].concat());
    check_run_contract(&run);
    assert!(one["cluster"].is_null() && one["routing_retries"] == 0);
    assert_eq!(run["cluster"]["publish_every_s"], 0.25);
    assert_eq!(run["cluster"]["hop_s"], 0.001);
    assert_eq!(run["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(run["requests"], one["requests"]);

    let refused = |extra: &[&str], says: &str| {
        let out = simulate(&[&args[..], extra].concat());
        assert!(!out.status.success(), "{extra:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
    };
    refused(
        &["--cluster", "--publish-ms", "0"],
        "--publish-ms must be > 0",
    );
    refused(&["--cluster", "--hop-ms=-1"], "--hop-ms >= 0");
    // The cluster's knobs without --cluster would be silently ignored.
    refused(&["--hop-ms", "5"], "--cluster");
}

#[test]
fn per_request_records_account_for_every_request_in_trace_order() {
    let run = json(&[
        "--models-per-group",
        "4",
        "--gpus",
        "1",
        "--cpus",
        "1",
        "--duration-s",
        "120",
        "--json",
        "--per-request",
    ]);
    check_run_contract(&run);
    let records = run["per_request"].as_array().expect("per_request");
    assert_eq!(records.len() as u64, run["requests"].as_u64().unwrap());
    let count = |outcome: &str| records.iter().filter(|r| r["outcome"] == outcome).count() as u64;
    assert_eq!(count("met"), run["slo_met"].as_u64().unwrap());
    assert_eq!(count("dropped"), run["dropped"].as_u64().unwrap());
    assert_eq!(
        count("met") + count("missed"),
        run["completed"].as_u64().unwrap()
    );
    assert_eq!(count("unfinished"), 0);
    let mut last = f64::NEG_INFINITY;
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["index"].as_u64(), Some(i as u64), "{r}");
        let arrival = r["arrival_s"].as_f64().unwrap();
        assert!(arrival >= last, "out of trace order: {r}");
        last = arrival;
        let completed = matches!(r["outcome"].as_str(), Some("met" | "missed"));
        assert_eq!(r.get("ttft_s").is_some(), completed, "{r}");
        assert_eq!(r.get("tpot_s").is_some(), completed, "{r}");
        assert_eq!(r.get("reason").is_some(), r["outcome"] == "dropped", "{r}");
        assert!(r["load_delay_s"].as_f64().unwrap() >= 0.0, "{r}");
    }
    // Without --json there is nothing to add the records to.
    let out = simulate(&["--per-request"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
