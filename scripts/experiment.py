#!/usr/bin/env python3
"""The paper's experiment on this machine (`./dev experiment`): each policy
live beside its simulated prediction, on one trace slice.

    .venv/bin/python scripts/experiment.py --out DIR [--profile FILE]
        [--functions 8,16,...] [--duration-s 600] [--time-scale 1]
        [--policies sllm,sllm+c+s,slinfer] [--engine openvino] [--no-whole-path]
        [--cluster-policies slinfer]

1. `slinfer profile` measures this machine's CPU engine on the default
   model (skipped with --profile) and scales the paper's SLOs to it.
2. `slinfer simulate --live-host --requests-out` picks the slice and
   predicts each policy's run with that profile (`DIR/sim-POLICY.json`).
3. A server is set up once (`scripts/replay.py --setup-only`: the models
   and functions of the slice, the prompt calibration), then for each
   policy started afresh with `serve --policy POLICY --profile PROFILE
   --profile-model smollm2-135m-instruct` (nothing loaded; its scheduler
   plans every replay model, a copy of the default model, with the
   profile's tables, as the simulator does; PROFILE is step 4's whole-path
   profile unless --no-whole-path) and replayed (`DIR/live-POLICY.json`).
4. Whole-path calibration (unless --no-whole-path): the profile times the
   engine alone; the live host adds its own work to every iteration (the
   grant's round trip, sampling, detokenizing, the Wasm function, its HTTP
   stream). Probes on a fresh `serve --policy slinfer` measure it: one
   stream (warm-up: its load is discarded), one stream, then four at once,
   each a 96-token prompt and 64 tokens out on one replay model. The live
   TPOT less the profile's decode step (its first context row, 128 tokens,
   at batch 1 and 4) is the host's time per iteration of 1 and 4
   sequences; a line through the two gives `host_ms_per_iteration` and
   `host_ms_per_token`. How runs vary around the times that makes
   (`step_time_spread` of decode runs and `prefill_time_spread` of
   prefill runs, quantiles of live / profile time,
   scripts/run_log.py) is measured under load, but not on the slice the
   policies are judged on: a calibration replay of a later window of the
   same trace and functions (`--calibration-start-s`, default 1200 s into
   the trace, for `--calibration-s`, default 120 s, arrivals
   `--calibration-time-scale` times faster, default 2.5: the trace's
   1200-1500 s, about as busy as the slice's busiest minutes, since the
   rest of the trace is calmer than its start; it must start after the
   slice ends) under `serve --policy slinfer` with every run
   logged (`DIR/calibration-requests.json`, `DIR/calibration.json`). With
   `--calibration-s 0`, or when that window has fewer than 20 runs, the
   probes' runs give it. All of it goes into a copy of the profile
   (`DIR/profile-whole-path.json`) that the policies' servers plan with
   (`serve --profile`) and that predicts each policy again
   (`DIR/sim-whole-path-POLICY.json`).
5. `DIR/results.json` holds every side; `DIR/goodput.svg` plots them; the
   table goes to stdout (the rows of BENCHMARKS.md). A second table
   compares each live run with the prediction its server planned with,
   request by request (`compare` in results.json): how many requests had
   each (predicted, live) outcome, and how much later the live first token
   and tokens came, for cold starts and the rest.
6. `--curve 0.25,0.5,...`: SLO attainment as load grows (arrivals that many
   times faster), simulated at each scale for each policy, with the live
   points of this run and of earlier ones (`--curve-with DIR,...`, their
   results.json) on top: `DIR/curve.svg` and `DIR/curve.json`. With
   `--curve-only`, nothing is run live.
7. `--cluster-policies P,...`: each such policy is run once more through a
   cluster of three `serve --cluster` members and a NATS server on
   loopback (`Cluster`: member a serves the models on the CPU, b and c
   only run functions and route generations; requests go to b, c and a in
   turn), beside its prediction: the row `P (3 members)`
   (`DIR/live-P-cluster.json`, members' logs in `DIR/cluster-P`).

Standard library only. The server's files go to DIR/server (its models to
DIR/server/models: one copy of the default model per trace function).
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import run_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-instruct"
TRACE = os.path.join(ROOT, "../shared/data/traces/azure-functions-128fn-30min.json")
REFERENCE = os.path.join(ROOT, "../shared/data/profiles/slinfer-artifact-latency-ms.json")


def log(msg):
    print(f"experiment: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log(" ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)


class Server:
    """`slinfer serve` on DIR/server, started and stopped per policy."""

    def __init__(self, args, data_dir, models_dir, port, profile):
        self.args, self.data_dir, self.models_dir = args, data_dir, models_dir
        self.profile = profile
        self.url = f"http://127.0.0.1:{port}"
        self.proc = None

    def log_path(self, name):
        return os.path.join(self.data_dir, f"serve-{name}.log")

    def start(self, policy, log_runs=False, log_name=None):
        """`log_runs`: the runner logs every run (scripts/run_log.py), to
        the log `log_name` (default: the policy's)."""
        env = dict(os.environ, SLINFER_VENV=os.path.join(ROOT, ".venv"),
                   SLINFER_LOG="info,slinfer_inference=debug" if log_runs else "info",
                   NO_COLOR="1")
        logf = open(self.log_path(log_name or policy), "w")
        self.proc = subprocess.Popen(
            [self.args.slinfer, "serve", "--listen", self.url.removeprefix("http://"),
             "--data-dir", self.data_dir, "--models-dir", self.models_dir,
             "--cpu-engine", self.args.engine, "--policy", policy,
             "--profile", self.profile, "--profile-model", MODEL],
            env=env, stdout=subprocess.DEVNULL, stderr=logf)
        wait_healthy(self.url, self.proc, logf.name, "slinfer serve")

    def stop(self):
        stop_process(self.proc)
        self.proc = None


def stop_process(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(url, proc, log_path, what):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited: see {log_path}")
            time.sleep(0.5)
    raise SystemExit(f"{what} did not answer /healthz in 120 s")


class Cluster:
    """Three `serve --cluster` members and a NATS server on loopback, in
    DIR/cluster-POLICY. Member `a` serves every replay model on the CPU
    (the machine's one device, as in the single-server runs) from the
    setup server's models folder, under POLICY and the same profile; `b`
    and `c` have no devices (`--devices none`): they run the functions of
    the requests sent to them and route each generation to `a`. The
    replay sends its requests to b, c and a in turn, so two thirds of the
    generations cross the cluster (ARCHITECTURE.md: Wasm runs where the
    HTTP request arrived)."""

    def __init__(self, args, out, models_dir, profile, policy):
        self.args, self.models_dir, self.profile, self.policy = args, models_dir, profile, policy
        self.work = os.path.join(out, f"cluster-{policy}")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.token = secrets.token_hex(16)
        self.token_file = os.path.join(self.work, "admin-token")
        with open(self.token_file, "w") as f:
            f.write(self.token + "\n")
        self.nats = None
        self.members = {}
        # The replay's view of member a (replay()'s `server`).
        self.url = f"http://127.0.0.1:{args.port + 1}"
        self.data_dir = os.path.join(self.work, "a")

    def start_nats(self):
        port = self.args.port + 4
        self.nats = subprocess.Popen(
            [os.path.join(ROOT, ".venv/bin/nats-server"), "-js", "-sd",
             os.path.join(self.work, "nats"), "-a", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return f"nats://127.0.0.1:{port}"

    def start_member(self, name, nats):
        port = self.args.port + 1 + "abc".index(name)
        cmd = [self.args.slinfer, "serve", "--listen", f"127.0.0.1:{port}",
               "--data-dir", os.path.join(self.work, name), "--cluster", nats,
               "--node-name", name, "--admin-token-file", self.token_file]
        if name == "a":
            cmd += ["--models-dir", self.models_dir, "--cpu-engine", self.args.engine,
                    "--policy", self.policy, "--profile", self.profile, "--profile-model", MODEL]
        else:
            cmd += ["--devices", "none"]
        log_path = os.path.join(self.work, f"serve-{name}.log")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "a"),
                                env=dict(os.environ, SLINFER_VENV=os.path.join(ROOT, ".venv"),
                                         SLINFER_LOG="info", NO_COLOR="1"))
        self.members[name] = proc
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log_path, f"cluster member {name}")
        return url

    def start(self):
        nats = self.start_nats()
        return [self.start_member(n, nats) for n in "abc"], nats

    def restart_a(self, nats):
        """A fresh member a (nothing loaded), as each single-server run
        starts."""
        stop_process(self.members.pop("a"))
        self.start_member("a", nats)

    def stop(self):
        for proc in self.members.values():
            stop_process(proc)
        self.members = {}
        stop_process(self.nats)


def cluster_run(args, out, models_dir, profile, policy, requests):
    """The replay through three members (see `Cluster`): set up through
    member a (the functions; the models it serves already), a fresh a,
    then the run. Writes DIR/live-POLICY-cluster.json."""
    cluster = Cluster(args, out, models_dir, profile, policy)
    try:
        urls, nats = cluster.start()
        cal = os.path.join(cluster.work, "replay-calibration.json")
        replay(args, cluster, requests, None, "--token", cluster.token, "--setup-only",
               "--calibration", cal)
        cluster.restart_a(nats)
        live = os.path.join(out, f"live-{policy}-cluster.json")
        replay(args, cluster, requests, live, "--token", cluster.token, "--skip-setup",
               "--calibration", cal, "--send-to", ",".join(urls[1:] + urls[:1]),
               "--per-request")
    finally:
        cluster.stop()
    return live


def replay(args, server, requests, out, *extra):
    run([os.path.join(ROOT, ".venv/bin/python"), os.path.join(ROOT, "scripts/replay.py"),
         "--server", server.url, "--data-dir", server.data_dir,
         "--models-dir", server.models_dir, "--requests", requests,
         "--slinfer", args.slinfer, *(["--out", out] if out else []), *extra])


def simulate(args, profile, policy, requests_out=None, time_scale=None, window=None):
    """`slinfer simulate --json`; at the run's own scale with every
    request's record (`per_request`), to compare with the live run.
    `window`: (start in the trace's seconds, duration after scaling, time
    scale), default the slice."""
    start, duration, scale = window or (0.0, args.duration_s, None)
    cmd = [args.slinfer, "simulate", "--trace", TRACE, "--profile", profile,
           "--model", MODEL, "--gpus", "0", "--cpus", "1", "--live-host",
           "--functions", args.functions, "--start-s", str(start),
           "--duration-s", str(duration),
           "--time-scale", str(scale or time_scale or args.time_scale), "--policy", policy,
           "--json"]
    if time_scale is None:
        cmd.append("--per-request")
    if requests_out:
        cmd += ["--requests-out", requests_out]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def svg(rows, path):
    """Bars of SLO goodput (requests that met their SLO) per policy:
    simulated (engine profile, and whole path where measured) and live
    side by side."""
    sides = [("sim", "#9ab", "simulated: engine profile"),
             ("sim_whole_path", "#6a8", "simulated: whole path"),
             ("live", "#347", "live")]
    sides = [s for s in sides if all(r.get(s[0]) for r in rows)]
    bar = 40
    group = len(sides) * bar + 40
    w, h, pad = max(560, 100 + len(rows) * group + 200), 300, 50
    top = max(r[s[0]]["slo_met"] for r in rows for s in sides) or 1
    scale = (h - 2 * pad) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{pad}" y="20">Requests that met their SLO: simulated vs live</text>']
    for i, r in enumerate(rows):
        x = pad + i * group
        for j, (side, colour, _) in enumerate(sides):
            v = r[side]["slo_met"]
            y = h - pad - v * scale
            out.append(f'<rect x="{x + j * bar}" y="{y:.1f}" width="{bar - 4}" '
                       f'height="{v * scale:.1f}" fill="{colour}"/>')
            out.append(f'<text x="{x + j * bar}" y="{y - 4:.1f}">{v}</text>')
        out.append(f'<text x="{x}" y="{h - pad + 16}">{r["policy"]}</text>')
    for j, (_, colour, label) in enumerate(sides):
        y = 30 + 18 * j
        out.append(f'<rect x="{w - 200}" y="{y}" width="12" height="12" fill="{colour}"/>'
                   f'<text x="{w - 182}" y="{y + 10}">{label}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


PROBE_PROMPT, PROBE_OUTPUT = 96, 64


def engine_ms(t):
    """From MODEL's CPU tables `t` of a profile: (prefill ms of the probe's
    prompt, decode step ms at a batch on the first (shortest) context row)."""
    prefill = run_log.curve_at(t["prefill_ms_by_input_tokens"], PROBE_PROMPT)
    return prefill, lambda batch: run_log.curve_at(
        t["decode_ms_by_context_then_batch"][0][1], batch)


def whole_path(args, server, requests, profile, out):
    """Measures what the live host adds to each iteration (step 4 of the
    module's doc) and writes the profile that carries it; returns
    (path, the figures)."""
    with open(requests) as f:
        slice_ = json.load(f)
    function = slice_["requests"][0]["function"]
    tpots, ttfts = {}, {}
    server.start("slinfer", log_runs=True, log_name="probes")
    try:
        for name, streams in (("warm-up", 1), ("1", 1), ("4", 4)):
            probe = os.path.join(out, f"probe-{name}-requests.json")
            with open(probe, "w") as f:
                json.dump({"requests": [{"function": function, "arrival_s": 0.0,
                                         "input_tokens": PROBE_PROMPT,
                                         "output_tokens": PROBE_OUTPUT}] * streams,
                           "slo": slice_["slo"], "policy": "slinfer", "model": MODEL,
                           "models": 1}, f)
            result = os.path.join(out, f"probe-{name}.json")
            replay(args, server, probe, result, "--skip-setup", "--per-request")
            with open(result) as f:
                done = [r for r in json.load(f)["per_request"]
                        if r["outcome"] in ("met", "missed")]
            if len(done) != streams:
                raise SystemExit(f"probe {name}: {len(done)} of {streams} streams completed "
                                 f"(see {result})")
            tpots[streams] = sum(r["tpot_s"] for r in done) / streams * 1e3
            ttfts[streams] = sum(r["ttft_s"] for r in done) / streams * 1e3
    finally:
        server.stop()
    with open(profile) as f:
        doc = json.load(f)
    tables = doc["latency"][MODEL]["cpu"]["cpu"]
    prefill_ms, step_ms = engine_ms(tables)
    over = {b: tpots[b] - step_ms(b) for b in (1, 4)}
    per_token = max(0.0, (over[4] - over[1]) / 3)
    per_iteration = max(0.0, over[1] - per_token)
    tables["host_ms_per_iteration"] = round(per_iteration, 3)
    tables["host_ms_per_token"] = round(per_token, 3)
    path = os.path.join(out, "profile-whole-path.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    # How runs vary around those times (run_log.py): under load on the
    # calibration window, else on the probes.
    spread, source = {}, None
    if args.calibration_s > 0:
        spread = calibration_spread(args, server, path, tables, out)
        source = (f"calibration replay, trace {args.calibration_start_s:g}-"
                  f"{args.calibration_start_s + args.calibration_s * args.calibration_time_scale:g}"
                  f" s at x{args.calibration_time_scale:g}")
    if "step_time_spread" not in spread:
        with open(server.log_path("probes")) as f:
            spread = run_log.spreads(f, tables)
        source = "probes"
    tables.update(spread)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    # TTFT is reported beside the prediction's (prefill plus the host's
    # time for one iteration of one sequence), not fitted.
    figures = {"live_tpot_ms": {str(b): round(t, 3) for b, t in tpots.items()},
               "profile_step_ms": {str(b): round(step_ms(b), 3) for b in (1, 4)},
               "live_ttft_ms_1_stream": round(ttfts[1], 3),
               "predicted_ttft_ms_1_stream": round(prefill_ms + per_iteration + per_token, 3),
               "host_ms_per_iteration": tables["host_ms_per_iteration"],
               "host_ms_per_token": tables["host_ms_per_token"],
               **spread,
               "spread_from": source if spread else None}
    log(f"whole path: {figures}")
    return path, figures


def calibration_spread(args, server, profile, tables, out):
    """Replays the calibration window under `slinfer` (planning with
    `profile`) with every run logged; the spreads of its runs against
    `tables` (run_log.spreads: a kind with fewer than 20 runs left out)."""
    window = (args.calibration_start_s, args.calibration_s, args.calibration_time_scale)
    # Both windows in the trace's own seconds (a duration is after scaling).
    if args.calibration_start_s < args.duration_s * args.time_scale:
        raise SystemExit(f"--calibration-start-s {args.calibration_start_s:g} overlaps the "
                         f"slice (trace 0-{args.duration_s * args.time_scale:g} s)")
    requests = os.path.join(out, "calibration-requests.json")
    simulate(args, profile, "slinfer", requests_out=requests, window=window)
    saved, server.profile = server.profile, profile
    server.start("slinfer", log_runs=True, log_name="calibration")
    try:
        replay(args, server, requests, os.path.join(out, "calibration.json"), "--skip-setup")
    finally:
        server.stop()
        server.profile = saved
    with open(server.log_path("calibration")) as f:
        return run_log.spreads(f, tables)


def curve(args, profile, out):
    """Simulated SLO attainment of each policy at each time scale, and the
    live points measured so far; writes curve.json and curve.svg."""
    scales = [float(x) for x in args.curve.split(",")]
    policies = args.policies.split(",")
    sim = {p: [] for p in policies}
    for scale in scales:
        for p in policies:
            s = simulate(args, profile, p, time_scale=scale)
            sim[p].append((scale, s["slo_attainment"]))
    live = {p: [] for p in policies}
    dirs = [out] + [d for d in (args.curve_with or "").split(",") if d]
    for d in dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            res = json.load(f)
        for r in res["rows"]:
            if r["policy"] in live:
                live[r["policy"]].append((res["time_scale"], r["live"]["slo_attainment"]))
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump({"functions": args.functions, "duration_s": args.duration_s,
                   "simulated": sim, "live": live}, f, indent=1)
    w, h, pad = 560, 320, 50
    xmax = max(scales + [x for pts in live.values() for x, _ in pts])
    px = lambda x: pad + (w - 2 * pad) * x / xmax  # noqa: E731
    py = lambda y: h - pad - (h - 2 * pad) * y  # noqa: E731
    colours = ["#c33", "#d90", "#347", "#393", "#939"]
    svg_out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
               f'font-family="sans-serif" font-size="12">',
               f'<text x="{pad}" y="20">SLO attainment as load grows '
               f'(lines: simulated; dots: live)</text>',
               f'<line x1="{pad}" y1="{py(0)}" x2="{w - pad}" y2="{py(0)}" stroke="#888"/>',
               f'<line x1="{pad}" y1="{py(0)}" x2="{pad}" y2="{py(1)}" stroke="#888"/>',
               f'<text x="{w / 2 - 60}" y="{h - 12}">arrival rate (x the trace)</text>']
    for y in (0.25, 0.5, 0.75, 1.0):
        svg_out.append(f'<text x="{pad - 34}" y="{py(y) + 4:.1f}">{y:.2f}</text>')
    for x in scales:
        svg_out.append(f'<text x="{px(x) - 8:.1f}" y="{py(0) + 16}">{x:g}</text>')
    for i, p in enumerate(policies):
        c = colours[i % len(colours)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sim[p])
        svg_out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in live[p]:
            svg_out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{c}"/>')
        svg_out.append(f'<text x="{w - pad - 60}" y="{40 + 16 * i}" fill="{c}">{p}</text>')
    svg_out.append("</svg>")
    with open(os.path.join(out, "curve.svg"), "w") as f:
        f.write("\n".join(svg_out) + "\n")
    print("| policy | " + " | ".join(f"x{x:g}" for x in scales) + " |")
    print("|---|" + "---|" * len(scales))
    for p in policies:
        print(f"| {p} (simulated) | " + " | ".join(f"{y:.2f}" for _, y in sim[p]) + " |")
        for x, y in sorted(live[p]):
            print(f"| {p} (live at x{x:g}) | {y:.2f} |")


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def compare(sim, live):
    """Request by request, the live run against its prediction: how many
    requests had each (predicted, live) outcome, and for those completed
    on both sides the live TTFT and TPOT less the predicted ones (median
    and 90th percentile), apart for the cold starts the simulator saw
    (a load before their first token) and the rest."""
    pairs = list(zip(sim["per_request"], live["per_request"]))
    assert all(s["index"] == l["index"] for s, l in pairs), "requests out of order"
    outcomes = {}
    for s, l in pairs:
        key = f"{s['outcome']}/{l['outcome']}"
        outcomes[key] = outcomes.get(key, 0) + 1
    done = ("met", "missed")
    both = [(s, l) for s, l in pairs if s["outcome"] in done and l["outcome"] in done]
    diffs = {}
    for name, group in (("cold", [p for p in both if p[0]["load_delay_s"] > 0]),
                        ("warm", [p for p in both if p[0]["load_delay_s"] == 0])):
        ttft = [l["ttft_s"] - s["ttft_s"] for s, l in group]
        tpot = [l["tpot_s"] - s["tpot_s"] for s, l in group if s["output_tokens"] > 1]
        diffs[name] = {"requests": len(group),
                       "ttft_live_less_sim_p50_s": quantile(ttft, 0.5),
                       "ttft_live_less_sim_p90_s": quantile(ttft, 0.9),
                       "tpot_live_less_sim_p50_s": quantile(tpot, 0.5),
                       "tpot_live_less_sim_p90_s": quantile(tpot, 0.9)}
    same = sum(n for k, n in outcomes.items() if k.split("/")[0] == k.split("/")[1])
    return {"requests": len(pairs), "same_outcome": same,
            "outcomes_sim_live": dict(sorted(outcomes.items())), "completed_both": diffs}


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for every file of the run")
    ap.add_argument("--profile", help="a profile of this machine (default: measure one)")
    ap.add_argument("--functions", default="8,16,24,32,40,48,56,64")
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--policies", default="sllm,sllm+c+s,slinfer")
    ap.add_argument("--engine", default="openvino", help="serve --cpu-engine (and profile's)")
    ap.add_argument("--port", type=int, default=18111)
    ap.add_argument("--slinfer", default=os.path.join(ROOT, "target/debug/slinfer"))
    ap.add_argument("--curve", help="time scales for the attainment curve, such as 0.5,1,2")
    ap.add_argument("--curve-with", help="earlier experiment folders whose live points to plot")
    ap.add_argument("--curve-only", action="store_true", help="only the curve (needs --profile)")
    ap.add_argument("--calibration-start-s", type=float, default=1200.0,
                    help="where in the trace the calibration window starts (step 4)")
    ap.add_argument("--calibration-s", type=float, default=120.0,
                    help="the calibration replay's length; 0: spread from the probes")
    ap.add_argument("--calibration-time-scale", type=float, default=2.5,
                    help="arrivals of the calibration window this many times faster")
    ap.add_argument("--cluster-policies", default="",
                    help="these policies also through three cluster members (DIR/cluster-POLICY)")
    ap.add_argument("--no-whole-path", action="store_true",
                    help="skip the whole-path calibration (step 4)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "server")
    models_dir = os.path.join(data_dir, "models")
    os.makedirs(models_dir, exist_ok=True)
    base = os.path.join(models_dir, MODEL)
    if not os.path.isdir(base):
        shutil.copytree(os.path.join(ROOT, ".data/models", MODEL), base)

    profile = args.profile
    if not profile:
        profile = os.path.join(out, "profile.json")
        run([args.slinfer, "profile", "--models-dir", models_dir, "--model", MODEL,
             "--cpu-engine", args.engine, "--reference", REFERENCE, "--out", profile],
            env=dict(os.environ, SLINFER_VENV=os.path.join(ROOT, ".venv")))
    if args.curve_only:
        if not (args.curve and args.profile):
            raise SystemExit("--curve-only needs --curve and --profile")
        curve(args, profile, out)
        return
    policies = args.policies.split(",")
    clustered = [p for p in args.cluster_policies.split(",") if p]
    requests = os.path.join(out, "requests.json")
    sims = {}
    for p in policies + [p for p in clustered if p not in policies]:
        sims[p] = simulate(args, profile, p, requests_out=requests if p == policies[0] else None)
        with open(os.path.join(out, f"sim-{p}.json"), "w") as f:
            json.dump(sims[p], f, indent=1)

    server = Server(args, data_dir, models_dir, args.port, profile)
    try:
        server.start("slinfer")
        replay(args, server, requests, None, "--setup-only")
        server.stop()
        whole = None if args.no_whole_path else whole_path(args, server, requests, profile, out)
        if whole:
            server.profile = whole[0]
        for p in policies:
            server.start(p)
            replay(args, server, requests, os.path.join(out, f"live-{p}.json"), "--skip-setup",
                   "--per-request")
            server.stop()
    finally:
        server.stop()
    runs = [(p, p, os.path.join(out, f"live-{p}.json")) for p in policies]
    for p in clustered:
        live = cluster_run(args, out, models_dir, server.profile, p, requests)
        runs.append((f"{p} (3 members)", p, live))

    # Each policy predicted once with the whole path, for its one-server
    # and its cluster row alike.
    sims_whole = {}
    if whole:
        for p in dict.fromkeys(p for _, p, _ in runs):
            sims_whole[p] = simulate(args, whole[0], p)
            with open(os.path.join(out, f"sim-whole-path-{p}.json"), "w") as f:
                json.dump(sims_whole[p], f, indent=1)
    rows = []
    for label, p, live in runs:
        with open(live) as f:
            row = {"policy": label, "sim": sims[p], "live": json.load(f),
                   "sim_whole_path": sims_whole.get(p)}
        # The prediction the live server planned with.
        row["compare"] = compare(row["sim_whole_path"] or row["sim"], row["live"])
        rows.append(row)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"functions": args.functions, "duration_s": args.duration_s,
                   "time_scale": args.time_scale, "profile": profile,
                   "profile_whole_path": whole and whole[0], "whole_path": whole and whole[1],
                   "rows": rows}, f, indent=1)
    svg(rows, os.path.join(out, "goodput.svg"))
    print("| policy | requests | SLO met sim | SLO met whole-path sim | SLO met live | live / sim "
          "| live / whole-path sim | TTFT p50 sim / live (s) "
          "| TTFT p99 sim / live (s) | TPOT p50 sim / live (ms) | TPOT p99 sim / live (ms) "
          "| cold starts sim / live | dropped sim / live |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ms = lambda x: None if x is None else 1e3 * x  # noqa: E731
    for r in rows:
        s, l, wp = r["sim"], r["live"], r["sim_whole_path"]
        ratio = l["slo_met"] / s["slo_met"] if s["slo_met"] else None
        wp_met = wp["slo_met"] if wp else None
        wp_ratio = l["slo_met"] / wp_met if wp_met else None
        print(f"| {r['policy']} | {s['requests']} | {s['slo_met']} | {fmt(wp_met, 0)} "
              f"| {l['slo_met']} | {fmt(ratio)} | {fmt(wp_ratio)} "
              f"| {fmt(s['ttft_p50_s'])} / {fmt(l['ttft_p50_s'])} "
              f"| {fmt(s['ttft_p99_s'])} / {fmt(l['ttft_p99_s'])} "
              f"| {fmt(ms(s['tpot_p50_s']), 0)} / {fmt(ms(l['tpot_p50_s']), 0)} "
              f"| {fmt(ms(s['tpot_p99_s']), 0)} / {fmt(ms(l['tpot_p99_s']), 0)} "
              f"| {s['cold_starts']} / {l['cold_starts']} | {s['dropped']} / {l['dropped']} |")
    print()
    print("| policy | same outcome | outcomes (sim/live: count) | completed on both, cold / warm "
          "| TTFT live - sim p50, p90 (s): cold; warm | TPOT live - sim p50, p90 (ms): warm |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["compare"]
        cold, warm = c["completed_both"]["cold"], c["completed_both"]["warm"]
        print(f"| {r['policy']} | {c['same_outcome']} / {c['requests']} "
              f"| {', '.join(f'{k}: {n}' for k, n in c['outcomes_sim_live'].items())} "
              f"| {cold['requests']} / {warm['requests']} "
              f"| {fmt(cold['ttft_live_less_sim_p50_s'])}, {fmt(cold['ttft_live_less_sim_p90_s'])}; "
              f"{fmt(warm['ttft_live_less_sim_p50_s'])}, {fmt(warm['ttft_live_less_sim_p90_s'])} "
              f"| {fmt(ms(warm['tpot_live_less_sim_p50_s']), 0)}, "
              f"{fmt(ms(warm['tpot_live_less_sim_p90_s']), 0)} |")
    if args.curve:
        curve(args, profile, out)


if __name__ == "__main__":
    main()
