#!/usr/bin/env python3
"""How a live server's runs compare with a profile: each run the log holds
against the time the profile gives it, as quantiles of the ratio: over
decode runs a profile's `step_time_spread`, over runs that prefill its
`prefill_time_spread` (the simulator draws each run's time from the one of
its kind; prefill runs from `step_time_spread` where there is no other).

    .venv/bin/python scripts/run_log.py --log SERVE_LOG --profile FILE [--model NAME] [--write]

SERVE_LOG is `slinfer serve`'s stderr with the runner's runs logged
(`SLINFER_LOG=info,slinfer_inference=debug`): one `run` line per engine
run, with the tokens it prefilled, the sequences it decoded and their
context, and its ms. The profile's tables for the model on the CPU give
each run's time (prefill by tokens, decode by mean context and batch,
plus `host_ms_per_iteration` and `host_ms_per_token`). Prints the spreads
as JSON; `--write` also stores them in the profile. A spread needs 20 runs
of its kind; the prefill one is left out with fewer.

Standard library only.
"""

import argparse
import json
import re
import sys

MODEL = "smollm2-135m-instruct"
# Quantiles kept: evenly spaced from the lowest to the highest ratio, the
# lowest and highest 1% of runs left out (a step that met a page fault or
# another process's burst says little about the next one).
QUANTILES = 21
TRIM = 0.01


def curve_at(pts, x):
    """A profile curve `[[x, ms], ...]` at x, as host/scheduler/src/profile.rs
    reads one: clamped below, linear inside, proportional beyond."""
    if x <= pts[0][0]:
        return pts[0][1]
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        if x <= xb:
            return ya + (yb - ya) * (x - xa) / (xb - xa)
    return pts[-1][1] * x / pts[-1][0]


def decode_ms(tables, context, batch):
    """The profile's decode step: each context row over batch size, then
    across rows by context."""
    rows = [(c, curve_at(r, batch)) for c, r in tables["decode_ms_by_context_then_batch"]]
    return curve_at(rows, context)


def planned_ms(tables, run):
    """What the profile says `run` takes (None for a run that did nothing)."""
    host = lambda n: tables.get("host_ms_per_iteration", 0) + tables.get("host_ms_per_token", 0) * n  # noqa: E731
    if run["prefill_tokens"] > 0:
        return curve_at(tables["prefill_ms_by_input_tokens"], run["prefill_tokens"]) + host(1)
    if run["decode_batch"] > 0:
        batch = run["decode_batch"]
        return decode_ms(tables, run["decode_context"] / batch, batch) + host(batch)
    return None


def runs(lines):
    """The `run` lines of a server log, as dicts of numbers."""
    for line in lines:
        if " run " not in line or "DEBUG" not in line:
            continue
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        try:
            yield {"ms": float(kv["ms"]), "prefill_tokens": int(kv["prefill_tokens"]),
                   "decode_batch": int(kv["decode_batch"]),
                   "decode_context": int(kv["decode_context"]), "model": kv.get("model")}
        except (KeyError, ValueError):
            continue


def spreads(lines, tables):
    """{"step_time_spread": decode runs' quantiles, "prefill_time_spread":
    prefill runs'}, each of live run time / profile time, a kind with fewer
    than 20 runs left out."""
    ratios = {"step_time_spread": [], "prefill_time_spread": []}
    for r in runs(lines):
        p = planned_ms(tables, r)
        if p is not None and p > 0:
            key = "prefill_time_spread" if r["prefill_tokens"] > 0 else "step_time_spread"
            ratios[key].append(r["ms"] / p)
    return {k: q for k, rs in ratios.items() if (q := quantiles(rs)) is not None}


def quantiles(ratios):
    """QUANTILES quantiles of `ratios` (the extremes trimmed), or None with
    fewer than 20."""
    ratios = sorted(ratios)
    if len(ratios) < 20:
        return None
    cut = int(len(ratios) * TRIM)
    kept = ratios[cut:len(ratios) - cut]
    at = lambda q: kept[round(q * (len(kept) - 1))]  # noqa: E731
    return [round(at(i / (QUANTILES - 1)), 4) for i in range(QUANTILES)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="slinfer serve's log with runs at debug level")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--model", default=MODEL, help="the profile's model the runs are of")
    ap.add_argument("--write", action="store_true", help="store it in the profile")
    args = ap.parse_args()
    with open(args.profile) as f:
        doc = json.load(f)
    tables = doc["latency"][args.model]["cpu"]["cpu"]
    with open(args.log) as f:
        q = spreads(f, tables)
    if "step_time_spread" not in q:
        sys.exit(f"{args.log}: fewer than 20 decode runs logged (serve with "
                 "SLINFER_LOG=info,slinfer_inference=debug)")
    print(json.dumps(q))
    if args.write:
        tables.pop("prefill_time_spread", None)
        tables.update(q)
        with open(args.profile, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
