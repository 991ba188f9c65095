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

Usage: bench-cluster.py [--rounds R] [--seconds S] [--deploys N]
Needs: target/release/slinfer, target/packages/hello, .venv/bin/nats-server,
.cache/tools/bin/oha (installed on first use); ./dev bench-cluster builds the rest.
"""

import argparse
import json
import os
import platform
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

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target/release/slinfer"
HELLO = Path(os.environ.get("SLINFER_PACKAGES", ROOT / "target/packages")) / "hello"
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
    def __init__(self, work, name, extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = work / name
        data.mkdir()
        log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(data),
             "--admin-token-file", str(work / "token"), "--devices", "none", *extra],
            stdout=subprocess.DEVNULL, stderr=log)
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


def oha_rps(url, seconds):
    out = subprocess.run([str(OHA), "--no-tui", "--output-format", "json", "-z", f"{seconds}s",
                          "-c", "32", url], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["summary"]["requestsPerSec"]


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--deploys", type=int, default=20)
    args = ap.parse_args()
    if not OHA.exists():
        print("==> installing oha (cargo install)", file=sys.stderr)
        subprocess.run(["cargo", "install", "--quiet", "--locked", "oha", "--root",
                        str(OHA.parent.parent)], check=True)
    for p in (BIN, HELLO / "slinfer.toml", NATS, OHA):
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

        print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; oha -c 32, {args.seconds} s per side per round")
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
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
