#!/usr/bin/env python3
"""Checks slinfer's pages in a real browser (Debian's Chromium, driven by
Playwright), for the end-to-end tests (tests/tests/ui.rs) and the README's
screenshot.

  browser.py dashboard URL --model M --screenshot PNG [--reconnect]
      Loads URL/ui while the caller keeps a generation of model M running,
      and checks that the device, the instance with its batch and the
      model's SLO figures are shown and update. Prints one JSON line with
      what it saw. With --reconnect it then prints OFFLINE-WAIT, waits for
      the page to see the server gone (prints OFFLINE), waits for a line on
      stdin (the caller restarted the server on the same address and
      deployed `hello`), and checks that the page came back by itself and
      shows `hello`, printing a second JSON line.

  browser.py report FILE --screenshot PNG
      Loads a `slinfer simulate --html` report and checks its table and
      figures.

Both record console errors, uncaught page errors and every request that
leaves the page's own origin (the pages must need nothing else), and exit
non-zero with the reason on the first failed check.
"""

import argparse
import json
import os
import sys

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("SLINFER_CHROMIUM", "/usr/bin/chromium")
# Chromium as root, headless, and quiet on a machine with no internet: the
# background-networking flags keep it from calling Google's hosts.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def say(obj):
    print(obj if isinstance(obj, str) else json.dumps(obj), flush=True)


def fail(why, seen=None):
    say({"ok": False, "error": why, **(seen or {})})
    sys.exit(1)


class Watch:
    """The console errors, page errors and foreign requests of one page."""

    def __init__(self, page, origin):
        self.errors = []
        self.foreign = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on(
            "request",
            lambda r: (not r.url.startswith(origin) and not r.url.startswith("data:"))
            and self.foreign.append(r.url),
        )

    def take(self):
        errors, self.errors = self.errors, []
        return errors


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)


def text(page, selector):
    return page.locator(selector).first.inner_text(timeout=5_000).strip()


def dashboard(args):
    base = args.url.rstrip("/")
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        watch = Watch(page, base + "/")
        page.goto(base + "/ui")
        seen = {}
        try:
            page.wait_for_selector('#conn[data-state="live"]', timeout=15_000)
            device = page.wait_for_selector(".device[data-device]", timeout=15_000)
            seen["device"] = device.get_attribute("data-device")
            model = json.dumps(args.model)
            # An instance of the model serving a batch of at least one.
            row = f'tr.instance[data-model={model}][data-state="serving"]'
            page.wait_for_selector(row, timeout=60_000)
            seen["batch"] = int(text(page, f"{row} td.batch"))
            # The model's SLO figures once a request of it has ended.
            mrow = f"tr.model[data-model={model}]"
            page.wait_for_function(
                """sel => { const c = document.querySelector(sel);
                            return c && c.textContent.trim().endsWith('%'); }""",
                arg=f"{mrow} td.slo-1m",
                timeout=60_000,
            )
            seen["slo_1m"] = text(page, f"{mrow} td.slo-1m")
            seen["ttft_p50"] = text(page, f"{mrow} td.ttft-p50")
            # The page updates: the server's clock it shows moves on.
            first = int(page.get_attribute("#updated", "data-now"))
            page.wait_for_function(
                "t => Number(document.querySelector('#updated').dataset.now) > t",
                arg=first,
                timeout=5_000,
            )
            seen["updated_from"] = first
            seen["updated_to"] = int(page.get_attribute("#updated", "data-now"))
            seen["charts"] = page.locator("figure[data-chart] svg").count()
        except PlaywrightTimeout as e:
            page.screenshot(path=args.screenshot, full_page=True)
            fail(f"timed out: {e}", {**seen, "console_errors": watch.errors})
        page.screenshot(path=args.screenshot, full_page=True)
        seen.update(phase="live", ok=True, console_errors=watch.take(), foreign=watch.foreign)
        say(seen)
        if args.reconnect:
            reconnect(page, watch)
        browser.close()


def reconnect(page, watch):
    say("OFFLINE-WAIT")
    try:
        page.wait_for_selector('#conn[data-state="offline"]', timeout=20_000)
    except PlaywrightTimeout:
        fail("the page did not notice the server was gone")
    say("OFFLINE")
    sys.stdin.readline()
    try:
        page.wait_for_selector('#conn[data-state="live"]', timeout=20_000)
        page.wait_for_selector('tr.function[data-function="hello"]', timeout=20_000)
    except PlaywrightTimeout as e:
        fail(f"the page did not come back: {e}")
    # While the server was gone, the browser logs the refused fetches as
    # errors; those are expected, nothing else is.
    errors = [e for e in watch.take() if "ERR_CONNECTION_REFUSED" not in e]
    say({"phase": "reconnected", "ok": True, "console_errors": errors, "foreign": watch.foreign})


def report(args):
    path = os.path.abspath(args.file)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        watch = Watch(page, "file://")
        page.goto("file://" + path)
        seen = {"title": page.title()}
        try:
            page.wait_for_selector("table#summary tbody tr", timeout=10_000)
        except PlaywrightTimeout:
            fail("no summary table", seen)
        seen["rows"] = page.locator("table#summary tbody tr").count()
        seen["figures"] = page.locator("figure svg").count()
        seen["captions"] = page.locator("figure figcaption").all_inner_texts()
        page.screenshot(path=args.screenshot, full_page=True)
        seen.update(ok=True, console_errors=watch.take(), foreign=watch.foreign)
        say(seen)
        browser.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dashboard")
    d.add_argument("url")
    d.add_argument("--model", required=True)
    d.add_argument("--screenshot", required=True)
    d.add_argument("--reconnect", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("file")
    r.add_argument("--screenshot", required=True)
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        fail(f"no Chromium at {CHROMIUM}: ./dev setup installs Debian's chromium package")
    {"dashboard": dashboard, "report": report}[args.what](args)


if __name__ == "__main__":
    main()
