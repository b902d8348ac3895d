// prefixgate cache dashboard: polls the gateway's /stats once a second and redraws. No dependencies, no
// network beyond this gateway (the page is served with a Content-Security-Policy that enforces it).
//
// /stats?since=T returns the gateway's per-second history samples newer than T, so the first poll
// (since=0) fills the charts with the last minutes and later polls append one sample or so each.
// Every shown figure carries its raw value in data-value (for tests and copy-paste).
//
// With API keys, /stats needs the admin or metrics key: open the page as /dashboard#key=<key>. The key
// lives in the URL fragment (never sent to the server, never in its logs) and in this tab's
// sessionStorage, and goes to /stats as an Authorization header; a 401 asks for it.
"use strict";

function statsKey() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromHash) {
    sessionStorage.setItem("prefixgate-key", fromHash);
    history.replaceState(null, "", location.pathname + location.search); // off the address bar
  }
  return sessionStorage.getItem("prefixgate-key");
}

function statsHeaders() {
  const key = statsKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

const POLL_MS = 1000;
const CHART_SPAN_MAX_S = 300; // the span grows with the history, from one minute up to this
const KEEP_SAMPLES = 600;

const view = { series: [], lastT: 0, scope: "cluster", polls: 0, stats: null };

// -- formatting -----------------------------------------------------------------------------------
const intFmt = new Intl.NumberFormat("en-US");
const fmtInt = (n) => (n == null ? "–" : intFmt.format(Math.round(n)));
const fmtPct = (x) => (x == null ? "–" : `${(100 * x).toFixed(1)}%`);
function fmtDur(s) {
  if (s == null) return "–";
  if (s >= 1) return `${s.toFixed(2)} s`;
  const ms = s * 1000;
  return `${ms >= 10 ? ms.toFixed(0) : ms.toFixed(1)} ms`;
}
function fmtCompact(n) {
  if (n == null) return "–";
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)}k`;
  return intFmt.format(Math.round(n));
}
const shortWorker = (w) => (w || "").replace(/^https?:\/\//, "");
const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB");

// -- DOM helpers (text only: request ids come from clients, never parse them as HTML) ---------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}
function setFigure(id, text, raw) {
  const node = document.getElementById(id);
  node.textContent = text;
  node.dataset.value = raw == null ? "" : String(raw);
}
const td = (text, cls) => el("td", cls ? { class: cls } : {}, text);

// -- SVG line chart ------------------------------------------------------------------------------
const SVG_NS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
// lines: [{color, points: [[t, v|null], ...], area?, dashed?}]; a null value breaks the line.
function lineChart(svg, lines, { tMax, span, yMax, yFmt }) {
  const W = Math.max(svg.clientWidth, 300), H = Math.max(svg.clientHeight, 120);
  const L = 56, R = 10, T = 8, B = 20;
  const tMin = tMax - span;
  const top = yMax ?? niceMax(Math.max(0, ...lines.flatMap((l) => l.points.map((p) => p[1] ?? 0))));
  const x = (t) => L + ((t - tMin) / span) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(svgEl("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(svgEl("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, yFmt(v)));
  }
  const step = span <= 120 ? 15 : 60;
  for (let ago = 0; ago <= span; ago += step) {
    const label = ago === 0 ? "now" : step < 60 ? `−${ago} s` : `−${ago / 60} min`;
    const anchor = ago === 0 ? "end" : ago === span ? "start" : "middle";
    svg.append(svgEl("text", { class: "axis", x: x(tMax - ago), y: H - 4, "text-anchor": anchor }, label));
  }
  let drawn = 0;
  for (const line of lines) {
    let d = "", open = false, firstX = 0, lastX = 0;
    const areas = [];
    for (const [t, v] of line.points) {
      if (t < tMin || v == null) {
        if (open && line.area) areas.push(`${d.slice(d.lastIndexOf("M"))}L${lastX},${y(0)}L${firstX},${y(0)}Z`);
        open = false;
        continue;
      }
      const px = x(t).toFixed(1), py = y(Math.min(v, top)).toFixed(1);
      if (!open) firstX = px;
      d += `${open ? "L" : "M"}${px},${py}`;
      lastX = px;
      open = true;
      drawn++;
    }
    if (open && line.area) areas.push(`${d.slice(d.lastIndexOf("M"))}L${lastX},${y(0)}L${firstX},${y(0)}Z`);
    for (const a of areas) svg.append(svgEl("path", { class: "area", d: a, fill: line.color }));
    if (d) {
      const attrs = { class: "line", d, stroke: line.color };
      if (line.dashed) attrs["stroke-dasharray"] = "6 4";
      svg.append(svgEl("path", attrs));
      // A point with no neighbour draws no line: mark it.
      for (const m of d.matchAll(/M([\d.]+),([\d.]+)(?=M|$)/g)) {
        svg.append(svgEl("circle", { cx: m[1], cy: m[2], r: 2.5, fill: line.color }));
      }
    }
  }
  if (!drawn) {
    svg.append(svgEl("text", { class: "empty", x: (L + W) / 2, y: H / 2, "text-anchor": "middle" },
      "no requests finished in this span"));
  }
  svg.dataset.points = String(drawn);
  const last = lines.length ? lines[0].points.findLast((p) => p[1] != null) : null;
  svg.dataset.last = last ? String(last[1]) : ""; // the first line's latest value, as the page shows it
}
const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// -- rendering -----------------------------------------------------------------------------------
function clusterScope(stats) {
  return stats.cluster && view.scope === "cluster";
}

function renderHeader(stats) {
  document.getElementById("policy").textContent = stats.policy;
  document.getElementById("store").textContent = stats.store;
  document.getElementById("replica").textContent = stats.replica;
  document.getElementById("scope-switch").hidden = !stats.cluster;
}

function renderKpis(stats) {
  const tot = clusterScope(stats) ? stats.cluster.totals : stats.totals;
  const scope = clusterScope(stats) ? `cluster: ${stats.cluster.live_replicas} live replica(s)` : "this replica";
  const last = view.series.at(-1);
  const sample = last && (clusterScope(stats) ? last.cluster : last);
  setFigure("kpi-requests", fmtInt(tot.requests), tot.requests);
  document.getElementById("kpi-requests-sub").textContent =
    `${scope}${sample ? ` · ${sample.requests_per_s.toFixed(1)}/s` : ""}`;
  setFigure("kpi-hit-actual", fmtPct(tot.hit_rate_actual), tot.hit_rate_actual);
  setFigure("kpi-hit-predicted", fmtPct(tot.hit_rate_predicted), tot.hit_rate_predicted);
  setFigure("kpi-saved", fmtInt(tot.prompt_tokens_saved), tot.prompt_tokens_saved);
  document.getElementById("kpi-saved-sub").textContent =
    `of ${fmtInt(tot.prompt_tokens)} prompt tokens not prefilled again`;
  // One replica's percentiles are exact, over the requests that have the figure (TTFT: streamed ones; a
  // whole answer arrives at once); the cluster's are estimated from histogram buckets, and say so.
  const what = { ttft: "streamed requests", tpot: "streamed requests with 2+ tokens" };
  for (const h of ["ttft", "tpot"]) {
    const basis = clusterScope(stats)
      ? "≈ estimated from histogram buckets"
      : `over the last ${stats.totals[`${h}_samples`] ?? 0} ${what[h]}`;
    setFigure(`kpi-${h}`, fmtDur(tot[`${h}_p50_s`]), tot[`${h}_p50_s`]);
    document.getElementById(`kpi-${h}-sub`).textContent =
      `p90 ${fmtDur(tot[`${h}_p90_s`])} · p99 ${fmtDur(tot[`${h}_p99_s`])} · ${basis}`;
  }
  setFigure("kpi-errors", fmtInt(tot.errors), tot.errors);
  document.getElementById("kpi-errors-sub").textContent =
    tot.requests ? `${fmtPct(tot.errors / tot.requests)} of requests` : "";
}

function renderCharts(stats) {
  const cluster = clusterScope(stats);
  const samples = view.series.map((s) => [s.t, cluster ? s.cluster || {} : s]);
  const tMax = Math.max(stats.time, view.lastT);
  const first = view.series.length ? view.series[0].t : tMax;
  const span = Math.min(CHART_SPAN_MAX_S, Math.max(60, Math.ceil((tMax - first) / 60) * 60));
  const pick = (key) => samples.map(([t, s]) => [t, s[key] ?? null]);
  lineChart(document.getElementById("chart-hit"),
    [{ color: css("--actual"), points: pick("hit_rate_actual"), area: true },
     { color: css("--predicted"), points: pick("hit_rate_predicted"), dashed: true }],
    { tMax, span, yMax: 1, yFmt: (v) => `${Math.round(v * 100)}%` });
  lineChart(document.getElementById("chart-tokens"),
    [{ color: css("--prompt"), points: pick("prompt_tokens_per_s") },
     { color: css("--saved"), points: pick("saved_tokens_per_s"), area: true }],
    { tMax, span, yFmt: fmtCompact });
  for (const h of ["ttft", "tpot"]) {
    lineChart(document.getElementById(`chart-${h}`),
      [{ color: css("--p99"), points: pick(`${h}_p99_s`) }, { color: css("--p50"), points: pick(`${h}_p50_s`) }],
      { tMax, span, yFmt: fmtDur });
  }
}

// One bar per tier, filled to the share of that tier's capacity on this worker the index says is used:
// never scaled to the busiest worker, where a small worker full to the brim would look near empty. A tier
// whose capacity the worker does not report (a plain OpenAI upstream) draws no bar; the columns count.
function tierBar(tier, blocks, capacity) {
  if (!capacity) return null;
  const share = Math.min(1, blocks / capacity);
  return el("div", { class: `tierbar ${tier}`, "data-tier": tier, "data-value": share,
    title: `${tier}: ${fmtInt(blocks)} of ${fmtInt(capacity)} blocks (${fmtPct(blocks / capacity)})` },
    el("span", { style: `width:${100 * share}%` }));
}

function renderWorkers(stats) {
  const rows = stats.workers.map((w) => {
    const bars = [tierBar("device", w.index_device_blocks, w.device_capacity_blocks),
      tierBar("host", w.index_host_blocks, w.host_capacity_blocks)].filter(Boolean);
    const bar = bars.length ? el("div", {}, ...bars) : el("span", { class: "muted" }, "capacity not reported");
    return el("tr", { "data-worker": w.id },
      td(shortWorker(w.id)), td(w.kind),
      el("td", {}, el("span", { class: `dot${w.available ? " up" : ""}` }), w.available ? "up" : "down"),
      td(fmtInt(w.load), "num"), td(fmtInt(w.in_flight), "num"), td(fmtInt(w.routed), "num"),
      td(fmtInt(w.index_device_blocks), "num"), td(fmtInt(w.index_host_blocks), "num"), el("td", {}, bar));
  });
  document.querySelector("#workers tbody").replaceChildren(...rows);
}

function renderRouting(stats) {
  const cluster = clusterScope(stats);
  const routing = (cluster ? stats.cluster.totals : stats.totals).routing || {};
  document.getElementById("routing-scope").textContent = cluster ? "cluster" : "this replica";
  const byPolicy = {};
  for (const [key, n] of Object.entries(routing)) {
    const [policy, reason] = key.split("/");
    (byPolicy[policy] ??= []).push([reason, n]);
  }
  const out = [];
  for (const [policy, reasons] of Object.entries(byPolicy).sort()) {
    const total = reasons.reduce((a, [, n]) => a + n, 0);
    out.push(el("div", { class: "policy" }, `${policy} · ${fmtInt(total)}`));
    for (const [reason, n] of reasons.sort((a, b) => b[1] - a[1])) {
      out.push(el("div", { class: "bar", "data-decision": `${policy}/${reason}`, "data-value": n },
        el("span", {}, reason),
        el("div", { class: "track" }, el("div", { class: "fill", style: `width:${(100 * n) / total}%` })),
        el("span", { class: "count" }, `${fmtInt(n)} · ${fmtPct(n / total)}`)));
    }
  }
  if (!out.length) out.push(el("div", { class: "muted" }, "no decisions yet"));
  document.getElementById("routing").replaceChildren(...out);
}

// Prompt tokens the index predicted cached for routed requests, by the fastest tier holding them on the
// chosen worker: a host or disk hit is loaded back to the device rather than recomputed (gateway/metrics.py).
function renderTierHits(stats) {
  const cluster = clusterScope(stats);
  const byTier = (cluster ? stats.cluster.totals : stats.totals).predicted_cached_tokens_by_tier || {};
  const total = Object.values(byTier).reduce((a, n) => a + n, 0);
  document.getElementById("tier-hits-scope").textContent =
    `${cluster ? "cluster" : "this replica"} · predicted cached tokens`;
  const rows = ["device", "host", "disk"].map((tier) => {
    const n = byTier[tier] || 0;
    return el("div", { class: "bar", "data-tier": tier, "data-value": n },
      el("span", {}, tier),
      el("div", { class: "track" }, el("div", { class: `fill ${tier}`, style: `width:${total ? (100 * n) / total : 0}%` })),
      el("span", { class: "count" }, `${fmtCompact(n)} · ${total ? fmtPct(n / total) : "–"}`));
  });
  document.getElementById("tier-hits").replaceChildren(...rows);
}

// Where the prompt tokens of requests with usage came from: the worker's own cache, a peer's (a KV fetch
// plan, docs/kv-transfer.md: counted apart from the index's predictions), or its forward passes; and how
// long the fetches took, as the workers reported them.
function renderKvFetch(stats) {
  const cluster = clusterScope(stats);
  const tot = cluster ? stats.cluster.totals : stats.totals;
  const sources = tot.prompt_tokens_by_source || {};
  const total = Object.values(sources).reduce((a, n) => a + n, 0);
  document.getElementById("kv-fetch-scope").textContent =
    `${cluster ? "cluster" : "this replica"} · requests whose worker reported usage`;
  const labels = { cached: "cached here", fetched: "fetched from a peer", computed: "computed" };
  const rows = ["cached", "fetched", "computed"].map((source) => {
    const n = sources[source] || 0;
    return el("div", { class: "bar", "data-source": source, "data-value": n },
      el("span", {}, labels[source]),
      el("div", { class: "track" }, el("div", { class: `fill ${source}`, style: `width:${total ? (100 * n) / total : 0}%` })),
      el("span", { class: "count" }, `${fmtCompact(n)} · ${total ? fmtPct(n / total) : "–"}`));
  });
  document.getElementById("kv-fetch").replaceChildren(...rows);
  const basis = cluster ? "≈ from histogram buckets" : `over the last ${stats.totals.kv_fetch_samples ?? 0} fetches`;
  const node = document.getElementById("kv-fetch-latency");
  node.textContent = tot.kv_fetch_p50_s == null
    ? "no KV fetches yet"
    : `fetch time p50 ${fmtDur(tot.kv_fetch_p50_s)} · p99 ${fmtDur(tot.kv_fetch_p99_s)} (${basis}) · ` +
      `${fmtInt(tot.kv_fetch_recomputed_tokens)} planned tokens recomputed`;
  node.dataset.value = tot.kv_fetch_p50_s == null ? "" : String(tot.kv_fetch_p50_s);
}

// P:D advice (gateway/pd_advisor.py): prefill + decode workers, or mixed ones, against what serves now.
function renderPdAdvice(stats) {
  const advice = stats.pd_advice;
  if (!advice) return;
  const w = advice.workload, slo = advice.slo;
  const targets = `TTFT ≤ ${fmtDur(slo.ttft_ms / 1000)}, ITL ≤ ${fmtDur(slo.itl_ms / 1000)}`;
  document.getElementById("pd-advice-sub").textContent = w
    ? `${targets} · ${w.request_rate.toFixed(2)} req/s, ${fmtInt(w.mean_prefill_tokens)} uncached prompt + ` +
      `${fmtInt(w.mean_output_tokens)} output tokens each`
    : targets;
  const rows = ["prefill", "decode", "mixed"].map((role) =>
    el("tr", { "data-role": role, "data-value": advice.needed[role] ?? "" },
      td(role === "mixed" ? "or mixed" : role), td(advice.needed[role] == null ? "–" : fmtInt(advice.needed[role]), "num"),
      td(fmtInt(advice.deployed[role]), "num")));
  document.querySelector("#pd-advice tbody").replaceChildren(...rows);
  const decided = advice.needed.prefill != null;
  const verdict = decided ? (advice.disaggregation_pays ? "disaggregation pays: " : "disaggregation does not pay: ") : "";
  const node = document.getElementById("pd-advice-reason");
  node.textContent = verdict + advice.reason;
  node.dataset.pays = String(advice.disaggregation_pays);
}

function renderReplicas(stats) {
  const panel = document.getElementById("replicas-panel");
  panel.hidden = !stats.cluster;
  if (!stats.cluster) return;
  const live = stats.cluster.live_replicas, all = stats.cluster.replicas.length;
  document.getElementById("replicas-sub").textContent =
    `${live} live of ${all} that ever reported under this key prefix`;
  const rows = stats.cluster.replicas.map((r) =>
    el("tr", { "data-replica": r.id },
      td(r.self ? `${r.id} (this page)` : r.id), td(r.live ? "live" : "stale"),
      td(fmtInt(r.requests), "num"), td(fmtInt(r.errors), "num"), td(fmtPct(r.hit_rate_actual), "num"),
      td(fmtPct(r.hit_rate_predicted), "num"), td(fmtInt(r.prompt_tokens_saved), "num"),
      td(fmtDur(r.ttft_p50_s), "num")));
  document.querySelector("#replicas tbody").replaceChildren(...rows);
}

function renderRecent(stats) {
  const rows = stats.recent.slice().reverse().map((r) =>
    el("tr", { class: r.status >= 400 ? "error" : "", "data-request": r.request_id },
      td(clock(r.time)), td(r.request_id), td(r.tenant), td(shortWorker(r.worker)),
      td(`${r.policy}/${r.reason}`), td(r.error ? `${r.status} ${r.error}` : r.status),
      td(fmtInt(r.prompt_tokens), "num"), td(fmtInt(r.predicted_cached_tokens), "num"),
      td(r.cached_tokens == null ? "n/a" : fmtInt(r.cached_tokens), "num"), td(fmtInt(r.completion_tokens), "num"),
      td(fmtDur(r.ttft_s), "num"), td(fmtDur(r.tpot_s), "num"), td(fmtDur(r.latency_s), "num")));
  document.querySelector("#recent tbody").replaceChildren(...rows);
}

function render() {
  const stats = view.stats;
  if (!stats) return;
  renderHeader(stats);
  renderKpis(stats);
  renderCharts(stats);
  renderWorkers(stats);
  renderRouting(stats);
  renderTierHits(stats);
  renderKvFetch(stats);
  renderPdAdvice(stats);
  renderReplicas(stats);
  renderRecent(stats);
}

function setStatus(ok, text) {
  const node = document.getElementById("status");
  node.className = `status ${ok ? "ok" : "error"}`;
  node.textContent = text;
}

async function poll() {
  try {
    const since = view.series.length ? view.lastT : 0;
    const response = await fetch(`stats?since=${since}`, { cache: "no-store", headers: statsHeaders() });
    if (response.status === 401 || response.status === 403) {
      const key = window.prompt("This gateway needs its admin or metrics key to show its statistics:");
      if (key) sessionStorage.setItem("prefixgate-key", key);
    }
    if (!response.ok) throw new Error(`/stats answered HTTP ${response.status}`);
    const stats = await response.json();
    if (since === 0) view.series = [];
    view.series.push(...(stats.series || []));
    if (view.series.length > KEEP_SAMPLES) view.series.splice(0, view.series.length - KEEP_SAMPLES);
    view.lastT = view.series.length ? view.series.at(-1).t : 0;
    view.stats = stats;
    render();
    setStatus(true, `live · ${clock(stats.time)}`);
  } catch (err) {
    setStatus(false, `not updating: ${err.message}`);
  } finally {
    view.polls += 1;
    document.body.dataset.polls = String(view.polls);
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("scope-switch").addEventListener("click", (event) => {
  const scope = event.target.dataset?.scope;
  if (!scope) return;
  view.scope = scope;
  for (const b of document.querySelectorAll("#scope-switch button")) b.classList.toggle("on", b.dataset.scope === scope);
  render();
});
window.addEventListener("resize", render);
poll();
