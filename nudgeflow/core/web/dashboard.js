// Renders /dashboard.json (nudgeflow.core.dashboard) every two seconds. No library:
// the server does the arithmetic, this only formats and places the numbers.
"use strict";

const POLL_MS = 2000;
const DASH = "–";

const count = (n) => (n === null || n === undefined ? DASH : Math.round(n).toLocaleString("en-US"));
const ms = (n) => (n === null || n === undefined ? DASH : `${n.toFixed(1)} ms`);
const pct = (x) => (x === null || x === undefined ? DASH : `${(x * 100).toFixed(1)}%`);
const signedPct = (x) => (x === null || x === undefined ? DASH : `${x >= 0 ? "+" : ""}${(x * 100).toFixed(1)}%`);
// An absolute lift, in percentage points, as `nudgeflow report` prints it.
const points = (x) => (x === null || x === undefined ? DASH : `${x >= 0 ? "+" : ""}${(x * 100).toFixed(2)} pp`);
const rate = (x) => (x === null || x === undefined ? DASH : x.toFixed(1));
const money = (x) => (x === null || x === undefined ? DASH : x.toFixed(2));
const pairs = (obj) => Object.entries(obj).map(([k, v]) => `${k} ${count(v)}`).join(", ");

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

// Replaces a table's rows: one <tr data-KEY=…> per row, one <td data-col=…> per column.
function fillRows(tableId, rows, keys, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  const fresh = document.createElement("tbody");
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const key of keys) tr.dataset[key] = row[key];
    for (const [col, format, cls] of columns) {
      const td = document.createElement("td");
      td.dataset.col = col;
      if (cls) td.className = cls;
      td.textContent = format(row);
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function showEmpty(id, tableId, empty) {
  document.getElementById(id).hidden = !empty;
  if (tableId) document.getElementById(tableId).hidden = empty;
}

function renderLatency(lat) {
  setText("latency-budget", String(lat.budget_ms));
  for (const q of ["p50", "p95", "p99"]) {
    const el = document.getElementById(`latency-${q}`);
    const value = lat[`${q}_ms`];
    el.textContent = ms(value);
    el.className = "value" + (value === null ? "" : value > lat.budget_ms ? " over" : " under");
  }
  setText("latency-within", pct(lat.within_budget));
  setText("latency-count", count(lat.count));
  // The bar spans twice the budget, so the budget line sits in the middle.
  const bar = document.getElementById("latency-bar");
  const p99 = lat.p99_ms === null ? 0 : lat.p99_ms;
  bar.querySelector(".fill").style.width = `${Math.min(100, (p99 / (2 * lat.budget_ms)) * 100)}%`;
  bar.querySelector(".fill").style.background = p99 > lat.budget_ms ? "#cf222e" : "#54aeff";
  bar.querySelector(".budget").style.left = "50%";
  fillRows("latency-rules", lat.by_rule, ["rule"], [
    ["rule", (r) => r.rule, "text"],
    ["p50", (r) => ms(r.p50_ms)],
    ["p95", (r) => ms(r.p95_ms)],
    ["p99", (r) => ms(r.p99_ms)],
    ["within", (r) => pct(r.within_budget)],
    ["count", (r) => count(r.count)],
  ]);
  showEmpty("latency-empty", "latency-rules", lat.by_rule.length === 0);
}

function render(s) {
  setText("events-per-s", rate(s.events.per_s));
  setText("events-total", count(s.events.total));
  for (const outcome of ["applied", "duplicate", "late"]) {
    setText(`events-${outcome}`, count(s.events.by_outcome[outcome] || 0));
  }
  renderLatency(s.latency);
  for (const q of ["p50", "p95", "p99"]) setText(`timer-${q}`, ms(s.timer_lag[`${q}_ms`]));
  setText("timer-count", count(s.timer_lag.count));

  const sum = (obj) => Object.values(obj).reduce((a, b) => a + b, 0);
  fillRows("triggers", s.triggers, ["rule"], [
    ["rule", (r) => r.rule, "text"],
    ["detected", (r) => count(r.detected)],
    ["dispatched", (r) => count(r.dispatched)],
    ["suppressed", (r) => count(sum(r.suppressed))],
    ["reasons", (r) => pairs(r.suppressed) || DASH, "text"],
    ["delivered", (r) => count(r.delivered)],
    ["failed", (r) => count(r.failed)],
    ["retried", (r) => count(r.retried)],
  ]);
  showEmpty("triggers-empty", "triggers", s.triggers.length === 0);

  const letters = Object.entries(s.dead_letters).map(([reason, n]) => ({ reason, n }));
  fillRows("dead-letters", letters, ["reason"], [
    ["reason", (r) => r.reason, "text"],
    ["count", (r) => count(r.n)],
  ]);
  showEmpty("dead-letters-empty", "dead-letters", letters.length === 0);

  const ex = s.experiments;
  fillRows("experiments", ex.variants, ["rule", "variant"], [
    ["rule", (r) => r.rule, "text"],
    ["variant", (r) => (r.variant || "(no experiment)") + (r.baseline ? " (baseline)" : ""), "text"],
    ["measured", (r) => count(r.attributed)],
    ["converted", (r) => count(r.converted)],
    ["conversion", (r) => pct(r.conversion_rate)],
    ["lift", (r) => (r.baseline ? "" : points(r.lift))],
    ["relative", (r) => (r.baseline ? "" : signedPct(r.relative_lift))],
    ["revenue", (r) => money(r.revenue)],
    ["outcomes", (r) => pairs(r.outcomes) || DASH, "text"],
  ]);
  showEmpty("experiments-empty", null, !ex.available);
  document.getElementById("experiments").hidden = ex.variants.length === 0;

  const updated = document.getElementById("updated");
  updated.textContent = new Date(s.at_ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  updated.dataset.at = String(s.at_ms);
}

async function poll() {
  try {
    const response = await fetch("dashboard.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    setText("status", "");
  } catch (err) {
    // Keep the last numbers on screen; say that they are stale.
    setText("status", `cannot update: ${err.message}`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
