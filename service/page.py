"""The job page, /jobs/{id}: status, live progress, every candidate on a scatter, the front as a table.

A person opens it to watch a search and to pick a model, so it is drawn to be looked at:
Plotly (`service/static/`, a pinned file served by the API: no CDN, works offline) plots every
candidate scored, the Pareto front highlighted over the dominated ones and the knee marked,
each estimate with +- 1 sd where its estimator reports one and, for the members the final
check scored, the true value beside it; the pair of objectives is picked in the API's order
(the spec's), so the axes never swap during a run. A second plot follows the hypervolume
over the generations from the job's server-sent events, which also feed the progress bar. A
table lists the front, sortable, with a download per row that waits out the 202s while the
checkpoint tar is built. The page holds no data itself: `static/page.js` reads it all from
the JSON API with the caller's credentials (the token cookie).
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path

STATIC = Path(__file__).parent / "static"
PLOTLY = "plotly-basic-3.7.0.min.js"  # see static/README.md
_SCRIPT_VERSION = hashlib.sha256((STATIC / "page.js").read_bytes()).hexdigest()[:12]  # a new page.js is refetched

_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>evomerge job __JOB__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1180px;color:#222;padding:0 1em}
 h1{font-size:1.3em} h2{font-size:1.1em;margin:1.2em 0 .4em} code{font:12px ui-monospace,monospace}
 .bar{height:10px;background:#eee;border-radius:5px;overflow:hidden;width:100%}
 .bar div{height:100%;background:#3b7;width:0}
 .st{font-weight:bold} .failed{color:#b22} .succeeded{color:#282} .cancelled{color:#777} .muted{color:#777}
 .plots{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}
 #scatterbox{flex:3;min-width:420px} #hvbox{flex:2;min-width:300px}
 table{border-collapse:collapse;width:100%}
 th,td{padding:.3em .6em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
 th[data-key]{cursor:pointer;user-select:none;white-space:nowrap} th[data-key]:hover{background:#f3f3f3}
 td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
 .sd,.t{color:#666;font-size:.9em} .t{display:block;color:#2a8f3c}
 tr.knee td:first-child{color:#c65d00;font-weight:bold} tr.sel{background:#fff6d8}
 td.params{font:12px ui-monospace,monospace}
 button{font:inherit} #detail{margin-top:1em}
</style></head><body>
<h1>Job <code id="jid">__JOB__</code> · <span id="kind"></span> · <span id="status" class="st">loading…</span></h1>
<p id="error" class="failed"></p>
<div class="bar"><div id="bar"></div></div><p id="stage"></p><p id="prog"></p>
<p id="summary"></p>
<p id="noplot" class="muted" hidden></p>
<div class="plots">
 <div id="scatterbox" hidden>
  <p id="pair" hidden><label>x <select id="xs"></select></label> <label>y <select id="ys"></select></label></p>
  <div id="scatter"></div>
 </div>
 <div id="hvbox" hidden><div id="hv"></div></div>
</div>
<div id="detail"></div>
<h2 id="fronttitle">Pareto front</h2>
<p id="frontnote" class="muted"></p>
<table id="front"><thead></thead><tbody></tbody></table>
<script>const JOB = __JOB_JSON__;</script>
<script src="/static/__PLOTLY__" defer></script>
<script src="/static/page.js?v=__VERSION__" defer></script>
</body></html>
"""


def job_page(job_id: str) -> str:
    """The page for one job; `job_id` is embedded as escaped text and as a JSON string (one pass, so
    an id cannot inject a placeholder)."""
    values = {"JOB": html.escape(job_id), "JOB_JSON": json.dumps(job_id).replace("<", "\\u003c"),
              "PLOTLY": PLOTLY, "VERSION": _SCRIPT_VERSION}
    return re.sub(r"__(JOB_JSON|JOB|PLOTLY|VERSION)__", lambda m: values[m.group(1)], _PAGE)


def error_page(status: int, message: str) -> str:
    """A small page for a job page that cannot be shown (unknown job, no or wrong token)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>evomerge: {status}</title></head>"
            f"<body style='font-family:sans-serif;margin:2em'><h1>evomerge</h1><p>{html.escape(message)}</p>"
            f"<p style='color:#666'>HTTP {status}</p></body></html>")
