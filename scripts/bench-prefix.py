#!/usr/bin/env python3
"""A request that arrives while another decodes (BENCHMARKS.md, "A prompt
that begins like a running one"): its first-token time when its prompt
begins like the running request's (the same document, another question)
against when it does not (another document of the same length), on each
CPU engine through slinfer's whole path.

    .venv/bin/python scripts/bench-prefix.py LABEL=URL [LABEL=URL...] [--rounds R] [--words W]

`./dev bench-prefix` sets everything up and runs it on three servers, one
per `--cpu-engine` (as `./dev bench-llm` does). Each round, for each
server: a long request (a document of W words and "Summarize it.", 160
tokens) starts; 0.8 s later (it is decoding) a short one (4 tokens)
arrives, whose prompt is the same document and another question
("alike"), or another document ("unlike"), the two in turn, their order
alternating from round to round. The figure is the short request's
time to its first token; the ratio alike / unlike is paired within a
round and summarised by its median (min-max). Greedy throughout.
"""

import argparse
import random
import statistics
import threading
import time

from benchlib import chat_stream, cpu_name

WORDS = ("river stone market winter lantern orchard copper violin harbor meadow "
         "signal thunder garden mirror castle pepper").split()


def document(seed: int, words: int) -> str:
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(words))


def late_first_token(url: str, running: str, late: str) -> float:
    """Starts `running`, sends `late` while it decodes; `late`'s first-token seconds."""
    t0 = time.perf_counter()
    long = threading.Thread(target=chat_stream, args=(url, running, 160, t0))
    long.start()
    time.sleep(0.8)
    got = chat_stream(url, late, 4, time.perf_counter())
    long.join()
    return got["first"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("servers", nargs="+", metavar="LABEL=URL")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--words", type=int, default=240)
    args = ap.parse_args()
    servers = dict(s.split("=", 1) for s in args.servers)
    doc = document(0, args.words)
    running = f"{doc} Summarize it."
    for url in servers.values():  # warm-up: loads each instance
        late_first_token(url, running, f"{doc} Warm up.")

    print(f"CPU: {cpu_name()}")
    print(f"A document of {args.words} words; {args.rounds} rounds")
    print()
    print("| round | " + " | ".join(f"{s} alike | {s} unlike | {s} alike / unlike" for s in servers) + " |")
    print("|---:|" + "---:|" * (3 * len(servers)))
    first = {(s, kind): [] for s in servers for kind in ("alike", "unlike")}
    ratios = {s: [] for s in servers}
    for r in range(args.rounds):
        row = []
        for label, url in servers.items():
            late = {"alike": f"{doc} What comes after word {r}?",
                    "unlike": f"{document(1000 + r, args.words)} What comes after word {r}?"}
            kinds = ("alike", "unlike") if r % 2 == 0 else ("unlike", "alike")
            got = {kind: late_first_token(url, running, late[kind]) for kind in kinds}
            for kind, s in got.items():
                first[label, kind].append(s)
                time.sleep(1.0)
            ratios[label].append(got["alike"] / got["unlike"])
            row.append(f"{got['alike']:.3f} | {got['unlike']:.3f} | {ratios[label][-1]:.2f}x")
        print(f"| {r + 1} | " + " | ".join(row) + " |", flush=True)

    print()
    print("| side | first token, alike (s, median) | unlike | alike / unlike |")
    print("|---|---:|---:|---:|")
    for label in servers:
        xs = ratios[label]
        print(f"| {label} | {statistics.median(first[label, 'alike']):.3f} | "
              f"{statistics.median(first[label, 'unlike']):.3f} | "
              f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
