// The job page's script (the HTML is service/page.py; JOB is set there): it reads the job and its
// candidates from the JSON API, follows the job's server-sent events, and draws them with Plotly.
"use strict";
const API = "/v1/jobs/" + encodeURIComponent(JOB);
const TERMINAL = ["succeeded", "failed", "cancelled"];
const COLORS = {front: "#1f5fbf", dominated: "#b0b0b0", running: "#6a8caf", knee: "#e8731a", truth: "#2a8f3c"};
const HOVER_LIST = 12;  // at most this many other candidates named in a point's hover
const state = {data: null, status: null, progress: null, hv: new Map(), sort: {key: "id", dir: 1},
               selected: null, downloads: new Map(), final: false};  // final: the result after the job's end is shown
const $ = id => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...children.filter(c => c !== null && c !== undefined));
  return e;
}
const isNum = v => typeof v === "number" && Number.isFinite(v);
const fmt = v => isNum(v) ? String(+v.toPrecision(4)) : v === null || v === undefined ? "–" : String(v);  // 4 digits
const esc = s => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");  // for Plotly's text
const label = n => n + ({max: " ↑", min: " ↓"}[(state.data?.senses || {})[n]] || "");

function fmtParams(p) {
  if (Array.isArray(p)) return p.every(isNum) ? p.map(fmt).join(", ") : p.map(fmtParams).join(" | ");
  if (p && typeof p === "object") return Object.entries(p).map(([k, v]) => `${k} ${fmtParams(v)}`).join(" · ");
  return fmt(p);
}

// -- status and progress ------------------------------------------------------------------------

function showStatus(st, error) {
  state.status = st;
  const s = $("status"); s.textContent = st; s.className = "st " + st;
  if (error !== undefined) $("error").textContent = error || "";
  if (TERMINAL.includes(st)) { $("stage").textContent = ""; if (state.progress) showProgress(state.progress); }
  if (st === "succeeded") $("bar").style.width = "100%";
}

function showProgress(p) {
  state.progress = p;
  let f = p.fraction;
  if (f === undefined && p.generations) f = p.generation / p.generations;
  if (state.status === "succeeded") f = 1;
  if (f !== undefined && f !== null) $("bar").style.width = (100 * f).toFixed(1) + "%";
  const parts = [];
  if (p.generations) parts.push(`generation ${p.generation}/${p.generations}`);
  if (p.total) parts.push(`tensor ${p.tensors}/${p.total}`);
  if (p.evaluations !== undefined) parts.push(`${p.evaluations} evaluations`);
  if (isNum(p.hypervolume)) parts.push(`hypervolume ${fmt(p.hypervolume)}`);
  if (p.eta_seconds && !TERMINAL.includes(state.status)) parts.push(`about ${Math.round(p.eta_seconds)} s left`);
  if (p.best) parts.push("best " + Object.entries(p.best).map(([k, v]) => `${k} ${fmt(v)}`).join(", "));
  $("prog").textContent = parts.join(" · ");
}

function addHypervolume(p) {  // keyed by generation: a resumed search that reports one again replaces it
  if (p.generation === undefined || !isNum(p.hypervolume)) return;
  state.hv.set(p.generation, p.hypervolume);
  drawHypervolume();
}

function drawHypervolume() {
  if (!window.Plotly || !state.hv.size) return;
  $("hvbox").hidden = false;
  const gens = [...state.hv.keys()].sort((a, b) => a - b);
  Plotly.react($("hv"), [{type: "scatter", mode: "lines+markers", name: "hypervolume", x: gens,
    y: gens.map(g => state.hv.get(g)), line: {color: COLORS.front},
    hovertemplate: "generation %{x}<br>hypervolume %{y:.4g}<extra></extra>"}],
    {title: {text: "Hypervolume by generation", font: {size: 14}}, height: 300, margin: {t: 40, r: 10, b: 50, l: 60},
     xaxis: {title: {text: "generation"}, tickformat: "d", dtick: gens.length > 10 ? undefined : 1},
     yaxis: {title: {text: "hypervolume"}, rangemode: "tozero"}},
    {displayModeBar: false, responsive: true});
}

// -- the candidates -----------------------------------------------------------------------------

async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin"});
  if (!r.ok) throw new Error((await r.json()).detail || r.status);
  return r.json();
}

async function refresh() {
  const job = await getJSON(API);
  $("kind").textContent = job.kind;
  showStatus(job.status, job.error);
  if (job.progress) showProgress(job.progress);
  state.data = await getJSON(API + "/candidates");
  render();
}

function render() {
  updatePair(state.data.objectives || []);
  showSummary();
  drawScatter();
  drawTable();
  if (state.selected !== null) showDetail(state.selected);
}

function showSummary() {
  const d = state.data, cs = d.candidates, front = cs.filter(c => c.on_front).length;
  const checked = cs.filter(c => c.true_objectives).length, parts = [`${cs.length} candidate(s) scored`];
  if (front) parts.push(`${front} on the front`);
  if (checked) parts.push(`${checked} checked on the whole benchmark`);
  const hv = isNum(d.true_hypervolume) ? ` (true ${fmt(d.true_hypervolume)})` : "";
  if (isNum(d.hypervolume)) parts.push(`hypervolume ${fmt(d.hypervolume)}` + hv);
  $("summary").textContent = parts.join(" · ");
}

function updatePair(names) {  // the API's order (the spec's), never sorted: the axes must not swap during a run
  $("pair").hidden = names.length < 2;
  for (const [sel, i] of [[$("xs"), 0], [$("ys"), 1]]) {
    const keep = sel.value;
    if ([...sel.options].map(o => o.value).join("\n") !== names.join("\n"))
      sel.replaceChildren(...names.map(n => el("option", {value: n}, label(n))));
    sel.value = names.includes(keep) ? keep : (names[i] ?? names[0] ?? "");
    sel.dataset.prev = sel.value;
  }
}

function pick(sel, other) {  // x and y stay two objectives: picking the other's swaps them
  if (sel.value === other.value) other.value = sel.dataset.prev;
  sel.dataset.prev = sel.value; other.dataset.prev = other.value;
  drawScatter();
}

function axes() {  // [x, y] objective names; one objective: x is the candidate's id (null)
  const names = state.data.objectives || [];
  return names.length === 1 ? [null, names[0]] : [$("xs").value, $("ys").value];
}

const coord = (c, n, key = "objectives") => n === null ? c.id : (c[key] || {})[n] ?? null;
const sdOf = (c, n) => n === null ? NaN : (c.sd || {})[n] ?? NaN;  // NaN: no error bar

function describe(c, n) {  // "0.25 ± 0.05, true 0.1875"
  let s = fmt(c.objectives[n]);
  if (isNum(sdOf(c, n))) s += ` ± ${fmt(sdOf(c, n))}`;
  if (c.true_objectives) s += `, true ${fmt(c.true_objectives[n])}`;
  return s;
}

function groups(cs, key) {  // candidates by the point they draw at: equal estimates share one
  const [xn, yn] = axes(), at = new Map();
  for (const c of cs) {
    const k = coord(c, xn, key) + "," + coord(c, yn, key);
    at.set(k, [...(at.get(k) || []), c]);
  }
  return c => at.get(coord(c, xn, key) + "," + coord(c, yn, key));
}

function hoverText(c, here, key) {
  const d = state.data, what = (c.id === d.knee ? " (knee)" : "") + (key === "true_objectives" ? ": true value" : "");
  const lines = [`<b>candidate ${c.id}</b>${what}`];
  for (const n of d.objectives || []) lines.push(`${esc(label(n))}: ${describe(c, n)}`);
  lines.push("params: " + esc(fmtParams(c.params)));
  const others = here.filter(o => o.id !== c.id);
  if (others.length) {  // equal values draw as one dot: name every candidate there
    lines.push(`<i>${here.length} candidates at this point; the others:</i>`);
    for (const o of others.slice(0, HOVER_LIST)) lines.push(`candidate ${o.id}: ${esc(fmtParams(o.params))}`);
    if (others.length > HOVER_LIST) lines.push(`… and ${others.length - HOVER_LIST} more`);
  }
  return lines.join("<br>");
}

function points(cs, name, marker, key = "objectives") {
  const [xn, yn] = axes(), at = groups(key === "objectives" ? state.data.candidates : cs, key);
  const bars = n => key !== "objectives" || !cs.some(c => isNum(sdOf(c, n))) ? {visible: false}
    : {type: "data", array: cs.map(c => sdOf(c, n)), visible: true, thickness: 1, width: 3, color: marker.color};
  return {type: "scatter", mode: "markers", name, marker, customdata: cs.map(c => c.id),
          x: cs.map(c => coord(c, xn, key)), y: cs.map(c => coord(c, yn, key)), error_x: bars(xn), error_y: bars(yn),
          hovertext: cs.map(c => hoverText(c, at(c), key)), hoverinfo: "text"};
}

function links(cs) {  // a thin line from each checked member's estimate to its true value
  const [xn, yn] = axes(), path = n => cs.flatMap(c => [coord(c, n), coord(c, n, "true_objectives"), null]);
  return {type: "scatter", mode: "lines", x: path(xn), y: path(yn), line: {color: COLORS.truth, width: 1},
          hoverinfo: "skip", showlegend: false, legendgroup: "truth", name: "estimate to true value"};
}

function traces() {
  const d = state.data, cs = d.candidates, front = cs.filter(c => c.on_front), rest = cs.filter(c => !c.on_front);
  const knee = cs.find(c => c.id === d.knee), checked = cs.filter(c => c.true_objectives), out = [];
  const ended = front.length > 0 || TERMINAL.includes(d.status);
  if (rest.length) out.push(points(rest, (ended ? "dominated" : "scored so far") + ` (${rest.length})`,
                                   {color: ended ? COLORS.dominated : COLORS.running, size: 7}));
  if (front.length) out.push(points(front, `Pareto front (${front.length})`, {color: COLORS.front, size: 9}));
  const truth = {color: COLORS.truth, size: 9, symbol: "diamond-open", line: {width: 2}};
  if (checked.length) out.push(links(checked),
                               {...points(checked, `true value (${checked.length} checked)`, truth, "true_objectives"),
                                legendgroup: "truth"});
  if (knee) out.push({...points([knee], `knee (candidate ${knee.id})`, {color: COLORS.knee, size: 15, symbol: "star",
                                 line: {color: "#fff", width: 1}}), error_x: {visible: false}, error_y: {visible: false}});
  return out;
}

function drawScatter() {
  const d = state.data, names = d.objectives || [], plot = $("scatter");
  const why = !d.candidates.length ? "no candidates yet" : !names.length ? "one merged checkpoint: no objectives to plot"
    : !window.Plotly ? "the plotting library did not load: the table below still works" : "";
  $("noplot").textContent = why; $("noplot").hidden = !why; $("scatterbox").hidden = !!why;
  if (why) return;
  const [xn, yn] = axes(), title = n => ({text: esc(n === null ? "candidate" : label(n))});
  Plotly.react(plot, traces(), {
    height: 480, margin: {t: 30, r: 10, b: 50, l: 70}, hovermode: "closest", uirevision: `${xn}|${yn}`,
    xaxis: {title: title(xn), zeroline: false, automargin: true},
    yaxis: {title: title(yn), zeroline: false, automargin: true},
    showlegend: true, legend: {orientation: "h", x: 0, y: -0.15, yanchor: "top"}, hoverlabel: {align: "left"},
  }, {displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"]});
  if (!plot.dataset.clicks) { plot.dataset.clicks = "1"; plot.on("plotly_click", e => showDetail(e.points[0].customdata)); }
}

// -- the front as a table -----------------------------------------------------------------------

function sortedFront() {
  const {key, dir} = state.sort, value = c => key === "id" ? c.id : c.objectives[key];
  return state.data.candidates.filter(c => c.on_front).sort((a, b) => {  // stable: ties keep the id order
    const va = value(a), vb = value(b);
    if (!isNum(va) || !isNum(vb)) return isNum(va) ? -1 : isNum(vb) ? 1 : 0;  // no value: last
    return dir * (va - vb);
  });
}

function sortBy(key) {
  state.sort = {key, dir: state.sort.key === key ? -state.sort.dir : 1};
  drawTable();
}

function header() {
  const names = state.data.objectives || [], {key, dir} = state.sort;
  const th = (k, text) => {
    const arrow = k === key ? (dir > 0 ? " ▲" : " ▼") : "";
    const cell = el("th", {"data-key": k, "aria-sort": k === key ? (dir > 0 ? "ascending" : "descending") : "none",
                           title: "sort by this column"}, text + arrow);
    cell.addEventListener("click", () => sortBy(k));
    return cell;
  };
  return el("tr", {}, th("id", "candidate"), ...names.map(n => th(n, label(n))),
            el("th", {}, "parameters"), el("th", {}, "checkpoint"));
}

function valueCell(c, n) {
  const sd = sdOf(c, n), t = c.true_objectives;
  return el("td", {class: "num"}, el("span", {class: "v"}, fmt(c.objectives[n])),
            isNum(sd) ? el("span", {class: "sd"}, ` ± ${fmt(sd)}`) : null,
            t ? el("span", {class: "t", title: "scored on the whole benchmark"}, `true ${fmt(t[n])}`) : null);
}

function downloadCell(cid) {
  const b = el("button", {class: "dl", "data-cid": cid}, "Download (.tar)");
  b.addEventListener("click", () => download(cid));
  return el("span", {}, b, " ", el("span", {class: "dlnote", "data-cid": cid}, state.downloads.get(cid) || ""));
}

function drawTable() {
  const d = state.data, names = d.objectives || [], rows = sortedFront(), merge = !names.length;
  $("fronttitle").textContent = merge ? "Checkpoint" : "Pareto front";
  $("frontnote").textContent = rows.length || merge ? ""
    : TERMINAL.includes(d.status) ? "no front" : "the front is known when the search ends";
  $("front").hidden = !rows.length;
  $("front").tHead.replaceChildren(header());
  $("front").tBodies[0].replaceChildren(...rows.map(c => el("tr",
    {"data-cid": c.id, class: [c.id === d.knee ? "knee" : "", c.id === state.selected ? "sel" : ""].join(" ").trim()},
    el("td", {}, `${c.id}` + (c.id === d.knee ? " ★ knee" : "")), ...names.map(n => valueCell(c, n)),
    el("td", {class: "params"}, fmtParams(c.params)), el("td", {}, downloadCell(c.id)))));
}

function showDetail(cid) {  // a clicked point: any candidate, dominated ones too
  const c = state.data.candidates.find(x => x.id === cid);
  if (!c) return;
  state.selected = cid;
  for (const tr of $("front").tBodies[0].rows) tr.classList.toggle("sel", +tr.dataset.cid === cid);
  const names = state.data.objectives || [];
  const what = (cid === state.data.knee ? " (knee)" : "") + (c.on_front ? ", on the front" : "");
  $("detail").replaceChildren(el("h2", {}, `Candidate ${cid}${what}`),
    el("p", {}, ...names.map(n => `${label(n)}: ${describe(c, n)} · `), "params: " + fmtParams(c.params)),
    downloadCell(cid));
}

async function download(cid) {  // waits out the 202s while the tar is built, then hands the file over
  const url = `${API}/candidates/${cid}/checkpoint`;
  const note = text => {
    state.downloads.set(cid, text);
    for (const n of document.querySelectorAll(`.dlnote[data-cid="${cid}"]`)) n.textContent = text;
  };
  for (let i = 0; i < 600; i++) {
    const r = await fetch(url, {method: "GET", credentials: "same-origin", headers: {Range: "bytes=0-0"}});
    if (r.status === 202) {
      note("building…");
      await new Promise(ok => setTimeout(ok, 1000 * (+r.headers.get("Retry-After") || 2)));
      continue;
    }
    if (!r.ok) { note((await r.json()).detail); return; }
    note("ready");
    const a = el("a", {href: url, download: ""}); document.body.append(a); a.click(); a.remove();
    return;
  }
  note("still building: try again later");
}

// -- wiring -------------------------------------------------------------------------------------

$("xs").addEventListener("change", () => pick($("xs"), $("ys")));
$("ys").addEventListener("change", () => pick($("ys"), $("xs")));
refresh().catch(e => { $("status").textContent = "error: " + e.message; });
const events = new EventSource(API + "/events");
let lastRefresh = 0;
events.addEventListener("progress", e => {
  const p = JSON.parse(e.data);
  showProgress(p); addHypervolume(p);
  if (Date.now() - lastRefresh > 5000) { lastRefresh = Date.now(); refresh().catch(() => {}); }
});
events.addEventListener("stage", e => {
  if (!TERMINAL.includes(state.status)) $("stage").textContent = "stage: " + JSON.parse(e.data).stage;
});
events.addEventListener("status", e => { const s = JSON.parse(e.data); showStatus(s.status, s.error); });
events.addEventListener("end", async () => {
  events.close(); $("stage").textContent = "";
  for (let i = 1; i <= 5; i++) {  // the final result: retried, a server restarting must not leave the page stale
    try { await refresh(); state.final = true; return; } catch (err) { await new Promise(ok => setTimeout(ok, 1000 * i)); }
  }
  $("summary").textContent = "the final result could not be loaded: reload the page";
});
