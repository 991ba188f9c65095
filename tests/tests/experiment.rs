//! The paper's experiment on the live host: `serve --policy`, `slinfer
//! profile` (a latency profile of this machine that `simulate` reads) and
//! `scripts/replay.py` (a trace slice sent to a live server, measured as
//! `simulate --json` reports a run). Real server, real OpenVINO engine,
//! real HTTP.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use slinfer_e2e::{
    Server, client, models_dir, package_variant, repo_root, shared_data, slinfer_bin, venv,
};

const MODEL: &str = "smollm2-135m-instruct";

/// The tests that load models take turns: each times or schedules real
/// work on the machine's few cores, which another test's loads would
/// distort (a cold start twice as slow misses a deadline).
static CPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cpu_turn() -> std::sync::MutexGuard<'static, ()> {
    CPU.lock().unwrap_or_else(|e| e.into_inner())
}

fn slinfer(args: &[&str]) -> Output {
    Command::new(slinfer_bin())
        .args(args)
        .env("SLINFER_VENV", venv())
        .env("SLINFER_CPU_ENGINE", "openvino")
        .output()
        .expect("run slinfer")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

/// `simulate` on the shared trace with `profile`, a CPU-only machine and
/// the live host's settings; its `--json` summary.
fn simulate_with(profile: &Path, extra: &[&str]) -> Value {
    let trace = shared_data().join("traces/azure-functions-128fn-30min.json");
    let mut args = vec![
        "simulate",
        "--trace",
        trace.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--model",
        MODEL,
        "--gpus",
        "0",
        "--cpus",
        "1",
        "--live-host",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = slinfer(&args);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("simulate --json")
}

/// A fresh models folder holding a copy of the imported default model (so
/// that what a test imports stays out of the project's `.data/models`).
fn models_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = models_dir().join(MODEL);
    let dst = dir.path().join(MODEL);
    std::fs::create_dir(&dst).expect("mkdir");
    for entry in std::fs::read_dir(&src).expect("default model imported (./dev setup)") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
        }
    }
    dir
}

#[test]
fn profile_writes_a_profile_that_simulate_predicts_a_run_with() {
    let _turn = cpu_turn();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("profile.json");
    let models = models_dir();
    let reference = shared_data().join("profiles/slinfer-artifact-latency-ms.json");
    let reference = reference.to_str().unwrap();
    let out = slinfer(&[
        "profile",
        "--models-dir",
        models.to_str().unwrap(),
        "--reference",
        reference,
        "--quick",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let p = json_file(&file);
    let cpu = &p["latency"][MODEL]["cpu"]["cpu"];
    for key in [
        "load_ms",
        "unload_ms",
        "kv_resize_ms",
        "kv_write_ms_per_gib",
    ] {
        assert!(
            cpu[key].as_f64().is_some_and(|ms| ms >= 0.0),
            "{key}: {cpu}"
        );
    }
    assert!(
        cpu["load_ms"].as_f64().unwrap() > 0.0,
        "a load takes time: {cpu}"
    );
    let decode = cpu["decode_ms_by_context_then_batch"].as_array().unwrap();
    assert!(!decode.is_empty(), "{cpu}");
    let slo = &p["slo_in_paper"];
    for key in ["tpot_s", "ttft_tokens_per_s", "ttft_min_s"] {
        assert!(slo[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {slo}");
    }
    assert!(p["machine"]["cpu"].is_string(), "{}", p["machine"]);
    assert_eq!(p["cluster_in_paper"]["cpu_nodes"], 1);

    // simulate reads it: the model, its SLOs, its CPU node.
    let s = simulate_with(&file, &["--functions", "8,16", "--duration-s", "120"]);
    assert_eq!(s["model"], MODEL);
    assert_eq!(
        (s["models"].as_u64(), s["cpus"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(s["requests"].as_u64().unwrap() > 0, "{s}");
    assert!(s["completed"].as_u64().unwrap() > 0, "{s}");
    assert!(s["cold_starts"].as_u64().unwrap() > 0, "{s}");

    // A model that is not there, and a reference model the reference
    // profile lacks: clear errors, no file.
    let none = dir.path().join("none.json");
    let out = slinfer(&[
        "profile",
        "--models-dir",
        models.to_str().unwrap(),
        "--model",
        "no-such-model",
        "--reference",
        reference,
        "--quick",
        "--out",
        none.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no model `no-such-model`"),
        "{}",
        text(&out)
    );
    let out = slinfer(&[
        "profile",
        "--models-dir",
        models.to_str().unwrap(),
        "--reference",
        reference,
        "--reference-model",
        "gpt-17",
        "--quick",
        "--out",
        none.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("gpt-17"), "{}", text(&out));
    assert!(!none.exists());
}

/// 30 seconds of `functions`' arrivals (the trace at twice its rate) with
/// the artifact's SLOs, written to `dir/requests.json` by `simulate
/// --requests-out`; the file and simulate's `--json` output.
fn slice_requests(dir: &Path, functions: &str) -> (std::path::PathBuf, Output) {
    let requests = dir.join("requests.json");
    let sim = slinfer_e2e::simulate(&[
        "--functions",
        functions,
        "--time-scale",
        "2",
        "--duration-s",
        "30",
        "--gpus",
        "0",
        "--cpus",
        "1",
        "--requests-out",
        requests.to_str().unwrap(),
        "--json",
    ]);
    assert!(sim.status.success(), "{}", text(&sim));
    (requests, sim)
}

#[test]
fn replay_of_a_trace_slice_accounts_for_every_request_in_the_simulators_contract() {
    let _turn = cpu_turn();
    let models = models_copy();
    let tmp = tempfile::tempdir().unwrap();
    let venv = venv();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &[
            ("SLINFER_VENV", venv.to_str().unwrap()),
            // Every engine run logged, for scripts/run_log.py below.
            ("SLINFER_LOG", "info,slinfer_inference=debug"),
        ],
        &["--models-dir", models.path().to_str().unwrap()],
    );
    // Four functions' slice.
    let (requests, sim) = slice_requests(tmp.path(), "8,16,24,32");
    let simulated: Value = serde_json::from_slice(&sim.stdout).unwrap();
    let file = json_file(&requests);
    let sent = file["requests"].as_array().unwrap().len();
    assert!(sent >= 4, "{file}");
    assert!(
        file["requests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["arrival_s"].as_f64().unwrap() < 30.0)
    );

    let out_file = tmp.path().join("live.json");
    let out = Command::new(venv.join("bin/python"))
        .arg(repo_root().join("scripts/replay.py"))
        .args(["--server", &server.url])
        .args(["--data-dir", server.data_dir.to_str().unwrap()])
        .args(["--models-dir", models.path().to_str().unwrap()])
        .args(["--requests", requests.to_str().unwrap()])
        .args(["--out", out_file.to_str().unwrap()])
        .args(["--slinfer", slinfer_bin().to_str().unwrap()])
        .args(["--timeout-s", "240"])
        .arg("--per-request")
        .output()
        .expect("run replay.py");
    assert!(out.status.success(), "{}\n{}", text(&out), server.log());
    let live = json_file(&out_file);

    // Every field of the simulator's contract, and the run's own.
    for key in simulated.as_object().unwrap().keys() {
        assert!(live.get(key).is_some(), "live result lacks `{key}`: {live}");
    }
    assert_eq!(live["live"], true);
    assert_eq!(live["policy"], "slinfer");
    assert_eq!(live["models"], 4);
    let n = |k: &str| live[k].as_u64().unwrap_or_else(|| panic!("{k}: {live}")) as usize;
    assert_eq!(n("sent"), sent);
    assert_eq!(n("requests"), sent);
    assert_eq!(
        n("slo_met") + n("missed") + n("dropped") + n("errored"),
        sent,
        "{live}"
    );
    assert_eq!(n("completed"), n("slo_met") + n("missed"));
    assert_eq!(n("errored"), 0, "nothing failed: {live}");
    assert!(n("completed") > 0, "{live}");
    assert!(n("cold_starts") >= 1, "{live}");
    // The CPU ran the replay's iterations for part of the makespan.
    let busy = live["by_kind"]["cpu"]["busy_fraction"].as_f64();
    assert!(busy.is_some_and(|b| b > 0.0 && b <= 1.0), "{live}");
    assert_eq!(live["prompt_length_mismatches"], 0, "{live}");
    assert_eq!(live["per_request"].as_array().unwrap().len(), sent);
    run_log_spreads_the_servers_runs_around_a_profile(&server.log(), tmp.path());
}

#[test]
fn a_replay_through_cluster_members_routes_to_the_engine_member_and_accounts_for_every_request() {
    let _turn = cpu_turn();
    // Member c serves the models on the CPU; a and b only run functions
    // and route their generations to c (as `experiment.py
    // --cluster-policies` runs the experiment).
    let nats = slinfer_e2e::Nats::start();
    let setup = slinfer_e2e::cluster::Setup::new();
    let c = setup.engine_member_with_model(&nats, "c");
    let a = setup.member(&nats, "a");
    let b = setup.member(&nats, "b");
    let tmp = tempfile::tempdir().unwrap();
    let (requests, _) = slice_requests(tmp.path(), "8,16");
    let sent = json_file(&requests)["requests"].as_array().unwrap().len();
    assert!(sent >= 3, "{sent} requests");

    let out_file = tmp.path().join("live.json");
    let members = format!("{},{},{}", a.url, b.url, c.url);
    let out = Command::new(venv().join("bin/python"))
        .arg(repo_root().join("scripts/replay.py"))
        .args(["--server", &c.url, "--token", &c.token])
        .args(["--data-dir", c.data_dir.to_str().unwrap()])
        .args([
            "--models-dir",
            setup.tmp.path().join("c/models").to_str().unwrap(),
        ])
        .args(["--requests", requests.to_str().unwrap()])
        .args(["--out", out_file.to_str().unwrap()])
        .args(["--slinfer", slinfer_bin().to_str().unwrap()])
        .args(["--send-to", &members])
        .args(["--timeout-s", "240"])
        .output()
        .expect("run replay.py");
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out),
        c.log(),
        a.log()
    );
    let live = json_file(&out_file);
    let n = |k: &str| live[k].as_u64().unwrap_or_else(|| panic!("{k}: {live}")) as usize;
    assert_eq!(n("sent"), sent);
    assert_eq!(
        n("slo_met") + n("missed") + n("dropped") + n("errored"),
        sent,
        "{live}"
    );
    assert_eq!(n("errored"), 0, "nothing failed: {live}\n{}", a.log());
    assert!(n("completed") > 0, "{live}");
    let sent_to: Vec<&str> = live["sent_to"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(sent_to, [&a.url, &b.url, &c.url]);
    // The requests a and b took were generated on c.
    let answered = slinfer_e2e::metric(
        &tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(c.metrics()),
        "slinfer_answered_generations_total",
        &[],
    );
    let routed_to_c = sent.div_ceil(3) + (sent + 1) / 3;
    assert!(
        answered > 0.0 && answered <= routed_to_c as f64,
        "c answered {answered} generations; a and b were sent {routed_to_c} requests"
    );
}

/// `scripts/run_log.py` on the log of a replay: the spread of live run
/// time over a profile's (quantiles, written into the profile with
/// `--write`); a log without runs is refused, naming the setting that logs
/// them.
fn run_log_spreads_the_servers_runs_around_a_profile(log: &str, dir: &Path) {
    let log_file = dir.join("serve.log");
    std::fs::write(&log_file, log).unwrap();
    // Flat tables: 100 ms a prefill, 20 ms a decode step (a test's figures,
    // not this machine's).
    let profile = dir.join("flat-profile.json");
    let tables = serde_json::json!({
        "prefill_ms_by_input_tokens": [[16, 100.0], [4096, 100.0]],
        "decode_ms_by_context_then_batch": [[128, [[1, 20.0], [16, 20.0]]]],
    });
    std::fs::write(
        &profile,
        serde_json::json!({"latency": {MODEL: {"cpu": {"cpu": tables}}}}).to_string(),
    )
    .unwrap();
    let run_log = |log: &Path, write: bool| {
        Command::new(venv().join("bin/python"))
            .arg(repo_root().join("scripts/run_log.py"))
            .args(["--log", log.to_str().unwrap()])
            .args(["--profile", profile.to_str().unwrap()])
            .args(write.then_some("--write"))
            .output()
            .expect("run run_log.py")
    };
    let out = run_log(&log_file, true);
    assert!(out.status.success(), "{}", text(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let q: Vec<f64> = printed["step_time_spread"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(q.len(), 21, "{q:?}");
    assert!(q[0] > 0.0 && q.windows(2).all(|w| w[0] <= w[1]), "{q:?}");
    let written = &json_file(&profile)["latency"][MODEL]["cpu"]["cpu"];
    assert_eq!(written["step_time_spread"], printed["step_time_spread"]);
    assert_eq!(
        written["prefill_time_spread"],
        printed["prefill_time_spread"]
    );
    // Prefill and decode runs apart: 25 prefills 1.2 times the flat
    // profile's 100 ms and 25 decode steps at its 20 ms.
    let mixed = dir.join("mixed.log");
    let line = |ms: f64, prefill: u32, batch: u32| {
        format!(
            "DEBUG slinfer_inference::runner: run instance=0 model={MODEL} ms={ms} \
             prefill_tokens={prefill} decode_batch={batch} decode_context={}\n",
            batch * 64
        )
    };
    let text_log: String = (0..25)
        .map(|_| line(120.0, 64, 0) + &line(20.0, 0, 2))
        .collect();
    std::fs::write(&mixed, text_log).unwrap();
    let out = run_log(&mixed, false);
    assert!(out.status.success(), "{}", text(&out));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["step_time_spread"], Value::from(vec![1.0; 21]));
    assert_eq!(printed["prefill_time_spread"], Value::from(vec![1.2; 21]));
    // A log with no runs in it.
    let quiet = dir.join("quiet.log");
    std::fs::write(&quiet, "INFO slinfer::server: listening\n").unwrap();
    let out = run_log(&quiet, false);
    assert!(!out.status.success());
    assert!(text(&out).contains("SLINFER_LOG"), "{}", text(&out));
}

/// Two models' requests at once on a server with `--policy`; the most
/// instances the CPU held together while both ran, as the status showed.
/// A server under `policy` (and `extra` flags) with the default model and
/// a copy named `twin`, and `openai-api` allowed both (60 s TTFT SLO).
struct Twins {
    server: Server,
    _models: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl Twins {
    fn start(policy: &str, keep_alive_s: &str, extra: &[&str]) -> Twins {
        let models = models_copy();
        let tmp = tempfile::tempdir().unwrap();
        let venv = venv();
        let mut args = vec![
            "--models-dir",
            models.path().to_str().unwrap(),
            "--policy",
            policy,
            "--keep-alive-s",
            keep_alive_s,
        ];
        args.extend_from_slice(extra);
        let server = Server::start_with(
            &tmp.path().join("data"),
            &[("SLINFER_VENV", venv.to_str().unwrap())],
            &args,
        );
        let gguf = models.path().join(MODEL).join("model.gguf");
        let (ok, _, err) =
            server.cli(&["models", "import", gguf.to_str().unwrap(), "--name", "twin"]);
        assert!(ok, "{err}");
        let api = package_variant("openai-api", |m| {
            m.replace(
                "MODELS = \"smollm2-135m-instruct\"",
                "MODELS = \"smollm2-135m-instruct,twin\"",
            )
            .replace(
                "allowed = [\"smollm2-135m-instruct\"]",
                "allowed = [\"smollm2-135m-instruct\", \"twin\"]",
            )
            .replace("ttft_ms = 5000", "ttft_ms = 60000")
        });
        server.deploy(api.path());
        Twins {
            server,
            _models: models,
            _data: tmp,
        }
    }

    async fn status(&self) -> Value {
        slinfer_e2e::cluster::get_json(&self.server, "/v1/status").await
    }

    /// Instances of each model, by name.
    async fn instances(&self) -> Vec<(String, usize)> {
        self.status().await["inference"]["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let n = m["instances"].as_array().map_or(0, Vec::len);
                (m["name"].as_str().unwrap_or_default().to_owned(), n)
            })
            .collect()
    }

    /// 24 greedy tokens of `model`, checked.
    fn generate(&self, model: &'static str) -> impl std::future::Future<Output = ()> + use<> {
        let url = format!("{}/fn/openai-api/v1/completions", self.server.url);
        let log = slinfer_e2e::log_path(&self.server.data_dir);
        async move {
            let r = client()
                .post(url)
                .json(&serde_json::json!({
                    "model": model, "prompt": "Once upon a time", "max_tokens": 24,
                    "min_tokens": 24, "ignore_eos": true, "temperature": 0
                }))
                .send()
                .await
                .unwrap();
            let code = r.status();
            let body: Value = r.json().await.unwrap();
            assert_eq!(
                code,
                200,
                "{model}: {body}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            assert_eq!(body["usage"]["completion_tokens"], 24, "{model}: {body}");
        }
    }
}

async fn most_instances_at_once(policy: &str) -> usize {
    let t = Twins::start(policy, "1", &[]);
    assert_eq!(t.status().await["inference"]["policy"], policy);
    let both = tokio::spawn({
        let (a, b) = (t.generate(MODEL), t.generate("twin"));
        async move { tokio::join!(a, b) }
    });
    let mut most = 0;
    let started = Instant::now();
    while !both.is_finished() && started.elapsed() < Duration::from_secs(120) {
        let on_cpu: usize = t.instances().await.iter().map(|m| m.1).sum();
        most = most.max(on_cpu);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    both.await.unwrap();
    most
}

#[test]
fn sllm_gives_the_cpu_to_one_model_at_a_time_and_slinfer_shares_it() {
    let _turn = cpu_turn();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // sllm: the second model waits for the first's instance to go (its
    // keep-alive) and then has the CPU to itself; both are served.
    assert_eq!(rt.block_on(most_instances_at_once("sllm")), 1);
    // slinfer: both instances share the CPU at once.
    assert_eq!(rt.block_on(most_instances_at_once("slinfer")), 2);
}

#[test]
fn an_idle_instance_held_by_its_keep_alive_gives_way_to_another_model() {
    let _turn = cpu_turn();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The memory budget holds one instance and its KV, not two (an
        // instance's weights and runtime take about 410 MB; the rest of
        // the process 150-210 MB, depending on the CPU); the first
        // model's stays loaded for 300 s after its request, far past the
        // second's 60 s deadline, so it unloads for the second rather than
        // keep it waiting.
        let t = Twins::start("slinfer", "300", &["--memory-budget", "700MiB"]);
        t.generate(MODEL).await;
        // The probes (every 250 ms) see the first model's instance idle.
        let admission = |status: &Value, model: &str| {
            status["inference"]["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == model)
                .map(|m| m["admission"].clone())
        };
        let mut idle = t.status().await;
        let since = Instant::now();
        while admission(&idle, "twin") != Some("new_after_unload".into())
            && since.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            idle = t.status().await;
        }
        assert_eq!(
            admission(&idle, "twin"),
            Some("new_after_unload".into()),
            "{idle}"
        );
        assert_eq!(admission(&idle, MODEL), Some("existing".into()), "{idle}");
        let took = Instant::now();
        t.generate("twin").await;
        assert!(took.elapsed() < Duration::from_secs(60));
        let now = t.instances().await;
        assert!(now.contains(&(MODEL.to_owned(), 0)), "{now:?}");
        assert!(now.contains(&("twin".to_owned(), 1)), "{now:?}");
    });
}

#[test]
fn an_unknown_policy_a_bad_keep_alive_an_idle_kv_or_a_bad_profile_is_refused_at_start() {
    let artifact = shared_data().join("profiles/slinfer-artifact-latency-ms.json");
    let artifact = format!("--profile={}", artifact.display());
    for (flags, says) in [
        (vec!["--policy=fifo"], "unknown policy `fifo`"),
        (vec!["--keep-alive-s=-1"], "not a number of seconds"),
        (vec!["--keep-alive-s=soon"], "not a number of seconds"),
        (
            vec!["--idle-kv-tokens=lots"],
            "invalid value 'lots' for '--idle-kv-tokens",
        ),
        (
            vec!["--idle-kv-tokens=-1"],
            "invalid value '-1' for '--idle-kv-tokens",
        ),
        (
            vec!["--profile=/no/such/profile.json"],
            "reading profile /no/such/profile.json",
        ),
        (
            vec![&artifact, "--profile-model=gpt-17"],
            "model `gpt-17` is not in the profile",
        ),
        (vec!["--profile-model=gpt-17"], "--profile <PROFILE>"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new(slinfer_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(tmp.path())
            .args(&flags)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(text(&out).contains(says), "{}", text(&out));
    }
}
