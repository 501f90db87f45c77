// The single pane: the fleet's topology, problems, services and traffic shifts, from the
// control plane's own API (the same calls as the CLI), refreshed every 5 s. No framework, no
// fetch beyond this origin.
"use strict";

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pct = (x) => (x == null ? "-" : (x * 100).toFixed(2) + "%");
const ms = (x) => (x == null ? "-" : x.toFixed(1) + "ms");
let state = { edges: [], verdicts: [], feed: null, updates: 0 };
window.trellisPane = state;
// For measurements (tests/pane.rs with TRELLIS_PANE_SCALE): draw figures given by hand.
state.draw = (f) => draw(f);

async function api(path, opts = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...opts });
  if (r.status === 401) {
    throw new Error("unauthorized");
  }
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch (_) { body = text; }
  if (!r.ok) {
    throw new Error((body && body.error) || text || r.status);
  }
  return body;
}

function query() {
  const q = new URLSearchParams({ window: $("window").value });
  const ns = $("ns").value.trim();
  if (ns) q.set("namespace", ns);
  return q.toString();
}

function healthClass(success) {
  if (success == null) return "";
  if (success >= 0.999) return "ok";
  if (success >= 0.95) return "warn";
  return "bad";
}

// Whether a row or an edge carries only TCP: no requests, and TCP connections that ended.
// Its success and rate are then its connections' (a database's edge would look idle
// otherwise).
function tcpOnly(r) {
  return !r.requests && r.tcp_closed;
}

function successOf(r) {
  return tcpOnly(r) ? r.tcp_success : r.success;
}

function successText(r) {
  return tcpOnly(r) ? `${pct(r.tcp_success)} of ${r.tcp_closed} conn` : pct(r.success);
}

function rateText(r) {
  return tcpOnly(r) ? `${(r.tcp_cps || 0).toFixed(1)} conn/s` : r.rps.toFixed(1);
}

function health(success) {
  if (success == null) return "#999";
  if (success >= 0.999) return "#1a7f37";
  if (success >= 0.95) return "#bf8700";
  return "#cf222e";
}

function failuresText(f) {
  const parts = [];
  for (const cat of ["network", "application", "policy", "client"]) {
    for (const c of (f && f[cat]) || []) parts.push(`${c.class} ${c.count}`);
  }
  return parts.join(", ") || "-";
}

// Beyond this many workloads the topology draws groups (environment and namespace) and
// the edges between them; a click on a group's edge lists its least healthy members.
const MAX_NODES = 60;
const MAX_EDGES = 80;

function groupOf(workload, env) {
  return `${workload.split("/")[0]} · ${env || "unknown"}`;
}

function aggregate(edges) {
  const groups = new Map();
  for (const e of edges) {
    const src = groupOf(e.src, e.src_environment), dst = groupOf(e.dst, e.dst_environment);
    const k = `${src}\u0000${dst}`;
    let g = groups.get(k);
    if (!g) {
      g = { src, dst, src_environment: e.src_environment, dst_environment: e.dst_environment, rps: 0, requests: 0, ok: 0,
            tcp_closed: 0, tcp_ok: 0, tcp_cps: 0,
            latency_ms: { p50: null, p99: null }, failures: { network: [], application: [], policy: [], client: [] }, members: [], mtls: true };
      groups.set(k, g);
    }
    g.rps += e.rps;
    g.requests += e.requests;
    g.ok += e.success == null ? 0 : e.success * e.requests;
    g.tcp_closed += e.tcp_closed || 0;
    g.tcp_cps += e.tcp_cps || 0;
    g.tcp_ok += e.tcp_success == null ? 0 : e.tcp_success * e.tcp_closed;
    g.mtls = g.mtls && e.mtls;
    for (const q of ["p50", "p99"]) {
      const v = e.latency_ms && e.latency_ms[q];
      if (v != null && (g.latency_ms[q] == null || v > g.latency_ms[q])) g.latency_ms[q] = v;
    }
    g.members.push(e);
  }
  return [...groups.values()].map((g) => ({ ...g, success: g.requests ? g.ok / g.requests : null,
    tcp_success: g.tcp_closed ? g.tcp_ok / g.tcp_closed : null }));
}

function drawTopology(all) {
  const svg = $("topology");
  const workloads = new Set(all.flatMap((e) => [e.src, e.dst]));
  const grouped = workloads.size > MAX_NODES;
  let edges = grouped ? aggregate(all) : all;
  // At most MAX_EDGES drawn: the least healthy first, then the busiest.
  state.hidden = Math.max(0, edges.length - MAX_EDGES);
  if (state.hidden) {
    edges = [...edges].sort((a, b) => (successOf(a) ?? 1) - (successOf(b) ?? 1) || b.rps - a.rps).slice(0, MAX_EDGES);
  }
  state.shown = edges;
  state.grouped = grouped ? workloads.size : 0;
  const envs = {};
  const place = (name, env) => {
    env = env || "unknown";
    envs[env] = envs[env] || [];
    if (!envs[env].includes(name)) envs[env].push(name);
  };
  for (const e of edges) {
    place(e.src, e.src_environment);
    place(e.dst, e.dst_environment);
  }
  const names = Object.keys(envs).sort();
  const colW = 300, top = 40, rowH = 46;
  const pos = {};
  let html = "";
  names.forEach((env, i) => {
    const x = 10 + i * colW;
    const h = top + envs[env].length * rowH + 10;
    html += `<rect class="env" x="${x}" y="5" width="${colW - 20}" height="${h}" rx="6"></rect>`;
    html += `<text x="${x + 10}" y="25" font-weight="bold">${esc(env)}</text>`;
    envs[env].forEach((w, j) => {
      const y = top + j * rowH;
      pos[w] = { x: x + 20, y, w: colW - 60 };
      html += `<g class="node" ${grouped ? "data-group" : "data-workload"}="${esc(w)}"><rect x="${x + 20}" y="${y}" width="${colW - 60}" height="30" rx="4"></rect>` +
        `<text x="${x + 28}" y="${y + 19}">${esc(w)}</text></g>`;
    });
  });
  // Edges run under the boxes, each a little deeper than the last, so that neither they nor
  // their labels cross a box or each other.
  const rows = Math.max(1, ...names.map((n) => envs[n].length));
  const bottom = top + rows * rowH + 10;
  let deepest = bottom;
  // Labels go on top of every curve, each on a white box (a later edge's curve may pass
  // where an earlier edge's label is).
  let labels = "";
  edges.forEach((e, i) => {
    const a = pos[e.src], b = pos[e.dst];
    if (!a || !b) return;
    const x0 = a.x + a.w / 2 - 10, y0 = a.y + 30, x3 = b.x + b.w / 2 + 10, y3 = b.y + 30;
    const depth = bottom + 30 + i * 22;
    deepest = Math.max(deepest, depth);
    const path = `M${x0},${y0} C${x0},${depth} ${x3},${depth} ${x3},${y3}`;
    const label = tcpOnly(e)
      ? `${e.tcp_closed} conn · ${pct(e.tcp_success)}`
      : `${e.rps.toFixed(1)} rps · ${pct(e.success)} · p99 ${ms(e.latency_ms && e.latency_ms.p99)}`;
    const lx = (x0 + x3) / 2, ly = 0.125 * (y0 + y3) + 0.75 * depth + 15;
    html += `<path class="edge" data-edge="${i}" id="edge-${esc(e.src)}--${esc(e.dst)}" d="${path}" stroke="${health(successOf(e))}"></path>`;
    labels += `<text x="${lx}" y="${ly}" text-anchor="middle" class="label" data-edge="${i}">${esc(label)}</text>`;
  });
  html += labels;
  svg.setAttribute("width", String(Math.max(960, names.length * colW + 20)));
  svg.innerHTML = html;
  // Measured all at once, then boxed: one layout, not one per label. A label whose box
  // would overlap one placed before it moves down past it (edges that leave one workload
  // towards neighbouring groups have labels close together), and the picture grows to hold
  // the lowest.
  const texts = [...svg.querySelectorAll("text.label")];
  const sizes = texts.map((t) => t.getBBox());
  const placed = [];
  texts.forEach((t, i) => {
    const s = sizes[i];
    const b = { x: s.x - 3, y: s.y - 1, width: s.width + 6, height: s.height + 2 };
    const start = b.y;
    for (let moved = true; moved; ) {
      moved = false;
      for (const p of placed) {
        if (b.x < p.x + p.width && p.x < b.x + b.width && b.y < p.y + p.height && p.y < b.y + b.height) {
          b.y = p.y + p.height;
          moved = true;
        }
      }
    }
    if (b.y !== start) t.setAttribute("y", String(+t.getAttribute("y") + b.y - start));
    placed.push(b);
    deepest = Math.max(deepest, b.y + b.height);
    const bg = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    bg.setAttribute("class", "label-bg");
    bg.dataset.edge = t.dataset.edge;
    for (const k of ["x", "y", "width", "height"]) bg.setAttribute(k, String(b[k]));
    t.before(bg);
  });
  svg.setAttribute("height", String(deepest + 30));
  // An edge answers for its curve and its label (a label moved down past another is told
  // from its neighbours by this): a click shows it, a pointer over either marks both.
  const parts = [...svg.querySelectorAll("[data-edge]")];
  const mark = (i, on) => parts.forEach((p) => p.dataset.edge === i && p.classList.toggle("hover", on));
  parts.forEach((p) => {
    p.addEventListener("click", () => showEdge(state.shown[+p.dataset.edge]));
    p.addEventListener("mouseenter", () => mark(p.dataset.edge, true));
    p.addEventListener("mouseleave", () => mark(p.dataset.edge, false));
  });
  svg.querySelectorAll(".node[data-workload]").forEach((g) => g.addEventListener("click", () => showWorkload(g.dataset.workload)));
}

// A workload: its proxy (config in step or refused, certificate), its edges both ways, and
// what happened to it (the control plane's events, callers' ejections).
async function showWorkload(name) {
  state.workload = name;
  const [ns, n] = name.split("/");
  const el = $("workload-view");
  el.hidden = false;
  $("workload-name").textContent = name;
  const p = (state.proxies || []).find((x) => x.workload === name);
  const now = Date.now();
  if (p) {
    const types = Object.entries(p.types || {});
    const refused = types.filter(([, t]) => t.rejected && t.acked !== t.sent).map(([k, t]) => `${k} ${t.rejected.version}: ${t.rejected.message}`);
    const behind = types.filter(([, t]) => t.acked !== t.sent).map(([k]) => k);
    $("workload-proxy").textContent = `proxy ${p.node}, connected ${ago(now - p.connectedAt * 1000)} ago · config ` +
      (refused.length ? `refused (${refused.join("; ")})` : behind.length ? `behind (${behind.join(", ")})` : "in sync") +
      (p.certNotAfterMs ? ` · certificate expires in ${ago(p.certNotAfterMs - now)}` : "");
  } else {
    $("workload-proxy").textContent = "no proxy of it is connected to this replica";
  }
  $("workload-edges").querySelector("tbody").innerHTML = state.edges.filter((e) => e.src === name || e.dst === name).map((e) =>
    `<tr><td>${esc(e.src)}</td><td>${esc(e.dst)}</td><td class="${healthClass(successOf(e))}">${successText(e)}</td>` +
    `<td>${rateText(e)}</td><td>${ms(e.latency_ms && e.latency_ms.p99)}</td><td>${esc(failuresText(e.failures))}</td></tr>`).join("");
  // Its inbound adaptive concurrency limit, as its proxy last reported it.
  try {
    const rows = await api(`/api/v1/stat?kind=workload&namespace=${encodeURIComponent(ns)}&name=${encodeURIComponent(name)}&window=${encodeURIComponent($("window").value)}`);
    const a = (rows.find((r) => r.name === name) || {}).adaptive;
    $("workload-limit").textContent = a ? `adaptive concurrency limit ${a.limit} (${a.in_flight} in flight)` : "";
  } catch (_) {
    $("workload-limit").textContent = "";
  }
  try {
    const w = await api(`/api/v1/resources/Workload/${encodeURIComponent(ns)}/${encodeURIComponent(n)}`);
    $("workload-events").innerHTML = (w.events || []).slice(-20).map((x) =>
      `<li>${esc(x.event)}${x.by ? ` by ${esc(x.by)}` : ""}${x.seconds ? ` for ${x.seconds} s (${x.failures} × ${esc(x.class)})` : ""} — ${ago(now - x.atMs)} ago</li>`).join("") ||
      "<li>none in the last hour</li>";
  } catch (e) {
    $("workload-events").innerHTML = `<li>${esc(e.message)}</li>`;
  }
}

function showEdge(e) {
  if (e.members) {
    const worst = [...e.members].sort((a, b) => (successOf(a) ?? 1) - (successOf(b) ?? 1) || b.rps - a.rps).slice(0, 10);
    $("edge-detail").textContent = `${e.src} → ${e.dst}: ${e.members.length} edges, ${e.requests} requests, success ${pct(e.success)}, p99 ≤ ${ms(e.latency_ms.p99)}\n` +
      `least healthy:\n` + worst.map((m) => `  ${m.src} → ${m.dst}: ${successText(m)} · ${rateText(m)}${tcpOnly(m) ? "" : " rps"} · p99 ${ms(m.latency_ms && m.latency_ms.p99)} · ${failuresText(m.failures)}`).join("\n");
    return;
  }
  const mine = state.verdicts.filter((v) => JSON.stringify(v.place).includes(`"${e.dst}"`) || JSON.stringify(v.place).includes(`"${e.src}"`));
  let text = `${e.src} (${e.src_environment}) → ${e.dst} (${e.dst_environment})\n`;
  text += `identities: ${e.src_identity || "-"} → ${e.dst_identity || "-"} · mTLS ${e.mtls ? "yes" : "no"}\n`;
  text += `requests ${e.requests} · success ${pct(e.success)} · p50 ${ms(e.latency_ms.p50)} · p99 ${ms(e.latency_ms.p99)}\n`;
  if (e.tcp_closed) text += `TCP connections ended ${e.tcp_closed} · success ${pct(e.tcp_success)}\n`;
  text += `failures: ${failuresText(e.failures)}\n`;
  if (e.link) text += `link: round trip ${e.link.rtt_ms.toFixed(2)} ms, ${(e.link.retransmitted * 100).toFixed(2)} % retransmitted\n`;
  text += mine.length ? `verdicts:\n${mine.map((v) => `  ${v.cause}: ${v.problem}`).join("\n")}` : "verdicts: none";
  $("edge-detail").textContent = text;
}

// With no verdict: whether nothing failed, or there was nothing to judge.
function nothingFound(j, connected) {
  const n = (k, one, many) => `${k} ${k === 1 ? one : many}`;
  if ((!j || !j.proxies) && connected) return `No report yet from the ${n(connected, "proxy", "proxies")} connected: nothing to judge (proxies report every 10 s by default).`;
  if (!j || !j.proxies) return "No proxy reported in this window: nothing to judge.";
  if (!j.requests && !j.connections) return `No traffic in this window: ${n(j.proxies, "proxy", "proxies")} reported, nothing to judge.`;
  return `No problem found in this window, in ${n(j.requests, "request", "requests")} and ` +
    `${n(j.connections, "TCP connection", "TCP connections")} that ${n(j.proxies, "proxy", "proxies")} reported.`;
}

function drawVerdicts(verdicts, judged, connected) {
  const where = (p) => {
    if (p.kind === "workload") return `workload ${p.at.workload} (${p.at.environment})`;
    if (p.kind === "link") return `link ${p.from.workload} (${p.from.environment}) → ${p.to.workload} (${p.to.environment})`;
    return `${p.kind} ${p.name}`;
  };
  const now = Date.now();
  const seen = (v) => v.first_ms ? `<br>seen: first ${ago(now - v.first_ms)} ago, last ${ago(now - v.last_ms)} ago` : "";
  $("verdicts").innerHTML = verdicts.length
    ? verdicts.map((v) => `<li class="verdict"><span class="cause ${esc(v.cause)}">${esc(v.cause.replace("_", " "))}</span> ` +
      `<b>${esc(v.problem)}</b><br>where: ${esc(where(v.place))}${seen(v)}<ul>` +
      v.evidence.map((e) => `<li>${esc(e)}</li>`).join("") + `</ul>next: ${esc(v.next)}</li>`).join("")
    : `<li class="ok">${esc(nothingFound(judged, connected))}</li>`;
}

function drawServices(rows) {
  const body = $("services").querySelector("tbody");
  body.onclick = (ev) => {
    const tr = ev.target.closest("tr[data-service]");
    if (tr) showService(tr.dataset.service);
  };
  body.innerHTML = rows.map((r) =>
    `<tr data-service="${esc(r.name)}"><td>${esc(r.name)}</td><td>${esc((r.environments || []).join(", "))}</td>` +
    `<td class="${healthClass(successOf(r))}">${successText(r)}</td><td>${rateText(r)}</td>` +
    `<td>${ms(r.latency_ms.p50)}</td><td>${ms(r.latency_ms.p99)}</td><td>${esc(failuresText(r.failures))}</td></tr>`).join("");
}

// Where services spill over by load: "test/catalog: 23 % spilled vm → container since
// 14:02:05 (2m ago)", each pool's load, what moved lately.
function drawSpill(states) {
  const now = Date.now();
  const lines = states.flatMap((s) => s.pools.filter((p) => p.spilled_percent > 0).map((p) =>
    `<li class="spilling">${esc(s.service)}: ${p.spilled_percent.toFixed(0)} % spilled ${esc(p.name)} → ${esc(p.to || "?")}` +
    (p.since_ms ? ` since ${esc(new Date(p.since_ms).toLocaleTimeString())} (${ago(now - p.since_ms)} ago)` : "") + "</li>"));
  const loads = states.map((s) => `<li>${esc(s.service)}: ` + s.pools.map((p) =>
    `${esc(p.name)} ${p.load_percent == null ? "load unknown" : `load ${p.load_percent.toFixed(0)} %`}` +
    (p.shed ? `, ${p.shed} shed` : "")).join(" · ") +
    (s.history.length ? ` · last: ${esc(s.history[s.history.length - 1].what)} ${ago(now - s.history[s.history.length - 1].at_ms)} ago` : "") + "</li>");
  $("spill").innerHTML = lines.join("") + loads.join("");
  $("spill").hidden = states.length === 0;
}

// Mirrors: what each route's mirror got, against the primary's answers.
function drawMirrors(rows) {
  $("mirrors").hidden = rows.length === 0;
  $("mirrors").innerHTML = rows.map((m) => {
    let t = `mirror ${esc(m.route)} → ${esc(m.mirror)}: ${m.sent} mirrored`;
    if (m.skipped) t += ` (${m.skipped} skipped)`;
    if (m.agreement != null) t += `; ${(m.agreement * 100).toFixed(1)} % agree with the primary`;
    if (m.latency_diff_ms != null) t += `; the mirror ${Math.abs(m.latency_diff_ms).toFixed(1)} ms ${m.latency_diff_ms >= 0 ? "slower" : "faster"} on average`;
    const f = Object.entries(m.failures || {}).map(([c, n]) => `${esc(c)} ${n}`);
    if (f.length) t += `; its failures: ${f.join(", ")}`;
    return `<li class="mirror">${t}</li>`;
  }).join("");
}

// Rollouts: where each is, its last analysis and what happened; an operator (not a
// read-only session) can pause, resume, abort or promote one, after a confirmation.
function drawRollouts(all) {
  const now = Date.now();
  $("rollouts-section").hidden = all.length === 0;
  const actions = { progressing: ["pause", "abort", "promote"], paused: ["resume", "abort", "promote"] };
  $("rollouts").innerHTML = all.map((r, i) => {
    const id = `${r.namespace}/${r.name}`;
    const phase = r.phase || "pending";
    const a = r.analysis;
    const last = r.history.slice(-3).map((h) => `${esc(h.what)} ${ago(now - h.at_ms)} ago (${h.weight} %)`).join(" · ");
    const buttons = state.readOnly ? "" : (actions[phase] || []).map((act) =>
      ` <button class="rollout-act" data-rollout="${i}" data-action="${act}" type="button">${act}</button>`).join("");
    return `<li class="rollout ${esc(phase)}"><b>${esc(id)}</b>: ${esc(r.stable)} → ${esc(r.canary)}: ` +
      `<span class="phase">${esc(phase)}</span>, ` +
      (r.dark
        ? `dark stage: ${r.mirror} % of the requests copied to the canary, none answered by it (then steps of ${esc(r.steps.join(", "))} %)`
        : `canary at ${r.weight} % (step ${r.step + 1} of ${r.steps.length}: ${esc(r.steps.join(", "))} %)`) +
      (r.reason ? ` · why: ${esc(r.reason)}` : "") +
      (a ? ` · analysis: ${esc(a.verdict)}: ${esc(a.message)}` : "") +
      (last ? ` · ${last}` : "") + buttons + "</li>";
  }).join("");
  document.querySelectorAll("button.rollout-act").forEach((b) => b.addEventListener("click", async () => {
    const r = all[+b.dataset.rollout];
    const what = `${b.dataset.action} rollout ${r.namespace}/${r.name}`;
    if (!window.confirm(`${what}?`)) return;
    try {
      await api(`/api/v1/rollouts/${encodeURIComponent(r.namespace)}/${encodeURIComponent(r.name)}/${b.dataset.action}`, { method: "POST" });
      $("rollout-result").innerHTML = `<span class="ok">done: ${esc(what)}</span>`;
      drawRollouts(await api("/api/v1/rollouts"));
    } catch (e) {
      $("rollout-result").innerHTML = `<span class="bad">refused: ${esc(e.message)}</span>`;
    }
  }));
}

const PALETTE = ["#0969da", "#1a7f37", "#8250df", "#bf8700", "#cf222e", "#57606a", "#1b7c83", "#a40e26"];

// A line chart of `lines` ({name, points: [[at_ms, value]], color}) over [from, to].
function chart(svg, lines, from, to, unit) {
  const w = +svg.getAttribute("width"), h = +svg.getAttribute("height");
  const left = 50, right = 200, top = 8, bottom = 18;
  const max = Math.max(1e-9, ...lines.flatMap((l) => l.points.map((p) => p[1])));
  const x = (t) => left + (w - left - right) * (t - from) / Math.max(1, to - from);
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  let out = `<line class="axis" x1="${left}" y1="${y(0)}" x2="${w - right}" y2="${y(0)}"/>` +
    `<text x="4" y="${top + 10}">${esc(max.toFixed(max < 10 ? 1 : 0))} ${esc(unit)}</text><text x="4" y="${y(0)}">0</text>`;
  lines.forEach((l, i) => {
    const pts = l.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    const dots = l.points.map(([t, v]) => `<circle cx="${x(t).toFixed(1)}" cy="${y(v).toFixed(1)}" r="2.5" fill="${l.color}"><title>${esc(l.name)}: ${v.toFixed(1)} ${esc(unit)} at ${new Date(t).toLocaleTimeString()}</title></circle>`).join("");
    out += `<polyline class="series" data-series="${esc(l.name)}" stroke="${l.color}" points="${pts}"><title>${esc(l.name)}</title></polyline>${dots}` +
      `<text x="${w - right + 8}" y="${top + 12 + 14 * i}" fill="${l.color}">${esc(l.name)}</text>`;
  });
  svg.innerHTML = out;
}

async function showService(name) {
  state.service = name;
  if (!$("tap-name").value) $("tap-name").value = name;
  const [ns, n] = name.split("/");
  try {
    drawService(await api(`/api/v1/services/${encodeURIComponent(ns)}/${encodeURIComponent(n)}/view?window=${encodeURIComponent($("window").value)}`));
  } catch (e) {
    $("service-facts").textContent = `error: ${e.message}`;
  }
}

function drawService(v) {
  $("service-view").hidden = false;
  $("service-name").textContent = v.service;
  const t = v.timeline, step = t.step_ms / 1000;
  const to = Date.now(), from = to - v.window_ms;
  const workloads = [...new Set(t.points.flatMap((p) => Object.keys(p.by_workload)))].sort();
  chart($("service-rps"), workloads.map((w, i) => ({
    name: w, color: PALETTE[i % PALETTE.length],
    points: t.points.map((p) => [p.at_ms, (p.by_workload[w] || 0) / step]),
  })), from, to, "rps");
  chart($("service-latency"), [
    { name: "p50", color: PALETTE[0], points: t.points.filter((p) => p.p50_ms != null).map((p) => [p.at_ms, p.p50_ms]) },
    { name: "p99", color: PALETTE[2], points: t.points.filter((p) => p.p99_ms != null).map((p) => [p.at_ms, p.p99_ms]) },
    { name: "failed %", color: PALETTE[4], points: t.points.map((p) => [p.at_ms, 100 * p.failed / Math.max(1, p.requests)]) },
  ], from, to, "ms · %");
  const requests = t.points.reduce((a, p) => a + p.requests, 0), failed = t.points.reduce((a, p) => a + p.failed, 0);
  $("service-facts").textContent = `${requests} requests, ${failed} failed, in ${t.step_ms / 1000} s slots · mutual TLS ${v.mtls}` +
    (v.policies.length ? ` · policies: ${v.policies.map((p) => `${p.kind} ${p.name}${p.action ? " (" + p.action + ")" : ""}`).join(", ")}` : "");
  const now = Date.now();
  $("service-endpoints").querySelector("tbody").innerHTML = v.endpoints.map((e) => {
    const loc = e.locality ? [e.locality.region, e.locality.zone].filter(Boolean).join("/") : "";
    const h = e.healthy === false ? `<span class="bad">unhealthy</span>` : e.healthy === true ? `<span class="ok">healthy</span>` : "-";
    const ev = e.events.map((x) => `${x.event} ${ago(now - x.atMs)} ago`).join(", ") || "-";
    return `<tr data-workload="${esc(e.workload)}"><td>${esc(e.workload)}</td><td>${esc(e.environment)}</td><td>${esc(loc)}</td><td>${h}</td><td>${esc(ev)}</td></tr>`;
  }).join("") || `<tr><td colspan="5">The service selects no workload.</td></tr>`;
  $("service-routes").innerHTML = v.routes.map((r) => `<li>${esc(r.kind)} ${esc(r.name)} (as ${esc(r.as)}): ` +
    r.rules.map((rule) => rule.backends.map((b) => `${esc(b.name)} ${b.weight}`).join(" / ") || "(no backends)").join("; ") + "</li>").join("") ||
    "<li>No route names it: callers reach its endpoints directly.</li>";
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
}

function drawProxies(list) {
  const now = Date.now();
  $("proxies").querySelector("tbody").onclick = (ev) => {
    const tr = ev.target.closest("tr[data-proxy]");
    if (tr) showWorkload(tr.dataset.proxy);
  };
  $("proxies").querySelector("tbody").innerHTML = list.map((p) => {
    const types = Object.entries(p.types || {});
    const behind = types.filter(([, t]) => t.acked !== t.sent).map(([k]) => k);
    const refused = types.filter(([, t]) => t.rejected && t.acked !== t.sent).map(([k, t]) => `${k} ${t.rejected.version}: ${t.rejected.message}`);
    const config = refused.length ? `<span class="bad">refused</span>` : behind.length ? `<span class="warn">behind (${esc(behind.join(", "))})</span>` : `<span class="ok">in sync</span>`;
    const cert = p.certNotAfterMs ? (p.certNotAfterMs <= now ? `<span class="bad">expired</span>` : `expires in ${ago(p.certNotAfterMs - now)}`) : "-";
    return `<tr data-proxy="${esc(p.workload || p.node)}"><td>${esc(p.workload || "-")}</td><td>${esc(p.node)}</td>` +
      `<td>${ago(now - p.connectedAt * 1000)} ago</td><td>${config}</td><td>${esc(refused.join("; ") || "-")}</td><td>${cert}</td></tr>`;
  }).join("");
}

async function drawRoutes() {
  const routes = (await api("/api/v1/resources/HTTPRoute")).items;
  const weighted = routes.filter((r) => (r.spec.rules || []).some((rule) => (rule.backendRefs || []).length > 1));
  $("routes").innerHTML = weighted.map((r, i) => {
    const id = `${r.metadata.namespace}/${r.metadata.name}`;
    const rule = r.spec.rules.find((rule) => (rule.backendRefs || []).length > 1);
    return `<form class="route" data-route="${i}"><b>${esc(id)}</b> ` +
      rule.backendRefs.map((b, j) => {
        const w = b.weight ?? 1;
        return `<label>${esc(b.name)} <input class="weight" data-backend="${j}" name="${esc(b.name)}" type="range" min="0" max="${Math.max(100, w)}" value="${w}">` +
          ` <output>${w}</output></label>`;
      }).join(" ") +
      ` <button type="submit">shift</button></form>`;
  }).join("") || "<p>No route splits traffic between backends.</p>";
  // A slider shows its weight as it moves; nothing is sent before the confirmation.
  document.querySelectorAll("form.route input.weight").forEach((i) => i.addEventListener("input", () => {
    i.nextElementSibling.textContent = i.value;
  }));
  document.querySelectorAll("form.route").forEach((f) => f.addEventListener("submit", (ev) => {
    ev.preventDefault();
    shift(weighted[+f.dataset.route], f);
  }));
}

async function shift(route, form) {
  const doc = JSON.parse(JSON.stringify(route));
  for (const k of ["status", "usedBy", "events"]) delete doc[k];
  const rule = doc.spec.rules.find((rule) => (rule.backendRefs || []).length > 1);
  const weights = [...form.querySelectorAll("input.weight")].map((i) => +i.value);
  rule.backendRefs.forEach((b, j) => { b.weight = weights[j]; });
  const what = rule.backendRefs.map((b) => `${b.name}=${b.weight}`).join(", ");
  if (!window.confirm(`Apply ${doc.metadata.namespace}/${doc.metadata.name}: ${what}?`)) return;
  try {
    await api("/api/v1/apply?file=pane", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(doc) });
    $("shift-result").innerHTML = `<span class="ok">applied: ${esc(what)}</span>`;
  } catch (e) {
    $("shift-result").innerHTML = `<span class="bad">refused: ${esc(e.message)}</span>`;
  }
}

function draw(f) {
  state.edges = f.edges;
  state.verdicts = f.diagnose.verdicts;
  state.updates += 1;
  drawTopology(f.edges);
  drawVerdicts(f.diagnose.verdicts, f.diagnose.judged, f.diagnose.connected);
  drawServices(f.stat);
  drawSpill(f.spill || []);
  drawMirrors(f.mirrors || []);
  drawRollouts(f.rollouts || []);
  drawProxies(f.proxies);
  state.proxies = f.proxies;
  if (state.service) showService(state.service);
  if (state.workload) showWorkload(state.workload);
  const count = (k, one, many) => `${k} ${k === 1 ? one : many}`;
  $("summary").textContent = [
    count(f.stat.length, "service", "services"),
    count(f.edges.length, "edge", "edges"),
    count(f.diagnose.verdicts.length, "problem", "problems"),
  ].join(" · ") +
    (state.grouped ? ` · ${count(state.grouped, "workload", "workloads")}, drawn by namespace and environment` : "") +
    (state.hidden ? ` · ${count(state.hidden, "healthy edge", "healthy edges")} not drawn` : "") +
    (f.partial ? ` · ${f.partial}` : "");
}

// The first figures by a plain request (which says whether the session holds), then the
// server pushes them (server-sent events) every few seconds.
async function refresh() {
  try {
    const q = query();
    const [stat, edges, diag, proxies, spill, rollouts, mirrors] = await Promise.all([
      api(`/api/v1/stat?${q}`),
      api(`/api/v1/edges?${q}`),
      api(`/api/v1/diagnose?${q}`),
      api("/api/v1/proxies"),
      api("/api/v1/spill"),
      api("/api/v1/rollouts"),
      api(`/api/v1/mirrors?${q}`),
    ]);
    draw({ stat, edges, diagnose: diag, proxies: proxies.proxies, spill, rollouts, mirrors });
    follow();
    return true;
  } catch (e) {
    if (e.message === "unauthorized") {
      showSignIn();
      return false;
    }
    $("summary").textContent = `error: ${e.message}`;
    return true;
  }
}

function follow() {
  if (state.feed) state.feed.close();
  const every = new URLSearchParams(location.search).get("every") || "5";
  state.feed = new EventSource(`/api/v1/fleet/stream?${query()}&every=${encodeURIComponent(every)}`);
  state.feed.addEventListener("fleet", (ev) => draw(JSON.parse(ev.data)));
  state.feed.addEventListener("problem", (ev) => { $("summary").textContent = `error: ${JSON.parse(ev.data).error}`; });
  // A stream that the server refuses (the session ended) is closed: check the session.
  state.feed.onerror = () => { if (state.feed.readyState === EventSource.CLOSED) refresh(); };
}

function showSignIn() {
  if (state.feed) state.feed.close();
  $("pane").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
}

async function showPane() {
  if (!(await refresh())) return;
  $("signin").hidden = true;
  $("pane").hidden = false;
  $("signout").hidden = false;
  // A read-only session sees everything but cannot shift traffic (the API refuses it too).
  let readOnly = false;
  try { readOnly = (await api("/ui/session")).readOnly; } catch (_) { /* a bearer-less page: keep the default */ }
  state.readOnly = readOnly;
  $("role").textContent = readOnly ? "read-only" : "";
  $("shift").hidden = readOnly;
  if (!readOnly) await drawRoutes();
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/ui/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({ token: $("token").value }),
  });
  $("token").value = "";
  if (r.ok) {
    $("signin-error").textContent = "";
    showPane();
  } else {
    $("signin-error").textContent = "That is neither the admin token nor a read-only one.";
  }
});
$("signout").addEventListener("click", async () => {
  await fetch("/ui/session", { method: "DELETE", credentials: "same-origin" });
  showSignIn();
});
// Live tap: the API's stream of tapped requests (one JSON object a line), read as it comes;
// the newest 200 rows are kept.
async function startTap(ev) {
  ev.preventDefault();
  stopTap();
  const q = new URLSearchParams({ kind: $("tap-kind").value, name: $("tap-name").value.trim(), max_rps: "50" });
  for (const [id, key] of [["tap-method", "method"], ["tap-path", "path_prefix"], ["tap-class", "failure_class"]]) {
    const v = $(id).value.trim();
    if (v) q.set(key, v);
  }
  const ctl = new AbortController();
  state.tap = ctl;
  $("tap-stop").disabled = false;
  $("tap-status").textContent = "tapping…";
  $("tap").querySelector("tbody").innerHTML = "";
  try {
    const r = await fetch(`/api/v1/tap?${q}`, { credentials: "same-origin", signal: ctl.signal });
    if (!r.ok) throw new Error((await r.text()) || r.status);
    // How many proxies could copy these requests, over every replica (and which replica
    // did not answer): a tap that no proxy can serve says so rather than staying empty.
    const reach = Number(r.headers.get("x-trellis-tap-proxies") ?? "NaN");
    const partial = r.headers.get("x-trellis-partial");
    let status = Number.isNaN(reach) ? "tapping…"
      : reach === 0 ? "tapping — no proxy that could see these requests is connected yet"
      : `tapping through ${reach} ${reach === 1 ? "proxy" : "proxies"}…`;
    if (partial) status += ` (warning: ${partial})`;
    $("tap-status").textContent = status;
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) tapRow(JSON.parse(line));
      }
    }
    $("tap-status").textContent = "ended";
  } catch (e) {
    $("tap-status").textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
  }
  $("tap-stop").disabled = true;
}

function stopTap() {
  if (state.tap) state.tap.abort();
  state.tap = null;
}

function tapRow(e) {
  const body = $("tap").querySelector("tbody");
  const tr = document.createElement("tr");
  const src = e.src_workload || e.src_identity || (e.direction === "outbound" ? "(its proxy)" : "-");
  const dst = [e.dst_service, e.dst_workload].filter(Boolean).join(" @ ");
  tr.className = e.class === "ok" ? "" : "bad";
  tr.innerHTML = `<td>${new Date().toLocaleTimeString()}</td><td>${esc(e.direction)}</td><td>${esc(src)}</td><td>${esc(dst)}</td>` +
    `<td>${esc(e.method)} ${esc(e.authority)}${esc(e.path)}</td><td>${esc(e.status)}</td><td>${esc(e.class)}</td>` +
    `<td>${ms(e.latency_ms)}</td><td>${esc(e.attempts)}</td><td>${esc(e.trace_id || "")}</td>`;
  body.prepend(tr);
  while (body.rows.length > 200) body.deleteRow(body.rows.length - 1);
}

$("tap-form").addEventListener("submit", startTap);
$("tap-stop").addEventListener("click", stopTap);
$("window").addEventListener("change", refresh);
$("ns").addEventListener("change", refresh);
showPane();
