//! A cluster of real `slinfer serve --cluster` members on loopback, sharing
//! state through a real NATS server with JetStream (from the project
//! virtualenv): deploy anywhere and serve everywhere, the controller's
//! failover, NATS and member restarts, concurrent deploys, and the errors
//! of a bad setup. Each wait is bounded; the figures for how fast are in
//! BENCHMARKS.md, not asserted here.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slinfer_e2e::cluster::{Setup, get_json};
use slinfer_e2e::{
    Nats, Server, client, error_of, package, package_variant, slinfer_bin, wait_for,
};

const BOUND: Duration = Duration::from_secs(15);

async fn version_of(s: &Server, name: &str) -> Option<String> {
    let resp = client()
        .get(format!("{}/v1/functions/{name}", s.url))
        .bearer_auth(&s.token)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    v["version"].as_str().map(str::to_owned)
}

async fn serves(s: &Server, name: &str) -> bool {
    s.get(name, "/").await.status().is_success()
}

async fn leader_seen_by(s: &Server) -> Option<(String, u64)> {
    let v = get_json(s, "/v1/cluster").await;
    let l = &v["lease"]["leader"];
    Some((l["node"].as_str()?.to_owned(), l["term"].as_u64()?))
}

#[tokio::test]
async fn a_deploy_through_one_member_serves_from_every_member() {
    let nats = Nats::start();
    let setup = Setup::new();
    let a = setup.member(&nats, "a");
    let b = setup.member(&nats, "b");
    let c = setup.member(&nats, "c");

    // Replaced twice: only the package serving stays stored.
    for i in 0..3 {
        let variant = package_variant("hello", |t| format!("{t}\n# {i}\n"));
        a.deploy(variant.path());
    }
    assert_eq!(get_json(&b, "/v1/cluster").await["packages"]["count"], 1);
    a.deploy(&package("hello"));
    let version = version_of(&a, "hello").await.expect("a serves hello");
    for m in [&b, &c] {
        let took = wait_for(BOUND, || async {
            version_of(m, "hello").await.as_deref() == Some(version.as_str())
        })
        .await;
        assert!(
            took.is_some(),
            "{} never served {version}:\n{}",
            m.url,
            m.log()
        );
    }
    let body = b.get("hello", "/").await.text().await.unwrap();
    assert_eq!(body, a.get("hello", "/").await.text().await.unwrap());

    // Everyone sees three live members and one controller.
    let all_alive = || async {
        let v = get_json(&c, "/v1/cluster").await;
        let members = v["members"].as_array().cloned().unwrap_or_default();
        members.len() == 3
            && members.iter().all(|m| m["alive"] == true)
            && v["lease"]["leader"]["node"].is_string()
    };
    assert!(
        wait_for(BOUND, all_alive).await.is_some(),
        "{}",
        get_json(&c, "/v1/cluster").await
    );
    let (ok, out, err) = b.cli(&["cluster", "status"]);
    assert!(ok, "{err}");
    for node in ["a", "b", "c"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(node) && l.contains("alive")),
            "{out}"
        );
    }
    assert!(out.contains("none (routes)"), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l
                .split_whitespace()
                .next()
                .is_some_and(|n| n.ends_with('*')))
            .count(),
        1,
        "one controller: {out}"
    );
    let status = get_json(&a, "/v1/status").await;
    assert_eq!(status["cluster"]["node"], "a");
    assert_eq!(status["cluster"]["members_alive"], 3);

    // /metrics is labelled by node.
    let m = c.metrics().await;
    assert!(m.contains("node=\"c\""), "{m}");

    // A removal through another member reaches everyone.
    let (ok, _, err) = c.cli(&["functions", "rm", "hello"]);
    assert!(ok, "{err}");
    for m in [&a, &b, &c] {
        let gone = wait_for(BOUND, || async { !serves(m, "hello").await }).await;
        assert!(gone.is_some(), "hello still served on {}", m.url);
    }
    // Removing it again is a 404 everywhere, and no package is left.
    let (ok, _, err) = a.cli(&["functions", "rm", "hello"]);
    assert!(!ok && err.contains("404"), "{err}");
    assert_eq!(get_json(&a, "/v1/cluster").await["packages"]["count"], 0);
}

#[tokio::test]
async fn the_controller_fails_over_and_a_restarted_member_catches_up() {
    let nats = Nats::start();
    let setup = Setup::new();
    let mut members = vec![
        setup.member(&nats, "a"),
        setup.member(&nats, "b"),
        setup.member(&nats, "c"),
    ];
    members[0].deploy(&package("hello"));
    let (first, term) = {
        let seen = wait_for(BOUND, || async {
            leader_seen_by(&members[1]).await.is_some()
        })
        .await;
        assert!(seen.is_some(), "no controller elected");
        leader_seen_by(&members[1]).await.unwrap()
    };
    let i = ["a", "b", "c"].iter().position(|n| *n == first).unwrap();
    let mut dead = members.remove(i);
    dead.kill();
    let killed_at = Instant::now();

    let survivor = &members[0];
    let took_over = wait_for(BOUND, || async {
        leader_seen_by(survivor)
            .await
            .is_some_and(|(node, t)| node != first && t > term)
    })
    .await;
    assert!(
        took_over.is_some(),
        "no takeover: {}",
        get_json(survivor, "/v1/cluster").await
    );
    println!(
        "controller takeover {:?} after kill -9",
        killed_at.elapsed()
    );
    let counted_dead = wait_for(BOUND, || async {
        let v = get_json(survivor, "/v1/cluster").await;
        v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["node"] == first.as_str() && m["alive"] == false)
    })
    .await;
    assert!(counted_dead.is_some());
    // Nothing was lost: the function still serves everywhere.
    for m in &members {
        assert!(serves(m, "hello").await);
    }

    // While the member is down: a new function, and hello removed.
    let other = package_variant("hello", |t| {
        t.replace("name = \"hello\"", "name = \"hello-two\"")
    });
    members[1].deploy(other.path());
    let (ok, _, err) = members[0].cli(&["functions", "rm", "hello"]);
    assert!(ok, "{err}");

    let back = dead.restart();
    let caught_up = wait_for(BOUND, || async {
        serves(&back, "hello-two").await && !serves(&back, "hello").await
    })
    .await;
    assert!(caught_up.is_some(), "{}", back.log());
}

#[tokio::test]
async fn a_member_that_stops_cleanly_hands_over_and_leaves() {
    let nats = Nats::start();
    let setup = Setup::new();
    let mut members = vec![setup.member(&nats, "a"), setup.member(&nats, "b")];
    let elected = wait_for(BOUND, || async {
        leader_seen_by(&members[1]).await.is_some()
    })
    .await;
    assert!(elected.is_some(), "no controller elected");
    let (first, term) = leader_seen_by(&members[1]).await.unwrap();
    let i = if first == "a" { 0 } else { 1 };
    let mut leaving = members.remove(i);
    let status = leaving
        .terminate(BOUND)
        .expect("the member stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        leaving.log().contains("lease handed back"),
        "{}",
        leaving.log()
    );
    let stays = &members[0];
    // Taken over without waiting out the lease, and the member is gone from
    // the view rather than counted dead.
    let took_over = wait_for(BOUND, || async {
        leader_seen_by(stays)
            .await
            .is_some_and(|(n, t)| n != first && t > term)
    })
    .await;
    assert!(
        took_over.is_some(),
        "{}",
        get_json(stays, "/v1/cluster").await
    );
    println!("controller handed over {took_over:?} after SIGTERM returned");
    let left = wait_for(BOUND, || async {
        let v = get_json(stays, "/v1/cluster").await;
        v["members"].as_array().is_some_and(|m| m.len() == 1)
    })
    .await;
    assert!(left.is_some(), "{}", get_json(stays, "/v1/cluster").await);
}

#[tokio::test]
async fn members_carry_on_through_a_nats_restart() {
    let mut nats = Nats::start();
    let setup = Setup::new();
    let a = setup.member(&nats, "a");
    let b = setup.member(&nats, "b");
    a.deploy(&package("hello"));
    assert!(wait_for(BOUND, || serves(&b, "hello")).await.is_some());
    let v1 = version_of(&a, "hello").await.unwrap();

    nats.stop();
    let healthz = |s: &Server| {
        let url = format!("{}/healthz", s.url);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let said = wait_for(BOUND, || async {
        healthz(&a).await.contains("disconnected")
    })
    .await;
    assert!(said.is_some(), "{}", healthz(&a).await);
    let logged = wait_for(BOUND, || async {
        a.log().contains("lost the NATS connection")
    })
    .await;
    assert!(logged.is_some(), "{}", a.log());
    // Both keep serving what they have.
    assert!(serves(&a, "hello").await && serves(&b, "hello").await);
    // A deploy cannot be stored once: a clear, retryable 503, and the
    // serving version is untouched.
    let variant = package_variant("hello", |t| t + "\n# v2\n");
    let (ok, _, err) = a.cli(&["deploy", variant.path().to_str().unwrap()]);
    assert!(
        !ok && err.contains("503") && err.contains("cluster"),
        "{err}"
    );
    assert_eq!(version_of(&a, "hello").await.as_deref(), Some(v1.as_str()));

    nats.restart();
    for m in [&a, &b] {
        let ok = wait_for(BOUND, || async { healthz(m).await == "ok\n" }).await;
        assert!(ok.is_some(), "{}", m.log());
    }
    a.deploy(variant.path());
    let v2 = version_of(&a, "hello").await.unwrap();
    assert_ne!(v1, v2);
    let reached = wait_for(BOUND, || async {
        version_of(&b, "hello").await.as_deref() == Some(v2.as_str())
    })
    .await;
    assert!(reached.is_some(), "{}", b.log());
}

#[tokio::test]
async fn concurrent_deploys_of_one_name_converge() {
    let nats = Nats::start();
    let setup = Setup::new();
    let members = [
        setup.member(&nats, "a"),
        setup.member(&nats, "b"),
        setup.member(&nats, "c"),
    ];
    let variants: Vec<_> = (0..6)
        .map(|i| package_variant("hello", |t| format!("{t}\n# variant {i}\n")))
        .collect();
    for round in 0..3 {
        let deploys: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|side| {
                let cmd = deploy_command(&members[side], variants[round * 2 + side].path());
                std::thread::spawn(move || cmd_ok(cmd))
            })
            .collect();
        for d in deploys {
            d.join().expect("deploy thread");
        }
    }
    let converged = wait_for(BOUND, || async {
        let mut vs = Vec::new();
        for m in &members {
            vs.push(version_of(m, "hello").await);
        }
        vs[0].is_some() && vs.iter().all(|v| *v == vs[0])
    })
    .await;
    let mut seen = Vec::new();
    for m in &members {
        seen.push(version_of(m, "hello").await);
    }
    assert!(converged.is_some(), "members disagree: {seen:?}");
}

async fn lists_model(s: &Server, name: &str) -> bool {
    let v = get_json(s, "/v1/models").await;
    v.as_array()
        .into_iter()
        .flatten()
        .any(|m| m["name"] == name)
}

#[tokio::test]
async fn a_model_imported_on_one_member_is_served_by_the_others() {
    const MODEL: &str = "smollm2-cluster-copy";
    let nats = Nats::start();
    let setup = Setup::new();
    let a = setup.engine_member(&nats, "a");
    let b = setup.engine_member(&nats, "b");
    let router = setup.member(&nats, "r");

    let gguf = slinfer_e2e::models_dir().join("smollm2-135m-instruct/model.gguf");
    let (ok, out, err) = b.cli(&["models", "import", gguf.to_str().unwrap(), "--name", MODEL]);
    assert!(ok, "import failed: {out}{err}");
    assert!(err.contains("storing the package in the cluster"), "{err}");
    // The record is in the cluster at once; a serves it once it fetched
    // and loaded the package.
    let recorded = wait_for(BOUND, || async {
        let v = get_json(&router, "/v1/cluster").await;
        v["models"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == MODEL && m["origin"] == "b")
    })
    .await;
    let listed = wait_for(Duration::from_secs(60), || lists_model(&a, MODEL)).await;
    assert!(listed.is_some(), "{}", a.log());
    println!("model import on b: recorded after {recorded:?}, served by a after {listed:?}");
    let served_by = wait_for(BOUND, || async {
        let v = get_json(&router, "/v1/cluster").await;
        v["models"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == MODEL && m["served_by"] == serde_json::json!(["a", "b"]))
    })
    .await;
    assert!(
        served_by.is_some(),
        "{}",
        get_json(&router, "/v1/cluster").await
    );
    let package = setup.tmp.path().join("a/models").join(MODEL);
    assert!(package.join("model.toml").is_file());
    // A member without engines keeps no models.
    assert!(!lists_model(&router, MODEL).await);

    // A function deployed through the router generates on a's copy.
    let chat = package_variant("chat", |m| {
        m.replace("\"smollm2-135m-instruct\"", &format!("\"{MODEL}\""))
    });
    router.deploy(chat.path());
    assert!(wait_for(BOUND, || serves_route(&a, "chat")).await.is_some());
    let resp = client()
        .post(format!(
            "{}/fn/chat/?max_tokens=4&temperature=0&stream=false",
            a.url
        ))
        .body("Name a colour.")
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["text"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );

    // Removed through a: gone from b, folder and all.
    let (ok, _, err) = a.cli(&["models", "rm", MODEL]);
    assert!(ok, "{err}");
    let gone = wait_for(BOUND, || async { !lists_model(&b, MODEL).await }).await;
    assert!(gone.is_some(), "{}", b.log());
    assert!(!setup.tmp.path().join("b/models").join(MODEL).exists());
    let (ok, _, err) = b.cli(&["models", "rm", MODEL]);
    assert!(!ok && err.contains("404"), "{err}");
}

/// Whether `s` has function `name` deployed (whatever it answers).
async fn serves_route(s: &Server, name: &str) -> bool {
    version_of(s, name).await.is_some()
}

fn deploy_command(s: &Server, dir: &Path) -> Command {
    let mut cmd = Command::new(slinfer_bin());
    cmd.args([
        "deploy",
        dir.to_str().unwrap(),
        "--server",
        &s.url,
        "--token",
        &s.token,
    ]);
    cmd
}

fn cmd_ok(mut cmd: Command) {
    let out = cmd.output().expect("running the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Run `slinfer serve` expecting it to stop with an error; its log. The
/// cases give `--devices none`: choosing a CPU engine measures both engines
/// before the cluster is joined, 20 s on a loaded 2-core machine.
fn serve_fails(data: &Path, args: &[&str]) -> String {
    std::fs::create_dir_all(data).unwrap();
    let mut child = Command::new(slinfer_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return err;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("slinfer serve {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_bad_cluster_setup_gets_a_clear_error() {
    let setup = Setup::new();
    let token = setup.token_file.to_str().unwrap();

    // Nothing listens there.
    let nowhere = format!("nats://127.0.0.1:{}", slinfer_e2e::free_port());
    let err = serve_fails(
        &setup.data("x1"),
        &[
            "--cluster",
            &nowhere,
            "--admin-token-file",
            token,
            "--devices",
            "none",
        ],
    );
    assert!(err.contains("cannot reach the NATS server at"), "{err}");

    // A NATS server without JetStream.
    let plain = Nats::start_with(false);
    let err = serve_fails(
        &setup.data("x2"),
        &[
            "--cluster",
            &plain.url,
            "--admin-token-file",
            token,
            "--devices",
            "none",
        ],
    );
    assert!(
        err.contains("no usable JetStream") && err.contains("-js"),
        "{err}"
    );

    let nats = Nats::start();
    let mut args = setup.args(&nats, "Not_A_Name");
    let bad = serve_fails(&setup.data("x3"), &strs(&args));
    assert!(bad.contains("invalid node name"), "{bad}");

    // A second member under a live member's name.
    let a = setup.member(&nats, "a");
    let err = serve_fails(&setup.data("a-twin"), &strs(&setup.args(&nats, "a")));
    assert!(err.contains("\"a\" is in use by a live member"), "{err}");

    // Another admin token.
    let other = setup.tmp.path().join("other-token");
    std::fs::write(&other, "not-the-secret\n").unwrap();
    args[3] = "d".into();
    args[5] = other.to_str().unwrap().into();
    let err = serve_fails(&setup.data("x4"), &strs(&args));
    assert!(err.contains("admin token is not the cluster's"), "{err}");

    // A URL that is not one.
    let err = serve_fails(
        &setup.data("x5"),
        &[
            "--cluster",
            "nats://[::1",
            "--admin-token-file",
            token,
            "--devices",
            "none",
        ],
    );
    assert!(err.contains("invalid cluster URL"), "{err}");

    // A NATS server that wants a password: the wrong one is refused, the
    // right one joins, and the password shows nowhere.
    let guarded = Nats::start_with_password("slinfer", "s3cret");
    let port = guarded.url.rsplit(':').next().unwrap();
    let wrong = format!("nats://slinfer:nope@127.0.0.1:{port}");
    let err = serve_fails(
        &setup.data("x6"),
        &[
            "--cluster",
            &wrong,
            "--admin-token-file",
            token,
            "--devices",
            "none",
        ],
    );
    assert!(
        err.contains("authorization violation") && !err.contains("nope"),
        "{err}"
    );
    let right = format!("nats://slinfer:s3cret@127.0.0.1:{port}");
    let joined = Server::start_with(
        &setup.data("x7"),
        &[("SLINFER_CLUSTER", right.as_str())],
        &[
            "--node-name",
            "p",
            "--admin-token-file",
            token,
            "--devices",
            "none",
        ],
    );
    let view = get_json(&joined, "/v1/cluster").await;
    assert_eq!(view["nats"], format!("nats://127.0.0.1:{port}"));
    assert!(!view.to_string().contains("s3cret") && !joined.log().contains("s3cret"));

    // The member that was there is untouched by all that.
    a.deploy(&package("hello"));
    assert!(serves(&a, "hello").await);

    // A server running alone has no cluster view.
    let alone = Server::start();
    let resp = client()
        .get(format!("{}/v1/cluster", alone.url))
        .bearer_auth(&alone.token)
        .send()
        .await
        .unwrap();
    let (status, kind, message) = error_of(resp).await;
    assert_eq!((status, kind.as_str()), (404, "not_clustered"), "{message}");
    let (ok, _, err) = alone.cli(&["cluster", "status"]);
    assert!(!ok && err.contains("--cluster"), "{err}");
}
