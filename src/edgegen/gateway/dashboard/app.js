// The fleet dashboard: polls the gateway's JSON routes and draws them. No framework, no build step, no
// third-party code; every value reaches the page as text (textContent), never as markup.
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("interval")) || 2000;
const HISTORY_MS = 5 * 60 * 1000;
const COLOURS = ["#1e88e5", "#43a047", "#fb8c00", "#8e24aa", "#e53935", "#00897b", "#6d4c41", "#3949ab"];
const history = new Map(); // node -> [{t, p50, rps}]
const colours = new Map();

function key() { return sessionStorage.getItem("edgegen-key") || ""; }

async function get(path) {
  const headers = key() ? { Authorization: `Bearer ${key()}` } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401 || response.status === 403) {
    document.getElementById("login").hidden = false;
    throw new Error(`the gateway answered ${response.status}: an operator key is needed`);
  }
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function state(node) {
  if (!node.healthy) return "down";
  if (node.draining) return "draining";
  if (node.ejected_for_s > 0) return "ejected";
  return "up";
}

function colour(name) {
  if (!colours.has(name)) colours.set(name, COLOURS[colours.size % COLOURS.length]);
  return colours.get(name);
}

function megabytes(bytes) { return bytes ? `${(bytes / 2 ** 20).toFixed(0)} MiB` : null; }

function drawNodes(fleet) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const node of fleet.nodes) {
    const row = body.insertRow();
    row.dataset.node = node.name;
    row.dataset.state = state(node);
    cell(row, node.name);
    cell(row, state(node), `state ${state(node)}`);
    cell(row, node.version);
    cell(row, node.models ? Object.entries(node.models).map(([m, v]) => `${m} v${v}`).join(", ") : null);
    cell(row, node.load.in_flight ?? node.in_flight, "num");
    cell(row, node.load.cpu_cores, "num");
    cell(row, megabytes(node.load.rss_bytes), "num");
    cell(row, node.traffic.requests_per_s, "num");
    cell(row, node.traffic.p50_ms, "num");
    cell(row, node.traffic.p99_ms, "num");
    cell(row, node.traffic.errors_per_s, "num");
    cell(row, node.last_seen_s === null ? null : `${node.last_seen_s.toFixed(1)} s ago`, "num");
  }
  const down = fleet.nodes.filter((n) => !n.healthy).length;
  document.getElementById("summary").textContent =
    `${fleet.available} of ${fleet.known} nodes taking traffic` + (down ? `, ${down} down` : "") +
    ` · ${fleet.requests_per_s} requests/s`;
}

function remember(fleet, now) {
  for (const node of fleet.nodes) {
    const points = history.get(node.name) || [];
    points.push({ t: now, p50: node.traffic.p50_ms, rps: node.traffic.requests_per_s });
    while (points.length && now - points[0].t > HISTORY_MS) points.shift();
    history.set(node.name, points);
  }
}

function drawChart(id, field, now) {
  const svg = document.getElementById(id);
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  let top = 0;
  for (const points of history.values()) for (const p of points) top = Math.max(top, p[field] || 0);
  top = top > 0 ? top * 1.1 : 1;
  for (const [name, points] of history) {
    const coords = points
      .filter((p) => p[field] !== null && p[field] !== undefined)
      .map((p) => `${(600 * (1 - (now - p.t) / HISTORY_MS)).toFixed(1)},${(200 - (200 * p[field]) / top).toFixed(1)}`);
    if (coords.length < 1) continue;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour(name));
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.dataset.node = name;
    svg.append(line);
  }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "4");
  label.setAttribute("y", "12");
  label.textContent = `max ${top.toFixed(top < 10 ? 2 : 0)}`;
  svg.append(label);
}

function drawLegend() {
  const legend = document.getElementById("legend");
  legend.replaceChildren();
  for (const name of history.keys()) {
    const item = document.createElement("li");
    item.textContent = name;
    item.style.setProperty("--colour", colour(name));
    legend.append(item);
  }
}

function drawList(id, items, text, className) {
  const list = document.getElementById(id);
  list.replaceChildren();
  if (!items.length) {
    const none = document.createElement("li");
    none.className = "none";
    none.textContent = "none";
    list.append(none);
  }
  for (const item of items) {
    const li = document.createElement("li");
    li.textContent = text(item);
    if (className) li.className = className(item);
    list.append(li);
  }
}

function when(seconds) { return new Date(seconds * 1000).toLocaleTimeString(); }

// The charts start from the gateway's own history, so a page opened now shows the last minutes at once.
let seeded = false;
async function seed() {
  const since = (Date.now() - HISTORY_MS) / 1000;
  const answer = await get(`/gateway/fleet/history?since=${since}`);
  const offset = Date.now() - answer.time * 1000; // the gateway's clock to this page's
  for (const [name, points] of Object.entries(answer.nodes)) {
    history.set(name, points.map(([t, rps, p50]) => ({ t: t * 1000 + offset, p50, rps })));
  }
  seeded = true;
}

async function refresh() {
  try {
    if (!seeded) await seed();
    const fleet = await get("/gateway/fleet");
    const now = Date.now();
    remember(fleet, now);
    drawNodes(fleet);
    drawChart("latency-chart", "p50", now);
    drawChart("throughput-chart", "rps", now);
    drawLegend();
    const alerts = await get("/gateway/alerts");
    drawList("alerts", [...alerts.active, ...alerts.recent.filter((a) => a.resolved)].slice(0, 20),
      (a) => `${when(a.since)} ${a.kind} on ${a.node} / ${a.model}` + (a.resolved ? ` (resolved ${when(a.resolved)})` : ""),
      (a) => (a.resolved ? "" : "active"));
    const errors = await get("/gateway/logs?level=error&limit=20");
    drawList("errors", errors.lines.reverse(), (l) => `${l.ts || when(l.time)} ${l.node} ${l.logger}: ${l.msg || ""}`);
    document.getElementById("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
  } catch (error) {
    document.getElementById("updated").textContent = String(error.message || error);
  }
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("edgegen-key", document.getElementById("key").value);
  document.getElementById("login").hidden = true;
  refresh();
});

refresh();
setInterval(refresh, POLL_MS);
