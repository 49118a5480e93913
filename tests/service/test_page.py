"""The job page, /jobs/{id}, as a person sees it: headless Chromium over the DevTools protocol.

A real two-generation search (with its final check, so the front's members have true values)
is built once for the module. What the page draws is checked against the JSON API's answer,
read by the test itself: the points Plotly rendered per trace, the legend, the axis titles,
the hover text, the table's numbers and order. For what the tiny search cannot produce
(dominated candidates, sds, three objectives, distinct values to sort) the test serves the
page a made-up `/candidates` answer over the same job, by wrapping `fetch` before the page loads.
"""
import json
import re
import time

import pytest
from browser import Browser
from test_service_evolve import BENCH, Workers, evolve_spec, models  # noqa: F401 (models: a fixture)

from service.client import Client
from service.config import Settings, parse_tokens
from service.serve import BackgroundServer

pytestmark = [pytest.mark.service, pytest.mark.browser]

POINTS = "[...document.querySelectorAll('#scatter .scatterlayer .trace')]"


@pytest.fixture(scope="module")
def job(models, tmp_path_factory):  # noqa: F811
    """A finished search with its final check, submitted by alice: (client, url, job id, its events)."""
    tmp = tmp_path_factory.mktemp("page")
    settings = Settings(artifacts=tmp / "artifacts", model_roots=(models,), poll_seconds=0.2,
                        tokens=parse_tokens("alice:a-token,bob:b-token"))
    workers = Workers(settings)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE", str(tmp / "cache"))
        with BackgroundServer(settings) as url, Client(url, token="a-token") as client:
            try:
                client.upload_benchmark("arith", BENCH.encode())
                workers.start()
                job_id = client.submit(evolve_spec() | {"final_check": True})["id"]
                events = list(client.events(job_id))
                assert client.job(job_id)["status"] == "succeeded", client.job(job_id)["error"]
                yield client, url, job_id, events
            finally:
                workers.stop()


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    b.call("Page.enable")
    yield b
    b.close()


def open_page(browser: Browser, url: str, job_id: str, fake: dict | None = None) -> None:
    """Opens the job's page with alice's token in the address (it becomes a cookie), serving it
    `fake` as the job's candidates if given, and waits until the final result is drawn."""
    if fake is not None:
        browser.call("Page.addScriptToEvaluateOnNewDocument", source=(
            f"const FAKE = {json.dumps(fake)}, realFetch = window.fetch; window.fetch = (u, o) => "
            "String(u).endsWith('/candidates') ? Promise.resolve(new Response(JSON.stringify(FAKE), "
            "{headers: {'content-type': 'application/json'}})) : realFetch(u, o);"))
    browser.call("Page.navigate", url=f"{url}/jobs/{job_id}?token=a-token")
    browser.wait("typeof state !== 'undefined' && state.final", timeout=30)


def label(data: dict, name: str) -> str:
    return name + {"max": " ↑", "min": " ↓"}[data["senses"][name]]


def rendered(browser: Browser) -> dict:
    """{legend name: number of points drawn} for the scatter's traces that draw points."""
    return dict(browser.js(f"{POINTS}.map(t => [t.__data__[0].trace.name, t.querySelectorAll('.points path').length])"
                           ".filter(([n, k]) => k > 0)"))


def legend(browser: Browser) -> list[str]:
    return browser.js("[...document.querySelectorAll('#scatter .legendtext')].map(e => e.textContent)")


def titles(browser: Browser) -> list[str]:
    return browser.js("['xtitle', 'ytitle'].map(c => document.querySelector('#scatter .' + c).textContent)")


def choose(browser: Browser, select: str, value: str) -> None:
    """Picks `value` in the selector `select` ("xs" or "ys"), as a person would."""
    browser.js(f"{{ const s = document.getElementById('{select}'); s.value = {json.dumps(value)}; "
               "s.dispatchEvent(new Event('change')) }")


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def four_digits(text: str, value: float) -> bool:
    """`text` shows `value` to 4 significant digits, and no more digits than that."""
    mantissa = text.lower().split("e")[0]
    return float(text) == float(f"{value:.4g}") and len(re.sub(r"\D", "", mantissa).lstrip("0")) <= 4


def where(browser: Browser, trace: str, index: int = 0) -> tuple[float, float]:
    """The middle of a point of the trace named `trace` (its legend name), in the page's pixels."""
    find = f"{POINTS}.find(t => t.__data__[0].trace.name === {json.dumps(trace)})"
    return browser.js(f"{{ const r = {find}.querySelectorAll('.points path')[{index}].getBoundingClientRect(); "
                      "[r.x + r.width / 2, r.y + r.height / 2] }")


def hover_text(browser: Browser, trace: str, index: int = 0) -> str:
    """Moves the mouse onto a point of the trace named `trace` and returns the hover box's text, a line per line."""
    browser.hover(1, 1)
    browser.hover(*where(browser, trace, index))
    return browser.wait("[...document.querySelectorAll('#scatter .hoverlayer .hovertext tspan.line')]"
                        ".map(t => t.textContent).join('\\n')")


# -- the real job ------------------------------------------------------------------------------

def test_page_shows_status_progress_and_hypervolume(job, browser):
    _, url, job_id, events = job
    open_page(browser, url, job_id)
    assert browser.js("location.search") == ""  # the token left the address bar for a cookie
    cookies = browser.call("Network.getCookies")["cookies"]
    assert [(c["value"], c["httpOnly"]) for c in cookies if c["name"] == "evomerge_token"] == [("a-token", True)]
    assert browser.js("document.getElementById('status').textContent") == "succeeded"
    assert browser.js("document.getElementById('bar').style.width") == "100%"
    assert "generation 2/2" in browser.js("document.getElementById('prog').textContent")
    assert browser.js("document.getElementById('stage').textContent") == ""
    assert browser.js("document.getElementById('error').textContent") == ""
    progress = [e for e in events if e["type"] == "progress"]
    hv = browser.js("[document.querySelectorAll('#hv .scatterlayer .points path').length, "
                    "document.getElementById('hv')._fullData[0].y]")
    assert hv == [len(progress), [p["hypervolume"] for p in progress]]  # one point per progress event
    assert browser.js("document.querySelector('#hv .xtitle').textContent") == "generation"
    # a finished job shows no time left, whatever progress it last reported
    shown = browser.js("showProgress({generation: 1, generations: 2, eta_seconds: 50}); "
                       "document.getElementById('prog').textContent")
    assert "generation 1/2" in shown and "left" not in shown
    assert browser.js("document.getElementById('bar').style.width") == "100%"


def test_scatter_plots_every_candidate_and_the_true_values(job, browser):
    client, url, job_id, _ = job
    data = client.candidates(job_id)
    front = [c for c in data["candidates"] if c["on_front"]]
    checked = [c for c in data["candidates"] if c["true_objectives"]]
    dominated = len(data["candidates"]) - len(front)
    assert front and checked  # the final check scored the front
    open_page(browser, url, job_id)
    expected = {f"Pareto front ({len(front)})": len(front), f"true value ({len(checked)} checked)": len(checked),
                f"knee (candidate {data['knee']})": 1} | ({f"dominated ({dominated})": dominated} if dominated else {})
    assert rendered(browser) == expected
    assert sorted(legend(browser)) == sorted(expected)
    assert browser.js("[...document.querySelectorAll('#xs option')].map(o => o.value)") == data["objectives"]
    assert titles(browser) == [label(data, n) for n in data["objectives"][:2]]
    knee = next(c for c in data["candidates"] if c["id"] == data["knee"])
    star = browser.js("{ const t = document.getElementById('scatter')._fullData.at(-1); [t.x[0], t.y[0]] }")
    assert star == [knee["objectives"][n] for n in data["objectives"][:2]]
    # the hover names a point's candidate (the one on top), its objectives and its parameters
    text = hover_text(browser, f"Pareto front ({len(front)})")
    c = next(c for c in data["candidates"] if c["id"] == int(re.match(r"candidate (\d+)", text).group(1)))
    shown = numbers(text)
    assert all(float(f"{w:.4g}") in shown for w in c["params"][0]["weights"])
    for key in ("objectives", "true_objectives"):
        assert all(float(f"{c[key][n]:.4g}") in shown for n in data["objectives"]), key


def test_running_job_keeps_its_axes_and_grows_its_hypervolume(job, browser):
    client, url, _, _ = job
    job_id = client.submit(evolve_spec(generations=4))["id"]
    browser.call("Page.navigate", url=f"{url}/jobs/{job_id}?token=a-token")
    seen = []
    while not browser.js("typeof state !== 'undefined' && state.final"):
        seen.append(browser.js("[[...document.querySelectorAll('#scatter .xtitle, #scatter .ytitle')]"
                               ".map(e => e.textContent.replace(/ [↑↓]$/, '')), "
                               "document.getElementById('status')?.textContent ?? null]"))
        time.sleep(0.1)
    names = client.candidates(job_id)["objectives"]
    assert all(axes == names for axes, _ in seen if axes), seen  # the spec's order, running or not
    assert browser.js("document.querySelectorAll('#hv .scatterlayer .points path').length") == 4
    assert browser.js("document.getElementById('status').textContent") == "succeeded"


def test_front_table_downloads_a_checkpoint(job, browser):
    client, url, job_id, _ = job
    data = client.front(job_id)
    open_page(browser, url, job_id)
    rows = browser.js("[...document.querySelectorAll('#front tbody tr')].map(r => +r.dataset.cid)")
    assert rows == sorted(c["id"] for c in data["candidates"])
    knee = data["knee"]
    assert browser.js(f"document.querySelector('#front tr[data-cid=\"{knee}\"]').className") == "knee"
    browser.js(f"document.querySelector('#front button.dl[data-cid=\"{knee}\"]').click()")  # 202s, then the file
    done = f"document.querySelector('#front .dlnote[data-cid=\"{knee}\"]').textContent === 'ready' && 'ready'"
    assert browser.wait(done, timeout=60) == "ready"


def test_merge_job_page_has_its_checkpoint_and_no_plot(job, browser):
    client, url, _, _ = job
    merge = client.submit({"kind": "merge", "base": "base", "method": "task_arithmetic", "device": "cpu",
                           "models": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}]})
    assert [e for e in client.events(merge["id"]) if e["type"] == "end"]
    open_page(browser, url, merge["id"])
    assert browser.js("document.getElementById('status').textContent") == "succeeded"
    assert "no objectives to plot" in browser.js("document.getElementById('noplot').textContent")
    assert browser.js("document.getElementById('scatterbox').hidden && document.getElementById('hvbox').hidden")
    assert browser.js("document.querySelectorAll('#scatter .point, #hv .point').length") == 0
    assert browser.js("[...document.querySelectorAll('#front tbody tr')].map(r => +r.dataset.cid)") == [0]
    browser.js("document.querySelector('#front button.dl').click()")
    assert browser.wait("document.querySelector('#front .dlnote').textContent === 'ready' && 'ready'", 60) == "ready"


# -- made-up candidates over the real job ------------------------------------------------------

NAMES = ["zeta:speed", "arith:accuracy", "arith:tokens"]  # the spec's order, not the alphabet's
MARKUP = "<img src=x onerror=window.pwned=1>"  # a parameter's name: shown as text, never run
VALUES = {0: (0.512345678, 0.61234567, 3.25), 1: (0.4, 0.7123456, 2.5), 2: (0.4, 0.7123456, 2.5),
          3: (0.3, 0.5, 4.0), 4: (0.9, 0.2, 1.0), 5: (0.1, 0.1, 5.0), 6: (0.25, 0.3333333, 3.75),
          7: (1234.5678, 0.05, 9.0)}  # 1 and 2: equal estimates


def made_up(real: dict) -> dict:
    """The real job's candidates (ids and parameters) with made-up objectives: a front over dominated
    ones, two equal estimates, sds on accuracy, true values for two members, and markup in the parameters."""
    senses = {"zeta:speed": "max", "arith:accuracy": "max", "arith:tokens": "min"}
    signed = {i: [v if senses[n] == "max" else -v for n, v in zip(NAMES, vs)] for i, vs in VALUES.items()}

    def dominated(p):
        return any(all(a >= b for a, b in zip(q, p)) and q != p for q in signed.values())

    cands = [{"id": c["id"], "params": [c["params"][0] | {MARKUP: 1}], "objectives": dict(zip(NAMES, VALUES[c["id"]])),
              "on_front": not dominated(signed[c["id"]]),
              "sd": {"zeta:speed": None, "arith:accuracy": None if c["id"] == 4 else 0.01 * (c["id"] + 1),
                     "arith:tokens": None},
              "true_objectives": ({n: v * 0.9 for n, v in zip(NAMES, VALUES[c["id"]])} if c["id"] in (0, 7) else None)}
             for c in real["candidates"]]
    assert sorted(c["id"] for c in cands) == sorted(VALUES)
    return real | {"objectives": NAMES, "senses": senses, "knee": 1, "candidates": cands}


def test_made_up_front_dominated_error_bars_and_pairs(job, browser):
    client, url, job_id, _ = job
    data = made_up(client.candidates(job_id))
    front = [c for c in data["candidates"] if c["on_front"]]
    rest = [c for c in data["candidates"] if not c["on_front"]]
    assert len(front) == 5 and len(rest) == 3  # 3, 5 and 6 are dominated
    open_page(browser, url, job_id, fake=data)
    expected = {f"Pareto front ({len(front)})": len(front), f"dominated ({len(rest)})": len(rest),
                "true value (2 checked)": 2, "knee (candidate 1)": 1}
    assert rendered(browser) == expected and sorted(legend(browser)) == sorted(expected)
    assert browser.js("[...document.querySelectorAll('#xs option')].map(o => o.value)") == NAMES
    assert browser.js("[...document.querySelectorAll('#ys option')].map(o => o.value)") == NAMES
    assert titles(browser) == ["zeta:speed ↑", "arith:accuracy ↑"]

    # accuracy on y: a vertical bar of +- 1 sd for each candidate whose estimate has an sd
    def bars(trace: str) -> list[list[float]]:
        return browser.js(f"{{ const ya = document.getElementById('scatter')._fullLayout.yaxis; "
                          f"[...{POINTS}.find(t => t.__data__[0].trace.name === {json.dumps(trace)})"
                          ".querySelectorAll('path.yerror')].filter(p => p.getAttribute('d')).map(p => { "
                          "const r = p.getBBox(); return [ya.p2l(r.y + r.height / 2), "
                          "Math.abs(ya.p2l(r.y) - ya.p2l(r.y + r.height)) / 2]; }) }")

    for trace, members in [(f"Pareto front ({len(front)})", front), (f"dominated ({len(rest)})", rest)]:
        want = sorted((c["objectives"]["arith:accuracy"], c["sd"]["arith:accuracy"])
                      for c in members if c["sd"]["arith:accuracy"] is not None)
        got = sorted(bars(trace))  # (the bar's middle, its half length), back in the axis' units
        assert len(got) == len(want) and all(g == pytest.approx(w, abs=1e-3) for g, w in zip(got, want)), (got, want)
    horizontal = f"{POINTS}.flatMap(t => [...t.querySelectorAll('path.xerror')]).filter(p => p.getAttribute('d'))"
    assert browser.js(horizontal + ".length") == 0

    # a click on a dominated point shows that candidate, with its download
    browser.click(*where(browser, f"dominated ({len(rest)})"))
    cid = rest[0]["id"]
    assert browser.wait("document.querySelector('#detail h2')?.textContent") == f"Candidate {cid}"
    assert browser.js("[...document.querySelectorAll('#detail button.dl')].map(b => +b.dataset.cid)") == [cid]

    # another pair: y becomes tokens, x stays; picking y's objective for x swaps them
    choose(browser, "ys", "arith:tokens")
    assert titles(browser) == ["zeta:speed ↑", "arith:tokens ↓"]
    choose(browser, "xs", "arith:tokens")
    assert titles(browser) == ["arith:tokens ↓", "zeta:speed ↑"]
    assert rendered(browser) == expected


def test_made_up_equal_estimates_are_all_named_in_the_hover(job, browser):
    client, url, job_id, _ = job
    data = made_up(client.candidates(job_id))
    open_page(browser, url, job_id, fake=data)
    text = hover_text(browser, "knee (candidate 1)")  # 1 and 2 draw at one point, under the knee's star
    assert "candidate 1" in text and "candidate 2" in text and "2 candidates at this point" in text
    shown = numbers(text)
    for c in (c for c in data["candidates"] if c["id"] in (1, 2)):
        assert all(float(f"{w:.4g}") in shown for w in c["params"][0]["weights"]), c["id"]
    assert all(float(f"{v:.4g}") in shown for v in VALUES[1])
    assert MARKUP in text
    on_top = int(re.match(r"candidate (\d+)", text).group(1))
    assert f"± {0.01 * (on_top + 1):.4g}" in text  # its sd on accuracy


def test_made_up_front_table_is_formatted_and_sorts(job, browser):
    client, url, job_id, _ = job
    data = made_up(client.candidates(job_id))
    front = sorted((c for c in data["candidates"] if c["on_front"]), key=lambda c: c["id"])
    open_page(browser, url, job_id, fake=data)
    heads = browser.js("[...document.querySelectorAll('#front thead th')].map(h => h.textContent)")
    assert heads[1:4] == ["zeta:speed ↑", "arith:accuracy ↑", "arith:tokens ↓"]
    table = browser.js("[...document.querySelectorAll('#front tbody tr')].map(r => [+r.dataset.cid, "
                       "[...r.querySelectorAll('td.num')].map(td => [td.querySelector('.v').textContent, "
                       "td.querySelector('.sd')?.textContent ?? null, td.querySelector('.t')?.textContent ?? null])])")
    assert [cid for cid, _ in table] == [c["id"] for c in front]
    for (cid, cells), c in zip(table, front):
        for (v, sd, true), n in zip(cells, NAMES):
            assert four_digits(v, c["objectives"][n]), (cid, n, v)
            assert (sd is None) == (c["sd"][n] is None) and (sd is None or four_digits(sd.strip(" ±"), c["sd"][n]))
            assert (true is None) == (c["true_objectives"] is None)
            assert true is None or four_digits(true.removeprefix("true "), c["true_objectives"][n])
    assert any(v == "0.5123" for _, cells in table for v, _, _ in cells)  # 0.512345678, shortened
    params = browser.js("[...document.querySelectorAll('#front td.params')]"
                        ".map(td => [td.textContent, td.children.length])")
    assert all(MARKUP in text and children == 0 for text, children in params)
    assert browser.js("window.pwned") is None

    def order() -> list[int]:
        return browser.js("[...document.querySelectorAll('#front tbody tr')].map(r => +r.dataset.cid)")

    def click(column: int) -> None:
        browser.js(f"document.querySelectorAll('#front thead th')[{column}].click()")

    for column, name in enumerate(NAMES, start=1):
        click(column)
        assert order() == [c["id"] for c in sorted(front, key=lambda c: (c["objectives"][name], c["id"]))], name
        click(column)
        assert order() == [c["id"] for c in sorted(front, key=lambda c: (-c["objectives"][name], c["id"]))], name
    click(0)
    assert order() == [c["id"] for c in front]
