"""The dashboard page (HTML, CSS) and its script. The script polls `/api/v1/state` and rebuilds the view with
DOM calls and `textContent` only: model names and peer ids come from the DHT, where anyone can write."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Pollen swarm health</title>
<style>
  body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; display: flex; gap: 24px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  header .meta { color: #b9c0cc; font-size: 13px; }
  main { padding: 16px 24px; max-width: 1300px; }
  .model { background: #fff; border: 1px solid #dde1e7; border-radius: 8px; padding: 14px 18px; margin-bottom: 18px; }
  .model h2 { font-size: 16px; margin: 0 0 6px 0; display: flex; gap: 12px; align-items: center; }
  .badge { font-size: 12px; font-weight: 700; padding: 2px 10px; border-radius: 10px; color: #fff;
           text-transform: uppercase; letter-spacing: .04em; }
  .badge.healthy { background: #1e9e4a; } .badge.broken { background: #d93025; }
  .summary { color: #5b6474; margin-bottom: 8px; }
  .blocks { display: flex; flex-wrap: wrap; gap: 2px; margin: 8px 0 12px 0; }
  .block { width: 18px; height: 18px; border-radius: 3px; font-size: 10px; color: #fff; text-align: center;
           line-height: 18px; }
  .c0 { background: #d93025; } .c1 { background: #8bc34a; } .c2 { background: #43a047; } .c3 { background: #1b6e34; }
  table { border-collapse: collapse; width: 100%; font-size: 13px; }
  th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceff3; white-space: nowrap; }
  th { color: #5b6474; font-weight: 600; }
  .st-online { color: #1e9e4a; } .st-joining { color: #f29900; } .st-draining { color: #f29900; }
  .st-offline, .st-unreachable { color: #d93025; }
  .span { display: inline-flex; gap: 1px; vertical-align: middle; }
  .span i { width: 6px; height: 12px; background: #e3e6ea; display: inline-block; }
  .span i.on { background: #3f7be0; }
  .legend { color: #5b6474; font-size: 12px; margin-bottom: 12px; }
  .legend span { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -2px; }
  .error { color: #d93025; }
</style>
</head>
<body>
<header><h1>Pollen swarm</h1><span class="meta" id="meta">loading…</span></header>
<main>
  <div class="legend">Blocks by servers holding them:
    <span class="c0"></span> none &nbsp; <span class="c1"></span> 1 &nbsp; <span class="c2"></span> 2 &nbsp;
    <span class="c3"></span> 3+ &nbsp;·&nbsp; JSON: <a href="/api/v1/state">/api/v1/state</a>
    &nbsp;·&nbsp; <a href="/metrics">/metrics</a></div>
  <div id="models"></div>
  <noscript>This page needs JavaScript; the same data is at <a href="/api/v1/state">/api/v1/state</a>.</noscript>
</main>
<script src="/dashboard.js"></script>
</body>
</html>
"""

SCRIPT = r"""
"use strict";
const REFRESH_MS = 2000;
let lastUpdated = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function blockRow(report) {
  const row = el("div", {class: "blocks", "data-testid": "blocks"});
  report.block_coverage.forEach((n, i) => {
    const cell = el("div", {class: "block c" + Math.min(n, 3) + (n === 0 ? " hole" : ""),
                            "data-block": i, "data-servers": n,
                            title: "block " + i + ": " + n + " server" + (n === 1 ? "" : "s")}, n);
    row.append(cell);
  });
  return row;
}

function spanBar(row, numBlocks) {
  const bar = el("span", {class: "span"});
  for (let i = 0; i < numBlocks; i++) {
    bar.append(el("i", {class: i >= row.span.start && i < row.span.end ? "on" : ""}));
  }
  return bar;
}

function serverTable(report) {
  const head = ["server", "address", "blocks", "", "state", "tokens/s", "precision", "adapters",
                "cache tokens left", "sessions", "ping", "version"];
  const header = el("tr", {}, ...head.map(h => el("th", {}, h)));
  const table = el("table", {"data-testid": "servers"}, el("thead", {}, header));
  const body = el("tbody");
  for (const row of report.server_rows) {
    const info = row.span.server_info;
    const precision = info.quant_type && info.quant_type !== "none" ? info.quant_type : info.torch_dtype;
    body.append(el("tr", {"data-peer": row.peer_id, "data-state": row.state},
      el("td", {title: row.peer_id}, row.short_peer_id),
      el("td", {}, row.address || ""),
      el("td", {}, row.span.start + ":" + row.span.end),
      el("td", {}, spanBar(row, report.num_blocks)),
      el("td", {class: "st-" + row.state}, row.state),
      el("td", {}, Number(info.throughput).toFixed(1)),
      el("td", {}, precision),
      el("td", {}, (row.adapters || []).join(", ") || "–"),
      el("td", {}, info.cache_tokens_left),
      el("td", {}, info.active_sessions ?? ""),
      el("td", {}, row.rtt_ms == null ? "–" : row.rtt_ms.toFixed(1) + " ms"),
      el("td", {}, info.version || "")));
  }
  table.append(body);
  return table;
}

function modelCard(report) {
  const online = report.server_rows.filter(r => r.state === "online").length;
  const missing = report.missing_blocks;
  const card = el("section", {class: "model", "data-model": report.name, "data-state": report.state},
    el("h2", {}, report.name, el("span", {class: "badge " + report.state, "data-testid": "state"}, report.state)),
    el("div", {class: "summary"},
       report.num_blocks + " blocks · " + online + " online server" + (online === 1 ? "" : "s") +
       (report.served_here ? " · served by this gateway" : "") +
       (missing.length ? " · no server holds block" + (missing.length > 1 ? "s " : " ") + missing.join(", ") : "")),
    blockRow(report), serverTable(report));
  return card;
}

function render(state) {
  const models = document.getElementById("models");
  models.replaceChildren(...state.model_reports.map(modelCard));
  if (!state.model_reports.length) models.append(el("p", {}, "No models announced in this swarm."));
  lastUpdated = state.last_updated;
  const boot = state.bootstrap_states.filter(s => s === "online").length;
  const meta = document.getElementById("meta");
  meta.dataset.bootstrap = boot + " of " + state.bootstrap_states.length;
  meta.className = "meta";
  tick();
}

function tick() {
  const meta = document.getElementById("meta");
  if (!lastUpdated) return;
  const ago = Math.max(0, Math.round(Date.now() / 1000 - lastUpdated));
  meta.textContent = "dht-nodes online: " + meta.dataset.bootstrap + " · updated " + ago + " s ago";
}

async function refresh() {
  try {
    const response = await fetch("/api/v1/state", {cache: "no-store"});
    const state = await response.json();
    if (!response.ok) throw new Error(state.error || response.statusText);
    render(state);
  } catch (e) {
    const meta = document.getElementById("meta");
    meta.textContent = "cannot read the state: " + e.message;
    meta.className = "meta error";
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
setInterval(tick, 1000);
"""
