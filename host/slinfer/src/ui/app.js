// The slinfer dashboard: polls /ui/api/state every second and draws it.
// Everything from the server is put in the page as text (textContent),
// never as markup: function and model names are the users'.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let token = sessionStorage.getItem("slinfer-admin-token") || "";
let latest = null;
let failures = 0;

// h("td", {class: "num"}, "text", child, ...): an element with attributes and children.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function seconds(x) {
  if (x === null || x === undefined) return "–";
  return x < 1 ? (x * 1000).toFixed(x < 0.01 ? 2 : 0) + " ms" : x.toFixed(2) + " s";
}

function percent(x) {
  return x === null || x === undefined ? "–" : (x * 100).toFixed(1) + " %";
}

function rate(x) {
  return x === 0 ? "0" : x < 10 ? x.toFixed(2) : x.toFixed(0);
}

function counts(map) {
  const parts = Object.entries(map || {}).map(([k, n]) => k + " " + n);
  return parts.length ? parts.join(", ") : "–";
}

function setConn(state, text) {
  const c = $("conn");
  c.dataset.state = state;
  c.textContent = text;
}

// One poll: the state, or why there is none. Drawing happens outside, so
// a fault in it shows as a page error, not as a lost server.
async function fetchState() {
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch("/ui/api/state", { headers, cache: "no-store" });
    if (r.status === 401 || r.status === 403) return { locked: r.status };
    if (!r.ok) return { failed: "HTTP " + r.status };
    return { state: await r.json() };
  } catch (e) {
    return { failed: String(e) };
  }
}

async function poll() {
  const got = await fetchState();
  setTimeout(poll, got.failed ? Math.min(5000, POLL_MS * ++failures) : POLL_MS);
  if (got.failed) {
    setConn("offline", "reconnecting…");
    return;
  }
  failures = 0;
  if (got.locked) {
    setConn("locked", got.locked === 401 ? "admin token needed" : "admin token wrong");
    return;
  }
  latest = got.state;
  setConn("live", "live");
  render(latest);
}

function filter() {
  return $("search").value.trim().toLowerCase();
}

function render(state) {
  $("node").textContent = state.node ? "node " + state.node : "";
  $("updated").textContent =
    "updated " + new Date(state.now_unix_s * 1000).toLocaleTimeString() +
    " · up " + uptime(state.now_unix_s - state.started_unix_s);
  $("updated").dataset.now = state.now_unix_s;
  renderDevices(state);
  renderModels(state);
  renderFunctions(state);
  renderTimeline(state.timeline, state.started_unix_s);
}

function uptime(s) {
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h";
}

// The instances of each device of one node's inference status.
function instancesByDevice(status) {
  const by = {};
  for (const m of status.models || []) {
    for (const i of m.instances || []) {
      (by[i.device] = by[i.device] || []).push(Object.assign({}, i, { model: m.name }));
    }
  }
  return by;
}

function instanceState(i) {
  if (i.state === "loaded") return i.batch > 0 ? "serving" : "idle";
  if (i.state === "retiring") return "unloading";
  return i.state;
}

function renderDevices(state) {
  const out = [];
  for (const node of state.nodes) {
    const status = node.status;
    if (!status) {
      out.push(h("p", { class: "muted" }, (node.node ? node.node + ": " : "") +
        "no inference on this server (start it with --models-dir and a device)"));
      continue;
    }
    const instances = instancesByDevice(status);
    if (!(status.devices || []).length) {
      out.push(h("p", { class: "muted" }, (node.node ? node.node + ": " : "") +
        "no devices (see `slinfer serve --devices`)"));
    }
    for (const d of status.devices || []) {
      out.push(deviceCard(node, d, instances[d.name] || []));
    }
  }
  $("devices").replaceChildren(...out);
}

function deviceCard(node, d, instances) {
  const n = d; // the scheduler's figures are flattened into the device
  const weights = instances.reduce((a, i) => a + i.static_bytes, 0);
  const kv = Math.max(0, n.committed_bytes - weights);
  const ahead = Math.max(0, n.planned_bytes - n.committed_bytes);
  const other = Math.max(0, n.capacity_bytes - n.room_bytes);
  const free = Math.max(0, n.capacity_bytes - other - Math.max(n.committed_bytes, n.planned_bytes));
  const parts = [
    ["weights", weights, "Weights"],
    ["kv", kv, "KV committed"],
    ["ahead", ahead, "KV planned ahead"],
    ["other", other, "Other use"],
    ["free", free, "Free"],
  ];
  const total = Math.max(1, n.capacity_bytes);
  const bar = h("div", { class: "bar", role: "img",
    "aria-label": parts.map(([, b, l]) => l + " " + bytes(b)).join(", ") });
  for (const [cls, b, label] of parts) {
    const seg = h("span", { class: "seg " + cls, title: label + ": " + bytes(b) });
    seg.style.width = (100 * b / total).toFixed(2) + "%";
    bar.append(seg);
  }
  const legend = h("div", { class: "legend" }, ...parts.map(([cls, b, label]) =>
    h("span", { class: "key " + cls }, h("i"), label + " " + bytes(b))));
  const rows = instances.map((i) => h("tr", {
    class: "instance", "data-model": i.model, "data-state": instanceState(i),
  },
    h("td", {}, i.model),
    h("td", { class: "state " + instanceState(i) }, instanceState(i)),
    h("td", { class: "num batch" }, i.batch),
    h("td", { class: "num kv" },
      (i.kv_blocks_in_use ?? "–") + (i.kv_blocks_kept ? " + " + i.kv_blocks_kept + " kept" : "")
        + " / " + i.kv_blocks_committed),
    h("td", { class: "num" }, i.kv_blocks_planned),
    h("td", { class: "num" }, bytes(i.static_bytes + i.kv_blocks_committed * i.block_bytes))));
  const table = rows.length
    ? h("table", { class: "instances" },
      h("thead", {}, h("tr", {}, h("th", {}, "Instance of"), h("th", {}, "State"),
        h("th", {}, "Batch"), h("th", {}, "KV blocks in use (+ kept) / committed"),
        h("th", {}, "Planned"), h("th", {}, "Memory"))),
      h("tbody", {}, ...rows))
    : h("p", { class: "muted" }, "no instances");
  return h("div", {
    class: "device" + (n.failed ? " failed" : "") + (node.alive ? "" : " lost"),
    "data-node": node.node, "data-device": d.name,
  },
    h("div", { class: "device-head" },
      h("strong", {}, (node.node ? node.node + " · " : "") + d.name),
      h("span", { class: "muted" }, " " + d.backend + " · " + bytes(n.capacity_bytes) +
        (node.alive ? "" : " · member lost") + (d.failed ? " · failed: " + d.failed : ""))),
    bar, legend, table);
}

function renderModels(state) {
  const f = filter();
  const shown = state.models.filter((m) => !f || m.name.toLowerCase().includes(f));
  $("models-count").textContent = "(" + shown.length + " of " + state.models.length + ")";
  const rows = shown.map((m) => h("tr", { class: "model", "data-model": m.name },
    h("td", {}, m.name),
    h("td", { class: "num" }, m.instances),
    h("td", { class: "num queue" }, m.queued),
    h("td", { class: "num tokens" }, rate(m.tokens_per_s)),
    h("td", { class: "num ttft-p50" }, seconds(m.ttft_s[0])),
    h("td", { class: "num ttft-p99" }, seconds(m.ttft_s[1])),
    h("td", { class: "num tpot-p50" }, seconds(m.tpot_s[0])),
    h("td", { class: "num tpot-p99" }, seconds(m.tpot_s[1])),
    ...m.slo.map((x, i) => h("td", { class: "num slo slo-" + [1, 5, 15][i] + "m" + sloClass(x) }, percent(x))),
    h("td", { class: "num" }, m.cold_starts),
    h("td", { class: "num" }, m.preemptions),
    h("td", { class: "ended" }, counts(m.ended))));
  $("models").tBodies[0].replaceChildren(...rows);
}

function sloClass(x) {
  if (x === null || x === undefined) return "";
  return x >= 0.9 ? " good" : x >= 0.5 ? " fair" : " bad";
}

function renderFunctions(state) {
  const f = filter();
  const shown = state.functions.filter((x) => !f || x.name.toLowerCase().includes(f));
  shown.sort((a, b) => b.invocations - a.invocations || a.name.localeCompare(b.name));
  $("functions-count").textContent = "(" + shown.length + " of " + state.functions.length + ")";
  const rows = shown.map((x) => {
    const link = h("button", { class: "link", type: "button", title: "Details (admin token)" }, x.name);
    link.addEventListener("click", () => details(x.name));
    return h("tr", { class: "function", "data-function": x.name },
      h("td", {}, link),
      h("td", { class: "num rate" }, rate(x.invocations_per_s)),
      h("td", { class: "num" }, x.invocations),
      h("td", { class: "errors" }, counts(x.errors)),
      h("td", { class: "num" }, seconds(x.latency_s[0])),
      h("td", { class: "num" }, seconds(x.latency_s[1])),
      h("td", { class: "num" }, x.instances),
      h("td", { class: "num" }, x.queued));
  });
  $("functions").tBodies[0].replaceChildren(...rows);
}

async function details(name) {
  $("details-title").textContent = name;
  const body = $("details-body");
  if (!token) {
    body.textContent = "Function details (its manifest: limits, outbound hosts, models it may use, " +
      "environment) need the admin token: set it with the “Admin token” button.";
  } else {
    body.textContent = "loading…";
    try {
      const r = await fetch("/v1/functions/" + encodeURIComponent(name),
        { headers: { Authorization: "Bearer " + token } });
      const j = await r.json();
      body.textContent = r.ok ? JSON.stringify(j, null, 2)
        : (j.error ? j.error.message : "HTTP " + r.status);
    } catch (e) {
      body.textContent = "the server did not answer";
    }
  }
  $("details").showModal();
}

// One chart: series of [label, class, values] drawn as lines, or as
// stacked bars when `stacked`.
function chart(title, tl, series, opts) {
  const W = 460, H = 140, L = 58, B = 18, T = 8;
  const n = tl.invocations_per_s.length;
  let max = 0;
  for (let i = 0; i < n; i++) {
    if (opts.stacked) max = Math.max(max, series.reduce((a, [, , v]) => a + (v[i] || 0), 0));
    else for (const [, , v] of series) max = Math.max(max, v[i] || 0);
  }
  max = max > 0 ? max * 1.1 : 1;
  const x = (i) => L + (W - L - 4) * i / Math.max(1, n - 1);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
  svg.append(s("line", { x1: L, y1: y(0), x2: W - 4, y2: y(0), class: "axis" }));
  for (const frac of [0.5, 1]) {
    const v = max / 1.1 * frac;
    svg.append(s("line", { x1: L, y1: y(v), x2: W - 4, y2: y(v), class: "grid" }));
    const t = s("text", { x: L - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" });
    t.textContent = opts.format(v);
    svg.append(t);
  }
  for (const [label, at] of [["−15 min", 0], ["now", n - 1]]) {
    const t = s("text", { x: x(at), y: H - 4, class: "tick", "text-anchor": at ? "end" : "start" });
    t.textContent = label;
    svg.append(t);
  }
  if (opts.stacked) {
    const w = Math.max(1, (W - L - 4) / n - 0.5);
    for (let i = 0; i < n; i++) {
      let base = 0;
      for (const [, cls, v] of series) {
        const val = v[i] || 0;
        if (val > 0) {
          svg.append(s("rect", { x: x(i) - w / 2, y: y(base + val), width: w,
            height: y(base) - y(base + val), class: "area " + cls }));
        }
        base += val;
      }
    }
  } else {
    for (const [, cls, v] of series) {
      const pts = [];
      for (let i = 0; i < n; i++) if (v[i] !== null && v[i] !== undefined) pts.push(x(i).toFixed(1) + "," + y(v[i]).toFixed(1));
      if (pts.length) svg.append(s("polyline", { points: pts.join(" "), class: "line " + cls }));
    }
  }
  const legend = h("div", { class: "legend" }, ...series.map(([label, cls]) =>
    h("span", { class: "key " + cls }, h("i"), label)));
  return h("figure", { class: "chart-box", "data-chart": opts.id }, h("figcaption", {}, title), svg, legend);
}

function renderTimeline(tl, started) {
  const num = (v) => v < 10 ? v.toFixed(1) : v.toFixed(0);
  // Nothing is known of the time before the server started: no points there.
  const first = Math.floor((started - tl.start_unix_s) / tl.step_s);
  const since = (v) => v.map((x, i) => (i < first ? null : x));
  tl = Object.assign({}, tl, {
    invocations_per_s: since(tl.invocations_per_s),
    generations_per_s: since(tl.generations_per_s),
    tokens_per_s: since(tl.tokens_per_s),
  });
  const charts = [
    chart("Requests per second", tl, [
      ["invocations", "c1", tl.invocations_per_s],
      ["generations", "c2", tl.generations_per_s],
    ], { id: "requests", format: num }),
    chart("Tokens per second", tl, [["tokens", "c3", tl.tokens_per_s]], { id: "tokens", format: num }),
    chart("Requests that met or missed their SLO (per 5 s)", tl, [
      ["met", "good", tl.slo_met],
      ["missed", "bad", tl.slo_missed],
    ], { id: "slo", format: num, stacked: true }),
  ];
  const devices = Object.entries(tl.memory);
  if (devices.length) {
    const series = [];
    devices.forEach(([name, points], k) => {
      series.push([name + " committed", "c" + (1 + (k % 4)), points.map((p) => p && p.committed_bytes)]);
      series.push([name + " capacity", "c" + (1 + (k % 4)) + " dashed", points.map((p) => p && p.capacity_bytes)]);
    });
    charts.push(chart("Device memory: committed vs capacity", tl, series, { id: "memory", format: bytes }));
  }
  $("timeline").replaceChildren(...charts);
}

function setup() {
  $("search").addEventListener("input", () => latest && render(latest));
  for (const b of document.querySelectorAll("[data-close]")) {
    b.addEventListener("click", () => $(b.dataset.close).close());
  }
  $("token-button").addEventListener("click", () => {
    $("token-input").value = token;
    $("token-dialog").showModal();
  });
  const save = (t) => {
    token = t;
    if (t) sessionStorage.setItem("slinfer-admin-token", t);
    else sessionStorage.removeItem("slinfer-admin-token");
    $("token-button").textContent = t ? "Admin token ✓" : "Admin token";
    $("token-dialog").close();
  };
  $("token-save").addEventListener("click", () => save($("token-input").value.trim()));
  $("token-clear").addEventListener("click", () => save(""));
  $("token-button").textContent = token ? "Admin token ✓" : "Admin token";
  poll();
}

setup();
