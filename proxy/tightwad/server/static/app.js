// tightwad's dashboard: polls /tightwad/dashboard.json with the token as a bearer header and
// draws it. No library, no build step: the pool may have no internet.
"use strict";

const REFRESH_MS = 1000;
const KEY = "tightwad-token";
const $ = (id) => document.getElementById(id);

function fmt(value, digits) {
  return value === null || value === undefined || Number.isNaN(value) ? "-" : Number(value).toFixed(digits);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// The token: from the address's fragment (never sent to a server), else the form; kept in
// this tab only.
function takeFragmentToken() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
}

function showLogin(message) {
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

let timer = null;

async function poll() {
  const token = sessionStorage.getItem(KEY);
  // Without a token the form comes first (a proxy without auth.token takes any token).
  if (token === null) { showLogin(""); return; }
  const headers = { Authorization: "Bearer " + token };
  let answer;
  try {
    answer = await fetch("/tightwad/dashboard.json", { headers, cache: "no-store" });
  } catch (err) {
    $("updated").textContent = "the proxy does not answer (" + err.message + ")";
    $("updated").className = "bad-text";
    schedule();
    return;
  }
  if (answer.status === 401) {
    sessionStorage.removeItem(KEY);
    showLogin("that token was refused");
    return;
  }
  if (!answer.ok) {
    $("updated").textContent = "the proxy answered " + answer.status;
    $("updated").className = "bad-text";
    schedule();
    return;
  }
  const picture = await answer.json();
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  draw(picture);
  schedule();
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(poll, REFRESH_MS);
}

// -- drawing ------------------------------------------------------------------------------

function card(id, title, healthy, lines, extraClass) {
  const node = el("div", { class: "card " + (healthy ? "ok" : "bad") + (extraClass ? " " + extraClass : ""), id },
    el("h3", {}, el("span", { class: "state" }, healthy ? "ok" : "down"), title));
  for (const line of lines) node.append(el("p", {}, line));
  return node;
}

function depthBar(runs, total) {
  const bar = el("div", { class: "depth", title: "layers along the model's depth" });
  for (const [first, last] of runs) {
    const span = el("span", {});
    span.style.left = (100 * first / total) + "%";
    span.style.width = (100 * (last - first + 1) / total) + "%";
    bar.append(span);
  }
  return bar;
}

function runsText(runs) {
  return runs.map(([a, b]) => (a === b ? String(a) : a + "-" + b)).join(", ");
}

// Layer n (the last index) is the output layer.
function layersText(runs, output) {
  return runs.map(([a, b]) => {
    if (b !== output) return a === b ? String(a) : a + "-" + b;
    if (a === b) return "output";
    return (a === b - 1 ? String(a) : a + "-" + (b - 1)) + " + output";
  }).join(", ");
}

function drawPool(picture) {
  const s = picture.status || {};
  const h = picture.health;
  const target = s.target || {};
  const services = $("services");
  services.replaceChildren(
    card("card-proxy", "proxy", true, [
      "mode " + s.mode + ", speculation " + (s.speculation_active ? "active" : "inactive")]),
    card("card-coordinator", "coordinator", h.coordinator.healthy, [
      h.coordinator.url,
      (target.model ? target.model.split("/").pop() : "model unknown") + (target.n_ctx ? ", " + target.n_ctx + " ctx per slot" : ""),
      "verify: " + (target.verify || "-")]));
  if (h.drafter) {
    const d = s.drafter || {};
    const lines = [h.drafter.url];
    if (!h.drafter.healthy || d.last_error) lines.push(el("span", { class: "bad-text" }, d.last_error || "no answer to /health"));
    const last = picture.speculation.last_fallback;
    if (last) lines.push("last fallback: " + last.reason + " (" + Math.round(picture.time - last.at) + " s ago)");
    services.append(card("card-drafter", "drafter", h.drafter.healthy, lines));
  }
  const pool = picture.pool;
  const workers = $("workers");
  workers.replaceChildren();
  if (!pool) {
    $("pool-note").textContent = "Workers: this proxy was started without the pool's state " +
      "(tightwad start --local passes it) or description (dashboard.pool_file, which the " +
      "Ansible proxy role sets), so it shows the coordinator and drafter only.";
    return;
  }
  if (pool.error) { $("pool-note").textContent = pool.error + (pool.fix ? "; fix: " + pool.fix : ""); return; }
  const total = Math.max(pool.n_layers, 1);
  for (const w of pool.workers) {
    const lines = [];
    for (const d of w.devices) lines.push(d.backend + ": " + d.description + (d.total_mib ? ", " + d.total_mib + " MiB" : ""));
    if (!w.devices.length && w.devices_note) lines.push(el("span", { class: "dim" }, w.devices_note));
    if (w.health_note) lines.push(el("span", { class: "dim" }, w.health_note));
    const used = w.used_mib, all = w.total_mib;
    if (used !== null || all) lines.push("memory used " + fmt(used, 1) + " / " + (all ? all + " MiB" : "?"));
    if (all && used !== null) {
      const mem = el("div", { class: "mem" }), fill = el("span", {});
      fill.style.width = Math.min(100, 100 * used / all) + "%";
      mem.append(fill);
      lines.push(mem);
    }
    if (pool.n_layers) {
      lines.push(el("span", { class: "layers" }, "layers " + (w.layers.length ? layersText(w.layers, pool.n_layers - 1) : "none") +
        " (" + w.n_layers + " of " + pool.n_layers + ")"));
      lines.push(depthBar(w.layers, total));
    } else lines.push(el("span", { class: "layers" }, "layers unknown (below)"));
    if (w.link.emulated) lines.push("link: emulated (" + w.link.emulated + "), via " + w.link.via);
    else {
      lines.push("link: RTT " + (w.link.rtt_ms === null ? "-" : fmt(w.link.rtt_ms, 2) + " ms") +
        ", bandwidth " + (w.link.bandwidth_mbps === null ? "not measured" : fmt(w.link.bandwidth_mbps, 0) + " Mbit/s"));
      if (w.link.note) lines.push(el("span", { class: "dim" }, w.link.note));
    }
    const node = card("worker-" + w.name, w.name + " " + w.endpoint, w.healthy, lines, "worker");
    node.dataset.name = w.name;
    node.dataset.endpoint = w.endpoint;
    node.dataset.layers = runsText(w.layers);
    workers.append(node);
  }
  const local = Object.entries(pool.coordinator_layers || {});
  $("pool-note").textContent = (pool.note ? pool.note + " " : "") + (local.length
    ? "On the coordinator itself: the input embeddings; " + local.map(([d, runs]) => d + " layers " + layersText(runs, pool.n_layers - 1)).join("; ")
    : "The input embeddings stay on the coordinator.") +
    (pool.tensor_split ? " --tensor-split " + pool.tensor_split + (pool.placement ? " (" + pool.placement + ")" : "") + "." : "");
}

function drawSpeculation(picture) {
  const sp = picture.speculation;
  $("spec-tok-s").textContent = fmt(sp.speculative_tok_s, 1);
  $("alone-tok-s").textContent = fmt(sp.target_only_tok_s, 1);
  $("speedup").textContent = sp.measured_speedup ? "x" + fmt(sp.measured_speedup, 2) : "-";
  $("bound").textContent = sp.bound_tok_s
    ? fmt(sp.bound_tok_s, 1) + " tok/s (x" + fmt(sp.bound_speedup, 2) + ", a " + fmt(sp.alpha, 2) + ", k " + sp.k + ")"
    : "-";
  $("acceptance").textContent = fmt(sp.acceptance, 2);
  $("acceptance-total").textContent = fmt((picture.status.stats || {}).acceptance, 2);
  $("k").textContent = sp.k === null || sp.k === undefined ? "-" : String(sp.k);
  $("tpr").textContent = fmt(sp.tokens_per_round, 2);
  $("plan").textContent = (sp.drafting ? "drafting" : "not drafting") + (sp.reason ? ": " + sp.reason : "");
  const falls = Object.entries(sp.fallbacks || {});
  $("fallbacks").textContent = falls.length ? falls.map(([r, n]) => r + " " + n).join(", ") : "none";
  const last = sp.last_fallback;
  $("fallback-reason").textContent = last ? last.reason + ", " + Math.round(picture.time - last.at) + " s ago" : "-";
  $("tok-s").textContent = fmt(picture.throughput.tok_s, 1) + " over the last " + picture.throughput.window_s + " s";
  bars($("positions"), sp.positions.map((p) => p.acceptance), sp.positions.map((p) => String(p.position)));
  line($("chart-tok"), picture.series.map((p) => p.tok_s), null);
  line($("chart-acc"), picture.series.map((p) => p.acceptance), 1);
}

function drawLoad(picture) {
  const load = picture.load;
  $("running").textContent = String(load.running);
  $("queued").textContent = String(load.queued);
  $("slots").replaceChildren(...load.slots.map((s) => el("span", { class: s.busy ? "busy" : "", title: "slot " + s.id })));
  const rows = load.requests.map((r) => el("tr", {},
    el("td", {}, new Date(r.at * 1000).toLocaleTimeString()), el("td", {}, r.speculative ? r.mode + " (drafted)" : r.mode),
    el("td", {}, String(r.tokens)), el("td", {}, fmt(r.latency_s, 2) + " s"), el("td", {}, fmt(r.tok_s, 1)),
    el("td", {}, fmt(r.acceptance, 2)), el("td", {}, String(r.fallbacks))));
  $("requests").tBodies[0].replaceChildren(...rows);
}

function drawProblems(picture) {
  const list = picture.problems;
  $("problems").hidden = list.length === 0;
  $("problem-list").replaceChildren(...list.map((p) => el("li", {},
    el("strong", {}, p.where + ": "), p.what, el("br", {}), "fix: " + p.fix)));
}

function draw(picture) {
  $("model").textContent = ((picture.status.target || {}).model || "").split("/").pop();
  $("updated").textContent = "updated " + new Date(picture.time * 1000).toLocaleTimeString();
  $("updated").className = "dim";
  $("board").dataset.time = String(picture.time);
  drawProblems(picture);
  drawPool(picture);
  drawSpeculation(picture);
  drawLoad(picture);
}

// -- charts: a line and a bar chart on canvas, enough for a few hundred points ----------------

function prepare(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#57606a";
  return ctx;
}

function line(canvas, values, top) {
  const ctx = prepare(canvas);
  const w = canvas.width, h = canvas.height, pad = 14;
  const known = values.filter((v) => v !== null && v !== undefined);
  const max = top || Math.max(1e-9, ...known);
  ctx.fillText(fmt(max, top ? 1 : 1), 2, 10);
  if (!known.length) { ctx.fillText("no data yet", w / 2 - 30, h / 2); return; }
  ctx.strokeStyle = "#0969da";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  let pen = false;
  values.forEach((v, i) => {
    if (v === null || v === undefined) { pen = false; return; }
    const x = (i / Math.max(1, values.length - 1)) * (w - 2);
    const y = h - 2 - (v / max) * (h - pad);
    if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    pen = true;
  });
  ctx.stroke();
  ctx.fillStyle = "#0969da";  // a dot per point: a lone minute shows too
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    ctx.fillRect((i / Math.max(1, values.length - 1)) * (w - 2) - 1, h - 3 - (v / max) * (h - pad), 3, 3);
  });
}

function bars(canvas, values, labels) {
  const ctx = prepare(canvas);
  const w = canvas.width, h = canvas.height, n = values.length;
  if (!n) { ctx.fillText("no drafts yet", w / 2 - 30, h / 2); return; }
  const bw = w / n;
  values.forEach((v, i) => {
    const bh = (v || 0) * (h - 26);
    ctx.fillStyle = "#0969da";
    ctx.fillRect(i * bw + 2, h - 14 - bh, Math.max(1, bw - 4), bh);
    ctx.fillStyle = "#57606a";
    ctx.fillText(labels[i], i * bw + bw / 2 - 3, h - 2);
    if (bw > 24) ctx.fillText(fmt(v, 2), i * bw + 2, h - 16 - bh);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  takeFragmentToken();
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("token").value);
    $("token").value = "";
    poll();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    showLogin("");
  });
  window.addEventListener("hashchange", () => { takeFragmentToken(); poll(); });
  poll();
});
