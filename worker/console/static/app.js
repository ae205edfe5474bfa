// chat-worker console: live state over server-sent events, dead letters over fetch.
// Plain DOM, no framework; every value from the server is set as text, never as HTML.
"use strict";

const COLORS = ["#2f6fed", "#1f9d61", "#d98a04", "#8e44ad", "#d6453d", "#16a2b8", "#6b7385"];
const TOKEN_KEY = "chat-worker-console-token";
const PAGE = 25;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

let state = null;
let lastDeadCount = null;
let letters = { items: [], total: 0, codes: {} };
let offset = 0;
let lettersLoadedAt = 0;
const selected = new Set();

// ---- small helpers ----------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
function fmt(n, digits) {
  if (n === null || n === undefined) return "–";
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits ?? 1 });
}
function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.round(seconds / 60) + " min";
  if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}
function since(iso) {
  return iso ? ago((Date.now() - Date.parse(iso)) / 1000) + " ago" : "–";
}
function fill(tbody, rows, columns, emptyText) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: String(columns), text: emptyText }))]));
}
function usd(n) {
  if (n === null || n === undefined) return "–";
  return "$" + Number(n).toLocaleString(undefined, { minimumFractionDigits: 2, maximumFractionDigits: n < 1 ? 4 : 2 });
}
function percent(ratio) { return ratio === null || ratio === undefined ? "–" : (ratio * 100).toFixed(1) + "%"; }
function bar(fraction, kind) {
  const node = el("div", { class: "bar" + (kind ? " " + kind : "") }, el("span"));
  node.firstChild.style.width = (100 * Math.min(Math.max(fraction, 0), 1)).toFixed(1) + "%";
  return node;
}
function cell(text, cls) { return el("td", { class: cls || "", text: String(text) }); }
function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = "banner " + (kind || "info");
  box.hidden = !text;
}

// ---- charts: inline SVG ----------------------------------------------------------
function niceMax(value) {
  if (value <= 0) return 1;
  const exp = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * exp) return step * exp;
  return 10 * exp;
}
function chart(container, series, unit) {
  const W = 600, H = 190, L = 44, R = 8, T = 10, B = 22;
  const n = series.length ? series[0].values.length : 60;
  const top = niceMax(Math.max(0, ...series.flatMap((s) => s.values)) * 1.1);
  const x = (i) => L + (i * (W - L - R)) / Math.max(n - 1, 1);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  const grid = svg("g", { class: "grid" }), axis = svg("g", { class: "axis" });
  for (let k = 0; k <= 4; k++) {
    const v = (top * k) / 4;
    grid.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const label = svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" });
    label.textContent = fmt(v, 2);
    axis.append(label);
  }
  [["−10 min", 0, "start"], ["−5 min", (n - 1) / 2, "middle"], ["now", n - 1, "end"]].forEach(([text, i, anchor]) => {
    const label = svg("text", { x: x(i), y: H - 5, "text-anchor": anchor });
    label.textContent = text;
    axis.append(label);
  });
  root.append(grid, axis);
  const legend = el("div", { class: "legend" });
  series.forEach((s, k) => {
    const color = s.color || COLORS[k % COLORS.length];
    const points = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const g = svg("g", { class: "series" });
    g.append(svg("polygon", { points: `${x(0)},${y(0)} ${points} ${x(n - 1)},${y(0)}`, fill: color }));
    g.append(svg("polyline", { points, stroke: color }));
    root.append(g);
    const last = s.values.length ? s.values[s.values.length - 1] : 0;
    legend.append(el("span", {}, el("i", { class: "swatch" }), `${s.name} · ${fmt(last, 2)} ${unit}`));
    legend.lastChild.firstChild.style.background = color;
  });
  if (!series.length) legend.append(el("span", { text: "no data yet" }));
  container.replaceChildren(root, legend);
}
function spark(values) {
  const W = 120, H = 22, top = Math.max(...values, 0) || 1;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark", preserveAspectRatio: "none" });
  const points = values.map((v, i) => `${((i * W) / Math.max(values.length - 1, 1)).toFixed(1)},${(H - 2 - (v / top) * (H - 4)).toFixed(1)}`).join(" ");
  root.append(svg("polyline", { points }));
  return root;
}

// ---- live state -------------------------------------------------------------------
function render(s) {
  state = s;
  $("broker").textContent = s.broker.connected ? "broker connected" : "broker unreachable";
  $("broker").className = "pill " + (s.broker.connected ? "ok" : "bad");
  $("mode").textContent = s.actions ? "actions on" : "read-only";
  $("readonly").hidden = s.actions;
  const hasToken = !!sessionStorage.getItem(TOKEN_KEY);
  $("signin").hidden = !s.actions || hasToken;
  $("signout").hidden = !s.actions || !hasToken;
  $("updated").textContent = "updated " + new Date(s.generated_at * 1000).toLocaleTimeString() +
    (s.heartbeats_dropped ? ` · ${s.heartbeats_dropped} malformed heartbeats dropped` : "");
  $("updated").title = s.last_drop ? "last dropped: " + s.last_drop : "";

  const recent = s.recent;
  $("k-workers").textContent = `${s.alive} / ${s.workers.length}`;
  $("k-inflight").textContent = fmt(s.in_flight, 0);
  $("k-jobs").textContent = fmt(s.jobs.ok + s.jobs.error, 0);
  $("k-jps").textContent = fmt(recent.jobs_per_s, 2);
  $("k-tps").textContent = fmt(recent.tokens_per_s, 1);
  $("k-err").textContent = (recent.error_ratio * 100).toFixed(1) + "%";
  $("k-err").className = "value" + (recent.error_ratio > 0 ? " bad" : "");
  $("k-dlq").textContent = fmt(s.dead_letters, 0);
  $("k-dlq").className = "value" + (s.dead_letters > 0 ? " bad" : "");
  $("k-spend").textContent = usd(s.spend.total_usd);
  const cache = s.cache;
  $("k-cache").textContent = cache.workers ? percent(cache.recent_hit_rate ?? cache.hit_rate) : "off";
  $("k-cache").title = cache.workers ? `since start: ${percent(cache.hit_rate)} of ${cache.hit + cache.miss} lookups` : "no worker has a result store (WORKER_REDIS_URL)";

  const series = s.series;
  chart($("chart-jobs"), [
    { name: "ok", values: series.jobs_ok, color: "#1f9d61" },
    { name: "failed", values: series.jobs_error, color: "#d6453d" },
  ], "/s");
  chart($("chart-tokens"), Object.entries(series.tokens).map(([model, values]) => ({ name: model, values })), "tok/s");

  fill($("workers").tBodies[0], s.workers.map((w) => {
    const lanes = el("td");
    for (const [queue, lane] of Object.entries(w.lanes)) {
      lanes.append(el("span", { class: "tag", text: `${queue} ${lane.in_flight ?? "–"}${lane.weight > 1 ? " · w" + lane.weight : ""}` }));
    }
    const stateTag = !w.alive ? ["silent", "tag"] : w.ready ? ["consuming", "tag ok"] : ["not ready", "tag warn"];
    const row = el("tr", { class: w.alive ? "" : "silent", "data-worker": w.worker },
      cell(w.worker, "mono"), el("td", {}, el("span", { class: stateTag[1], text: stateTag[0] })), lanes,
      cell(w.concurrency ? `${w.in_flight} / ${w.concurrency}` : w.in_flight, "num"),
      cell(fmt(w.jobs.ok || 0, 0), "num"), cell(fmt(w.jobs.error || 0, 0), "num"),
      cell(since(w.started_at)), cell(ago(w.seconds_since_seen) + " ago"));
    return row;
  }), 8, "No worker heard from yet: workers publish a heartbeat every 2 s (WORKER_EVENTS=true).");

  const codes = Object.keys(s.errors);
  fill($("errors").tBodies[0], codes.map((code) => el("tr", {},
    cell(code, "mono"), cell(fmt(recent.errors_per_min[code] || 0, 2), "num"), cell(fmt(s.errors[code], 0), "num"),
    el("td", {}, spark(series.errors[code] || series.jobs_ok.map(() => 0))))), 4, "No errors.");

  fill($("upstreams").tBodies[0], Object.entries(s.upstreams).map(([name, u]) => {
    const cls = u.state === "open" ? "tag ok" : u.state === "cooling" ? "tag warn" : "tag bad";
    return el("tr", {}, cell(name, "mono"), el("td", {}, el("span", { class: cls, text: u.state || "?" })),
      cell(fmt(u.remaining_requests, 0), "num"), cell(fmt(u.remaining_tokens, 0), "num"),
      cell(u.cooldown_s ? ago(u.cooldown_s) : "–", "num"), cell(u.workers, "num"));
  }), 6, "No upstream reported by the workers.");

  renderBatches(s);
  renderSpend($("spend-tenants"), s.spend.tenants, "No priced job yet (or no tenant).");
  renderSpend($("spend-models"), s.spend.models, "No priced job yet.");
  $("cache-line").textContent = cache.workers
    ? `Cache (${cache.workers} worker${cache.workers === 1 ? "" : "s"} with a store): ${cache.hit} hits, ${cache.miss} misses ` +
      `(hit rate ${percent(cache.hit_rate)} since start, ${percent(cache.recent_hit_rate)} over 10 min), ` +
      `${cache.stored} answered from the result store, ${cache.skipped} store operations skipped.`
    : "Cache: no worker has a result store.";

  const deepest = Math.max(1, ...s.lanes.map((q) => q.depth || 0));
  fill($("queues").tBodies[0], s.lanes.map((q) => {
    const bar = el("div", { class: "bar" + (q.kind === "dead letters" ? " dead" : q.kind === "delay" ? " delay" : "") }, el("span"));
    bar.firstChild.style.width = ((100 * (q.depth || 0)) / deepest).toFixed(1) + "%";
    const role = q.kind === "delay" ? `delay ${q.delay_s} s` : q.kind;
    return el("tr", { "data-queue": q.name }, cell(q.lane, "mono"), cell(q.name, "mono"), cell(role),
      cell(q.depth === null ? "absent" : fmt(q.depth, 0), "num"), el("td", {}, bar), cell(q.consumers ?? "–", "num"));
  }), 6, "No queue.");

  // A new count means new rows; otherwise a refresh now and then keeps the ages right.
  if (s.dead_letters !== lastDeadCount || Date.now() - lettersLoadedAt > 10000) {
    lastDeadCount = s.dead_letters;
    loadLetters();
  }
}

const CANCELLABLE = new Set(["validating", "in_progress"]);
function renderBatches(s) {
  const live = s.batches.filter((b) => CANCELLABLE.has(b.status) || b.status === "cancelling" || b.status === "finalizing").length;
  $("batches-summary").textContent = s.gateways.length
    ? `${s.batches.length} in the last day, ${live} running · ${s.gateways.filter((g) => g.alive).length} gateway${s.gateways.length === 1 ? "" : "s"} reporting`
    : "";
  fill($("batches").tBodies[0], s.batches.map((b) => {
    const cls = b.status === "completed" ? "tag ok" : b.status === "failed" || b.status === "expired" ? "tag bad"
      : b.status === "cancelling" || b.status === "cancelled" ? "tag warn" : "tag";
    const action = el("td");
    if (CANCELLABLE.has(b.status)) {
      const button = el("button", { class: "ghost small", "data-batch": b.id, text: "Cancel" });
      button.disabled = !s.actions;
      button.title = s.actions ? "cancel this batch (needs the console token)" : "read-only: actions are off";
      button.addEventListener("click", () => cancelBatch(b.id));
      action.append(button);
    }
    return el("tr", { "data-batch": b.id }, cell(b.id, "mono"), cell(b.tenant ?? "–", "mono"),
      el("td", {}, el("span", { class: cls, text: b.status })),
      cell(`${fmt(b.completed + b.failed, 0)} / ${fmt(b.total, 0)}`, "num"), cell(fmt(b.failed, 0), "num"),
      el("td", { title: percent(b.progress) }, bar(b.progress, b.failed ? "mixed" : "")),
      cell(ago(b.age_s), "num"), cell(usd(b.cost), "num"), action);
  }), 9, s.gateways.length ? "No batch in the last day." : "No gateway heard from: gateways report their batches every 2 s.");
}
function renderSpend(table, costs, emptyText) {
  const top = Math.max(...Object.values(costs), 0) || 1;
  fill(table.tBodies[0], Object.entries(costs).map(([name, cost]) =>
    el("tr", {}, cell(name, "mono"), cell(usd(cost), "num"), el("td", {}, bar(cost / top)))), 3, emptyText);
}

// ---- dead letters -----------------------------------------------------------------
function filters() {
  const form = new FormData($("dl-filter"));
  const params = new URLSearchParams();
  for (const [k, v] of form.entries()) if (v) params.set(k, v);
  return params;
}
async function loadLetters() {
  lettersLoadedAt = Date.now();
  const params = filters();
  params.set("offset", offset);
  params.set("limit", PAGE);
  const response = await fetch("/api/dead-letters?" + params);
  if (!response.ok) { $("dl-summary").textContent = "could not list: " + (await response.text()); return; }
  letters = await response.json();
  const codeSelect = $("dl-filter").elements.code;
  const current = codeSelect.value;
  codeSelect.replaceChildren(el("option", { value: "", text: "any" }),
    ...Object.entries(letters.codes).map(([c, n]) => el("option", { value: c, text: `${c} (${n})` })));
  codeSelect.value = current in letters.codes ? current : "";
  $("dl-summary").textContent = `${letters.total} shown of ${letters.listed}${letters.truncated ? " (listing cut at the scan limit)" : ""}`;
  fill($("letters").tBodies[0], letters.items.map((d) => {
    const box = el("input", { type: "checkbox", "data-job": d.job_id || "" });
    box.checked = selected.has(d.job_id);
    box.addEventListener("change", () => { box.checked ? selected.add(d.job_id) : selected.delete(d.job_id); updateButtons(); });
    return el("tr", { "data-job": d.job_id || "" }, el("td", { class: "check" }, box), cell(d.job_id || "–", "mono"), cell(d.custom_id || "–", "mono"),
      el("td", {}, el("span", { class: "tag bad", text: d.error_code || d.reason })), el("td", { class: "msg", title: d.error_message || "", text: d.error_message || "–" }),
      cell(d.attempts ?? "–", "num"), el("td", { class: "num", title: d.age_known ? "since the request was published" : "since this console first saw it (the message carries no time)", text: (d.age_known ? "" : "≥ ") + ago(d.age_s) }), cell(d.lane, "mono"));
  }), 8, "No dead letters.");
  const last = Math.min(offset + PAGE, letters.total);
  $("dl-page").textContent = letters.total ? `${offset + 1}–${last} of ${letters.total}` : "";
  $("dl-prev").disabled = offset === 0;
  $("dl-next").disabled = last >= letters.total;
  $("dl-all").checked = false;
  updateButtons();
}
function updateButtons() {
  const actions = state ? state.actions : false;
  $("replay-selected").disabled = !actions || selected.size === 0;
  $("replay-selected").textContent = selected.size ? `Replay selected (${selected.size})` : "Replay selected";
  const code = $("dl-filter").elements.code.value;
  $("replay-code").disabled = !actions || !code;
  $("replay-code").textContent = code ? `Replay all ${code}` : "Replay all of a code";
}

// ---- actions ----------------------------------------------------------------------
function askToken() {
  return new Promise((resolve) => {
    const dialog = $("token-dialog");
    $("token-input").value = "";
    dialog.addEventListener("close", () => {
      const token = dialog.returnValue === "ok" ? $("token-input").value.trim() : "";
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      resolve(token || null);
    }, { once: true });
    dialog.showModal();
  });
}
// An action with the console token (asked once, kept in the tab); null when refused.
async function act(url, body, nothing) {
  const token = sessionStorage.getItem(TOKEN_KEY) || (await askToken());
  if (!token) { notice(`This needs the console token: ${nothing}.`, "error"); return null; }
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
    body: JSON.stringify(body),
  });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    notice(`The token was refused: ${nothing}.`, "error");
    return null;
  }
  return response;
}
async function cancelBatch(id) {
  if (!window.confirm(`Cancel batch ${id}? Lines not yet called end cancelled.`)) return;
  const response = await act(`/api/batches/${encodeURIComponent(id)}/cancel`, {}, "nothing was cancelled");
  if (response === null) return;
  if (!response.ok) notice("Cancel failed: " + (await response.text()), "error");
  else notice(`Asked the gateways to cancel ${id}: it shows cancelling, then cancelled.`, "info");
}
async function replay(selection, what) {
  const response = await act("/api/replay", selection, "nothing was replayed");
  if (response === null) {
    // refused or no token: said so
  } else if (!response.ok) {
    notice("Replay failed: " + (await response.text()), "error");
  } else {
    const result = await response.json();
    notice(`Replayed ${result.replayed} dead letter${result.replayed === 1 ? "" : "s"} (${what}).`, "info");
    selected.clear();
  }
  if (state) render(state);
  loadLetters();
}

// ---- wiring -----------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/events");
  source.onmessage = (event) => render(JSON.parse(event.data));
  source.onerror = () => { $("broker").textContent = "console unreachable"; $("broker").className = "pill bad"; };
}
document.addEventListener("DOMContentLoaded", () => {
  $("dl-filter").addEventListener("input", () => { offset = 0; loadLetters(); });
  $("dl-filter").addEventListener("submit", (e) => e.preventDefault());
  $("dl-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); loadLetters(); });
  $("dl-next").addEventListener("click", () => { offset += PAGE; loadLetters(); });
  $("dl-all").addEventListener("change", (e) => {
    for (const d of letters.items) if (d.job_id) (e.target.checked ? selected.add(d.job_id) : selected.delete(d.job_id));
    document.querySelectorAll("#letters tbody input[type=checkbox]").forEach((b) => { b.checked = e.target.checked; });
    updateButtons();
  });
  $("replay-selected").addEventListener("click", () => replay({ job_ids: [...selected] }, `${selected.size} selected`));
  $("replay-code").addEventListener("click", () => { const code = $("dl-filter").elements.code.value; replay({ code }, "code " + code); });
  $("signin").addEventListener("click", async () => { await askToken(); if (state) render(state); });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); if (state) render(state); });
  // The state of when the page was served is in it: drawn at once, before the first event.
  const initial = document.getElementById("initial-state");
  if (initial) render(JSON.parse(initial.textContent));  // which loads the dead letters
  else loadLetters();
  connect();
});
