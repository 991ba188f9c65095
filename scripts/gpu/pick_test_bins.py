#!/usr/bin/env python3
"""Copy slinfer-cuda's test executables out of `cargo test --no-run
--message-format=json` output: the lib's unit tests as `unit-tests`, each
integration test `NAME` as `NAME-tests`. Usage: pick_test_bins.py LISTING DIR"""
import json
import shutil
import sys

listing, carry = sys.argv[1], sys.argv[2]
found = 0
for line in open(listing):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if "runtime-plugins/cuda/" not in m["target"]["src_path"] or not m["profile"]["test"]:
        continue
    kind = m["target"]["kind"][0]
    name = {"lib": "unit-tests", "test": m["target"]["name"] + "-tests"}.get(kind)
    if name:
        shutil.copy(m["executable"], f"{carry}/{name}")
        print("carry", m["executable"], "as", name)
        found += 1
if found < 2:
    sys.exit(f"expected the unit and gpu test binaries, found {found}")
