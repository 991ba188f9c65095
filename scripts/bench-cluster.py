#!/usr/bin/env python3
"""Cluster benchmark (BENCHMARKS.md, "Cluster"): `./dev bench-cluster`.

In one run, on loopback, release builds:

1. `hello` invocations/s through a server running alone and through one
   member of a three-member cluster (each a router, `--devices none`),
   alternately, rounds interleaved, oha closed loop with 32 connections;
   the ratio member/alone per round.
2. Deploy-to-visible latency: a new version of a function deployed through
   member A, and the time until members B and C each serve it (polled every
   2 ms through `GET /v1/functions/NAME`), over N deploys.
3. Remote generation: `chat` invoked on member E (with the CPU engine and
   the default model) and on member R (no engines: its generations go to
   E over NATS), alternately, rounds interleaved: TTFT and TPOT of single
   streams, and tokens/s of 8 concurrent streams, R against E. Both sides
   run on E's engine: the difference is the cost of the hop.

Usage: bench-cluster.py [--rounds R] [--seconds S] [--deploys N] [--streams N]
Needs: target/release/slinfer, target/packages/{hello,chat}, .venv/bin/nats-server,
.data/models (the default model), .cache/tools/bin/oha (installed on first use);
./dev bench-cluster builds the rest.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import chat_stream, cpu_name

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/slinfer"
PACKAGES = Path(os.environ.get("SLINFER_PACKAGES", ROOT / "target/packages"))
HELLO = PACKAGES / "hello"
CHAT = PACKAGES / "chat"
MODELS = Path(os.environ.get("SLINFER_MODELS_DIR", ROOT / ".data/models"))
VENV = Path(os.environ.get("SLINFER_VENV", ROOT / ".venv"))
MODEL = "smollm2-135m-instruct"
NATS = ROOT / ".venv/bin/nats-server"
OHA = ROOT / ".cache/tools/bin/oha"
TOKEN = "bench-cluster-token"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


class Member:
    def __init__(self, work, name, extra, devices="none"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = work / name
        data.mkdir()
        log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data),
             "--admin-token-file", str(work / "token"), "--devices", devices, *extra],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "SLINFER_VENV": str(VENV)})
        wait_port(self.port, name)

    def get(self, path):
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.load(r)
        except Exception:
            return None

    def deploy(self, package):
        subprocess.run([str(BIN), "deploy", str(package), "--server", self.url, "--token", TOKEN],
                       check=True, stdout=subprocess.DEVNULL)


def stream(url, max_tokens):
    """One streamed chat: (TTFT s, TPOT s, generated tokens)."""
    r = chat_stream(url, "Tell me a story about a lighthouse keeper.", max_tokens,
                    time.perf_counter())
    return r["first"], (r["last"] - r["first"]) / max(r["n"] - 1, 1), r["n"]


def throughput(url, streams, max_tokens):
    """Tokens/s of `streams` concurrent streams."""
    done = []
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda: done.append(stream(url, max_tokens)[2]))
               for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def remote_generation(work, nats, rounds, streams):
    models = work / "e-models"
    models.mkdir()
    (models / MODEL).symlink_to(MODELS / MODEL)
    engine = Member(work, "e", ["--cluster", nats, "--node-name", "e", "--models-dir", str(models)],
                    devices="cpu")
    router = Member(work, "r", ["--cluster", nats, "--node-name", "r"])
    router.deploy(CHAT)
    for _ in range(1200):
        cluster = router.get("/v1/cluster") or {}
        served = [m for m in cluster.get("models", []) if m["name"] == MODEL and m["served_by"]]
        if served and engine.get("/v1/functions/chat"):
            break
        time.sleep(0.1)
    else:
        sys.exit("the engine member never served the model")
    stream(engine.url, 8)  # load and warm the instance
    print(f"\n3. chat with {MODEL}: on e (local) vs on r (routed to e over NATS), rounds interleaved")
    ttft = {"local": [], "remote": []}
    tpot = {"local": [], "remote": []}
    tps = {"local": [], "remote": []}
    for r in range(rounds):
        sides = [("local", engine), ("remote", router)]
        if r % 2:
            sides.reverse()
        for name, m in sides:
            for _ in range(5):
                a, b, _ = stream(m.url, 64)
                ttft[name].append(a)
                tpot[name].append(b)
            tps[name].append(throughput(m.url, streams, 64))
    med = {k: {n: statistics.median(v[n]) for n in v} for k, v in
           (("ttft", ttft), ("tpot", tpot), ("tps", tps))}
    print(f"  single stream, 64 tokens, {5 * rounds} per side: "
          f"TTFT local {med['ttft']['local'] * 1e3:6.1f} ms  remote {med['ttft']['remote'] * 1e3:6.1f} ms  "
          f"({(med['ttft']['remote'] - med['ttft']['local']) * 1e3:+.2f} ms)")
    print(f"  {'':38}TPOT local {med['tpot']['local'] * 1e3:6.2f} ms  remote {med['tpot']['remote'] * 1e3:6.2f} ms  "
          f"({(med['tpot']['remote'] - med['tpot']['local']) * 1e3:+.3f} ms per token)")
    single = {k: 1 / v for k, v in med["tpot"].items()}
    print(f"  single-stream decode: local {single['local']:.1f} tok/s  remote {single['remote']:.1f} tok/s  "
          f"ratio {single['remote'] / single['local']:.3f}")
    print(f"  {streams} streams: local {med['tps']['local']:.1f} tok/s  remote {med['tps']['remote']:.1f} tok/s  "
          f"ratio {med['tps']['remote'] / med['tps']['local']:.3f} (medians of {rounds} rounds)")
    return [engine.proc, router.proc]


def oha_rps(url, seconds):
    out = subprocess.run([str(OHA), "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                          "-c", "32", url], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["summary"]["requestsPerSec"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--deploys", type=int, default=20)
    ap.add_argument("--streams", type=int, default=8)
    args = ap.parse_args()
    if not OHA.exists():
        print("==> installing oha (cargo install)", file=sys.stderr)
        subprocess.run(["cargo", "install", "--quiet", "--locked", "oha", "--root",
                        str(OHA.parent.parent)], check=True)
    for p in (BIN, HELLO / "slinfer.toml", CHAT / "slinfer.toml", NATS, OHA, MODELS / MODEL):
        if not p.exists():
            sys.exit(f"{p} is missing: run ./dev bench-cluster")

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    (work / "token").write_text(TOKEN + "\n")
    procs = []
    try:
        nats_port = free_port()
        procs.append(subprocess.Popen(
            [str(NATS), "-js", "-sd", str(work / "nats"), "-a", "127.0.0.1", "-p", str(nats_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(nats_port, "nats-server")
        nats = f"nats://127.0.0.1:{nats_port}"
        alone = Member(work, "alone", [])
        members = [Member(work, n, ["--cluster", nats, "--node-name", n]) for n in "abc"]
        procs += [m.proc for m in [alone, *members]]
        alone.deploy(HELLO)
        members[0].deploy(HELLO)
        for m in members[1:]:
            while m.get("/v1/functions/hello") is None:
                time.sleep(0.01)

        print(f"CPU: {cpu_name()}; oha -c 32, {args.seconds} s per side per round")
        print("\n1. hello invocations/s, alone vs through member b (rounds interleaved)")
        ratios = []
        for r in range(args.rounds):
            sides = [("alone", alone), ("member", members[1])]
            if r % 2:
                sides.reverse()
            rps = {name: oha_rps(m.url + "/fn/hello/", args.seconds) for name, m in sides}
            ratios.append(rps["member"] / rps["alone"])
            print(f"  round {r + 1}: alone {rps['alone']:8.0f}/s  member {rps['member']:8.0f}/s  "
                  f"ratio {ratios[-1]:.3f}")
        print(f"  member/alone: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")

        print(f"\n2. deploy-to-visible through a: {args.deploys} deploys, each until b and c serve it")
        lat = {"b": [], "c": []}
        base = (HELLO / "slinfer.toml").read_text()
        for i in range(args.deploys):
            pkg = work / f"v{i}"
            shutil.copytree(HELLO, pkg)
            (pkg / "slinfer.toml").write_text(base + f"\n# bench version {i}\n")
            members[0].deploy(pkg)
            done = time.perf_counter()
            version = members[0].get("/v1/functions/hello")["version"]

            def watch(m, name):
                while (m.get("/v1/functions/hello") or {}).get("version") != version:
                    time.sleep(0.002)
                lat[name].append(time.perf_counter() - done)

            threads = [threading.Thread(target=watch, args=(m, n)) for m, n in zip(members[1:], "bc")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for name, xs in lat.items():
            xs = sorted(x * 1000 for x in xs)
            print(f"  {name}: p50 {statistics.median(xs):6.1f} ms  max {xs[-1]:6.1f} ms  "
                  f"(after the deploy through a answered)")
        procs += remote_generation(work, nats, args.rounds, args.streams)
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
