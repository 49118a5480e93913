"""The job page, /jobs/{id}: status, live progress and the Pareto front as a clickable scatter.

Plain HTML with a small inline script (no CDN, works offline): it reads the job and its
front from the JSON API, follows the server-sent events for progress, and draws the front
as SVG, two objectives at a time (selectors pick the pair when there are more), with error
bars of +- 1 sd on the estimates whose estimator reports one. Clicking a
point shows the candidate's parameters and a download button that waits out the 202s
while the checkpoint tar is built. The page holds no data itself; all of it comes from
the API with the caller's credentials (the token cookie).
"""
from __future__ import annotations

import json

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>evomerge job __JOB__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222;padding:0 1em}
 h1{font-size:1.3em} code,pre{font:12px ui-monospace,monospace} pre{background:#f5f5f5;padding:.6em;overflow:auto}
 .bar{height:10px;background:#eee;border-radius:5px;overflow:hidden;width:100%} .bar div{height:100%;background:#3b7;width:0}
 .row{display:flex;gap:2em;flex-wrap:wrap} .row>div{flex:1;min-width:300px}
 .st{font-weight:bold} .failed{color:#b22} .succeeded{color:#282} .cancelled{color:#777}
 circle{cursor:pointer} circle.sel{stroke:#000;stroke-width:2} button{font:inherit}
</style></head><body>
<h1>Job <code id="jid">__JOB__</code> · <span id="kind"></span> · <span id="status" class="st">loading…</span></h1>
<p id="error" class="failed"></p>
<div class="bar"><div id="bar"></div></div><p id="stage"></p><p id="prog"></p>
<div class="row"><div>
 <p id="pair" hidden>x <select id="xs"></select> y <select id="ys"></select></p>
 <svg id="plot" width="460" height="360" role="img" aria-label="Pareto front"></svg>
 <p id="summary"></p>
</div><div><h2>Candidate</h2><div id="detail"><p>Click a point.</p></div></div></div>
<script>
const JOB = __JOB_JSON__, API = "/v1/jobs/" + JOB, SVG = "http://www.w3.org/2000/svg";
const TERMINAL = ["succeeded", "failed", "cancelled"];
let front = null, selected = null, status = null, lastProgress = null;
const $ = id => document.getElementById(id);
function el(tag, attrs, text) {
  const e = tag === "svg" || ["circle","line","text","g","path"].includes(tag) ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) { return typeof v === "number" ? (Math.abs(v) >= 1000 || v === Math.round(v) ? String(v) : v.toPrecision(4)) : String(v); }
function showStatus(st, error) {
  status = st;
  const s = $("status"); s.textContent = st; s.className = "st " + st;
  if (error !== undefined) $("error").textContent = error || "";
  if (TERMINAL.includes(st)) { $("stage").textContent = ""; if (lastProgress) showProgress(lastProgress); }
  if (st === "succeeded") $("bar").style.width = "100%";
}
function showJob(j) {
  $("kind").textContent = j.kind;
  showStatus(j.status, j.error);
  if (j.progress) showProgress(j.progress);
}
function showProgress(p) {
  lastProgress = p;
  let f = p.fraction;
  if (f === undefined && p.generations) f = p.generation / p.generations;
  if (status === "succeeded") f = 1;
  if (f !== undefined && f !== null) $("bar").style.width = (100 * f).toFixed(1) + "%";
  const parts = [];
  if (p.generations) parts.push(`generation ${p.generation}/${p.generations}`);
  if (p.total) parts.push(`tensor ${p.tensors}/${p.total}`);
  if (p.evaluations !== undefined) parts.push(`${p.evaluations} evaluations`);
  if (p.hypervolume !== undefined && p.hypervolume !== null) parts.push(`hypervolume ${fmt(p.hypervolume)}`);
  if (p.eta_seconds && !TERMINAL.includes(status)) parts.push(`about ${Math.round(p.eta_seconds)} s left`);
  if (p.best) parts.push("best " + Object.entries(p.best).map(([k, v]) => `${k} ${fmt(v)}`).join(", "));
  $("prog").textContent = parts.join(" · ");
}
async function getJSON(url) { const r = await fetch(url, {credentials: "same-origin"}); if (!r.ok) throw new Error((await r.json()).detail || r.status); return r.json(); }
async function refresh() {
  showJob(await getJSON(API));
  front = await getJSON(API + "/front");
  const names = front.objectives || [];
  $("pair").hidden = names.length < 2;
  for (const [sel, i] of [[$("xs"), 0], [$("ys"), 1]]) {
    const keep = sel.value; sel.replaceChildren(...names.map(n => el("option", {value: n}, n)));
    sel.value = names.includes(keep) ? keep : (names[i] || names[0] || "");
  }
  $("summary").textContent = front.hypervolume !== null && front.hypervolume !== undefined ? `hypervolume ${fmt(front.hypervolume)} · ${front.candidates.length} on the front` : `${front.candidates.length} candidate(s)`;
  draw();
  if (front.candidates.length === 1 && selected === null) select(front.candidates[0]);
}
function draw() {
  const svg = $("plot"); svg.replaceChildren();
  if (!front || !front.candidates.length) { svg.append(el("text", {x: 20, y: 30}, "no candidates yet")); return; }
  if (!(front.objectives || []).length) { svg.append(el("text", {x: 20, y: 30}, "one merged checkpoint: no objectives to plot")); return; }
  const W = 460, H = 360, m = 50, cs = front.candidates;
  const xn = $("xs").value, yn = $("ys").value, one = front.objectives.length < 2;
  const X = c => one ? c.id : c.objectives[xn], Y = c => one ? (front.objectives.length ? c.objectives[front.objectives[0]] : 0) : c.objectives[yn];
  const sdOf = (c, n) => (c.sd || {})[n] || 0, SX = c => one ? 0 : sdOf(c, xn), SY = c => sdOf(c, one ? front.objectives[0] : yn);
  const xs = cs.flatMap(c => [X(c) - SX(c), X(c) + SX(c)]), ys = cs.flatMap(c => [Y(c) - SY(c), Y(c) + SY(c)]);
  const lo = a => Math.min(...a), hi = a => Math.max(...a);
  const sx = v => m + (W - 2 * m) * (hi(xs) === lo(xs) ? .5 : (v - lo(xs)) / (hi(xs) - lo(xs)));
  const sy = v => H - m - (H - 2 * m) * (hi(ys) === lo(ys) ? .5 : (v - lo(ys)) / (hi(ys) - lo(ys)));
  svg.append(el("line", {x1: m, y1: H - m, x2: W - m, y2: H - m, stroke: "#999"}), el("line", {x1: m, y1: m, x2: m, y2: H - m, stroke: "#999"}));
  const label = n => n + ({max: " (higher is better)", min: " (lower is better)"}[(front.senses || {})[n]] || "");
  svg.append(el("text", {x: W / 2, y: H - 12, "text-anchor": "middle"}, one ? "candidate" : label(xn)));
  svg.append(el("text", {x: 14, y: H / 2, transform: `rotate(-90 14 ${H / 2})`, "text-anchor": "middle"}, one ? label(front.objectives[0] || "") : label(yn)));
  for (const [v, s, a] of [[lo(xs), sx, "x"], [hi(xs), sx, "x"], [lo(ys), sy, "y"], [hi(ys), sy, "y"]])
    svg.append(a === "x" ? el("text", {x: s(v), y: H - m + 16, "text-anchor": "middle", "font-size": 11}, fmt(v)) : el("text", {x: m - 4, y: s(v) + 4, "text-anchor": "end", "font-size": 11}, fmt(v)));
  for (const c of cs) {  // error bars: estimate +- 1 sd, where the estimator reports an sd
    const dx = SX(c), dy = SY(c);
    if (dx) svg.append(el("line", {class: "err", x1: sx(X(c) - dx), x2: sx(X(c) + dx), y1: sy(Y(c)), y2: sy(Y(c)), stroke: "#9ab"}));
    if (dy) svg.append(el("line", {class: "err", x1: sx(X(c)), x2: sx(X(c)), y1: sy(Y(c) - dy), y2: sy(Y(c) + dy), stroke: "#9ab"}));
  }
  for (const c of cs) {
    const dot = el("circle", {cx: sx(X(c)), cy: sy(Y(c)), r: c.id === front.knee ? 7 : 5, fill: c.id === front.knee ? "#e83" : "#37b", "data-cid": c.id});
    if (selected === c.id) dot.classList.add("sel");
    dot.append(el("title", {}, `candidate ${c.id}`));
    dot.addEventListener("click", () => select(c));
    svg.append(dot);
  }
}
function select(c) {
  selected = c.id; draw();
  const d = $("detail"); d.replaceChildren(el("p", {}, `candidate ${c.id}` + (c.id === front.knee ? " (knee)" : "")));
  if (Object.keys(c.objectives || {}).length) d.append(el("pre", {}, JSON.stringify({objectives: c.objectives, sd: c.sd, true_objectives: c.true_objectives}, null, 1)));
  d.append(el("pre", {id: "params"}, JSON.stringify(c.params, null, 1)));
  const b = el("button", {id: "download"}, "Download checkpoint (.tar)"), note = el("span", {id: "dlnote"});
  b.addEventListener("click", () => download(c.id, note)); d.append(b, " ", note);
}
async function download(cid, note) {
  const url = `${API}/candidates/${cid}/checkpoint`;
  for (let i = 0; i < 600; i++) {
    const r = await fetch(url, {method: "GET", credentials: "same-origin", headers: {Range: "bytes=0-0"}});
    if (r.status === 202) { note.textContent = "building…"; await new Promise(ok => setTimeout(ok, 1000 * (+r.headers.get("Retry-After") || 2))); continue; }
    if (!r.ok) { note.textContent = (await r.json()).detail; return; }
    note.textContent = "ready"; const a = el("a", {href: url, download: ""}); document.body.append(a); a.click(); a.remove(); return;
  }
}
$("xs").addEventListener("change", draw); $("ys").addEventListener("change", draw);
refresh().catch(e => { $("status").textContent = "error: " + e.message; });
const es = new EventSource(API + "/events");
let last = 0;
es.addEventListener("progress", e => { const p = JSON.parse(e.data); showProgress(p); if (Date.now() - last > 5000) { last = Date.now(); refresh().catch(() => {}); } });
es.addEventListener("stage", e => { if (!TERMINAL.includes(status)) $("stage").textContent = "stage: " + JSON.parse(e.data).stage; });
es.addEventListener("status", e => { const s = JSON.parse(e.data); showStatus(s.status, s.error); });
es.addEventListener("end", async () => {
  es.close(); $("stage").textContent = "";
  for (let i = 1; i <= 5; i++) {  // the final front: retried, a server restarting must not leave the page stale
    try { await refresh(); return; } catch (err) { await new Promise(ok => setTimeout(ok, 1000 * i)); }
  }
  $("summary").textContent = "the final front could not be loaded: reload the page";
});
</script></body></html>
"""


def job_page(job_id: str) -> str:
    """The page for one job; `job_id` is embedded as escaped text and as a JSON string."""
    import html

    return _PAGE.replace("__JOB_JSON__", json.dumps(job_id).replace("<", "\\u003c")).replace("__JOB__", html.escape(job_id))


def error_page(status: int, message: str) -> str:
    """A small page for a job page that cannot be shown (unknown job, no or wrong token)."""
    import html

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>evomerge: {status}</title></head>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>evomerge</h1><p>{html.escape(message)}</p>"
            f"<p style='color:#666'>HTTP {status}</p></body></html>")
