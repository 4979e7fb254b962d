"""``GET /``: one self-contained HTML page a person reads at a glance (no external assets), and
``GET /metrics`` (Prometheus).

Each model with its ref, served version, stage and aliases as the registry says them now, state,
last swap, rejected versions with reasons, the dependency report, every worker's version, and
its last hour as inline SVG charts (requests/s, p50/p99 latency, errors, batch size) over a
swap timeline; cache usage; registry reachability. A problem colours its card: red when nothing
is served or the ref no longer resolves, amber when stale, a newer version was rejected, or the
workers disagree. Rendered on the server (cache and peer figures are read in a worker thread);
the browser refreshes the page's body in place every few seconds (``?part=body``).
"""

from __future__ import annotations

import asyncio
import time
from html import escape
from typing import Any

from aiohttp import web

from serving.http.keys import daemon_of
from serving.runtime.history import Series

REFRESH_S = 5


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", status_page)
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format, collected off the loop (the cache index is on disk) and not in
    the load executor: a scrape must not wait behind a model that takes minutes to load."""
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await asyncio.to_thread(daemon_of(request).metrics.exposition)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def status_page(request: web.Request) -> web.Response:
    daemon = daemon_of(request)
    manager = daemon.manager
    if manager is None:
        phase, models, cache, registry = "starting", [], {}, {"reachable": None}
        workers, splits = 1, []
    else:
        status = await asyncio.to_thread(daemon.status_view)  # not behind loads
        cache = await asyncio.to_thread(_cache_usage, manager.source.cache)
        phase, models, registry = "running", status["models"], status["registry"]
        workers, splits = status.get("workers", 1), status.get("splits", [])
    history = {m["name"]: daemon.metrics.history.series(m["name"]) for m in models}
    main = _main(models, cache, registry, daemon.start_error, history, workers, splits)
    if request.query.get("part") == "body":  # the page's own in-place refresh
        return web.Response(text=main, content_type="text/html", charset="utf-8")
    body = _page(phase, len(models), main)
    return web.Response(text=body, content_type="text/html", charset="utf-8")


def _cache_usage(cache: Any) -> dict[str, Any]:
    entries = cache.entries()
    return {
        "dir": str(cache.root),
        "bytes": sum(e["bytes"] for e in entries),
        "entries": len(entries),
        "limit": cache.max_bytes,
        "keep": cache.keep_versions,
        "hits": cache.stats.hits,
        "misses": cache.stats.misses,
    }


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    ago = max(0, time.time() - ts)
    span = (
        f"{ago:.0f}s"
        if ago < 120
        else f"{ago / 60:.0f} min"
        if ago < 7200
        else f"{ago / 3600:.0f} h"
    )
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({span} ago)"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _card_class(m: dict[str, Any]) -> str:
    """bad: nothing served, or the ref no longer resolves (or the registry errs); warn: stale,
    a newer version rejected, or workers serving different versions; ok otherwise."""
    if m["state"] != "loaded" or m.get("problem_kind") in ("not found", "error"):
        return "bad"
    if m["stale"] or m["rejected"] or m.get("problem") or m.get("consistent") is False:
        return "warn"
    return "ok"


def _state_text(m: dict[str, Any]) -> str:
    if m["state"] != "loaded":
        return m["state"]
    if m.get("problem_kind") in ("not found", "error"):
        return "loaded (ref does not resolve)"
    return "loaded (stale: registry unreachable)" if m["stale"] else "loaded"


def _chips(m: dict[str, Any]) -> str:
    """What the registry says of the served version now: its stage and aliases when the
    registry confirmed them at the last poll; 'last known' while it cannot be asked; 'not in
    the registry' when the ref no longer resolves."""
    if not m["version"]:
        return ""
    if m.get("problem_kind") in ("not found", "error"):
        return " <span class='tag gone'>not in the registry now</span>"
    labels = [m["stage"] or ""] + [f"@{a}" for a in m["aliases"]]
    shown = [x for x in labels if x and x != "None"]
    if not shown:
        return ""
    dim = " dim" if m["stale"] else ""
    tags = " ".join(f"<span class='tag{dim}'>{escape(x)}</span>" for x in shown)
    return f" {tags}" + (" <span class=dim>(last known)</span>" if m["stale"] else "")


def _workers(m: dict[str, Any]) -> str:
    workers = m.get("workers")
    if not workers or len(workers) < 2:
        return ""
    parts = ", ".join(
        f"{w['pid']}: v{w['version']}" if w["version"] else f"{w['pid']}: {escape(w['state'])}"
        for w in workers
    )
    note = (
        "" if m.get("consistent") else " &middot; <b>not all on one version</b> (a swap under way)"
    )
    return f"<tr><th>workers</th><td>{len(workers)} ({parts}){note}</td></tr>"


def _environment(m: dict[str, Any]) -> str:
    env = m.get("environment")
    if not env:
        return "<tr><th>environment</th><td>this process</td></tr>"
    packages = " ".join(f"{n}=={v}" for n, v in sorted(env["packages"].items()))
    worker = m.get("env_worker") or {}
    state = worker.get("state", "")
    pid = f"worker pid {worker['pid']}" if worker.get("pid") else "no worker"
    restarts = f", {worker['restarts']} restarts" if worker.get("restarts") else ""
    problem = (
        f" <span class=bad>{escape(worker['problem'])}</span>" if worker.get("problem") else ""
    )
    return (
        f"<tr><th>environment</th><td><code>{escape(env['key'])}</code> Python "
        f"{escape(env['python'])} &middot; {escape(pid)} ({escape(state)}{restarts}){problem}"
        f"<br><span class=dim>{escape(packages)} &middot; built {_when(env['built_at'])} in "
        f"{env['build_s']:.0f}s</span></td></tr>"
    )


def _model(m: dict[str, Any], series: Series | None) -> str:
    css = _card_class(m)
    report = m.get("dependency_report") or {}
    mismatches = report.get("mismatches") or []
    deps = (
        "<ul>" + "".join(f"<li>{escape(x['text'])}</li>" for x in mismatches) + "</ul>"
        if mismatches
        else ("all satisfied" if report else "n/a")
    )
    rejected = "".join(
        f"<li><b>v{r['version']}</b> at {escape(r['step'])}: {escape(r['reason'][:300])} "
        f"<span class=dim>({_when(r['at'])}, attempt {r['attempts']})</span></li>"
        for r in reversed(m["rejected"])
    )
    history = "".join(
        f"<li>v{r['version']} at {escape(r['step'])} <span class=dim>({_when(r['at'])})</span></li>"
        for r in reversed(m.get("history") or [])
    )
    problem = f"<div class=bad>{escape(m['problem'])}</div>" if m["problem"] else ""
    version = f"v{m['version']}" if m["version"] else "&mdash;"
    rejected = f"<ul class=rejected>{rejected}</ul>" if rejected else "none"
    older = f"<tr><th>earlier</th><td><ul class=dim>{history}</ul></td></tr>" if history else ""
    pinned = f" <span class=tag>pinned v{m['pinned']}</span>" if m["pinned"] else ""
    charts = _charts(series) if series is not None else ""
    return f"""
<section class="model m-{css}" data-model="{escape(m["name"])}" data-state="{css}">
  <h2>{escape(m["name"])} <span class="state {css}">{escape(_state_text(m))}</span>{pinned}</h2>
  {problem}
  <table>
    <tr><th>ref</th><td><code>{escape(m["ref"])}</code></td></tr>
    <tr><th>serving</th><td class=version>{version}{_chips(m)}</td></tr>
    {_workers(m)}
    <tr><th>last swap</th><td>{_when(m["last_swap_at"])} &middot; {m["swaps"]} swaps</td></tr>
    <tr><th>dependencies</th><td>{deps}</td></tr>
    {_environment(m)}
    <tr><th>rejected</th><td>{rejected}</td></tr>
    {older}
  </table>
  {charts}
</section>"""


# -- charts: inline SVG, drawn on the server --------------------------------------------------

_W, _H = 360, 44


def _charts(series: Series) -> str:
    rps: list[float | None] = list(series.rps)
    p50 = series.p50_ms
    p99 = series.p99_ms
    errors = [float(e) for e in series.errors]
    batch = series.batch
    latest = next((v for v in reversed(p99) if v is not None), None)
    panels = [
        ("requests/s", _line([rps], ["#2b6cb0"]), f"{series.rps[-1]:.1f} now"),
        (
            "latency p50 / p99 (ms)",
            _line([p50, p99], ["#2f855a", "#b7791f"]),
            f"p99 {latest:g} ms" if latest is not None else "no requests",
        ),
        ("errors (4xx/5xx)", _bars(errors, "#c53030"), f"{int(sum(errors))} in the hour"),
        ("batch size", _line([batch], ["#6b46c1"]), _last(batch)),
    ]
    cells = "".join(
        f"<figure class=chart><figcaption>{name} <span class=dim>{escape(note)}</span>"
        f"</figcaption>{svg}</figure>"
        for name, svg, note in panels
    )
    return (
        "<div class=hour><div class=dim>last hour</div>"
        f"<div class=charts>{cells}</div>{_timeline(series)}</div>"
    )


def _last(values: list[float | None]) -> str:
    value = next((v for v in reversed(values) if v is not None), None)
    return "no batches" if value is None else f"{value:.1f} last"


def _svg(inner: str, label: str) -> str:
    return (
        f"<svg class=spark viewBox='0 0 {_W} {_H}' preserveAspectRatio='none' role=img "
        f"aria-label='{escape(label)}'>{inner}</svg>"
    )


def _line(lines: list[list[float | None]], colours: list[str]) -> str:
    top = max([v for line in lines for v in line if v is not None] or [0.0]) or 1.0
    paths = []
    for values, colour in zip(lines, colours, strict=True):
        xy = [
            (i * _W / max(1, len(values) - 1), _H - 2 - (v / top) * (_H - 4), i)
            for i, v in enumerate(values)
            if v is not None
        ]
        if xy:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
            paths.append(
                f"<polyline points='{points}' fill=none stroke='{colour}' stroke-width=1.5 "
                "vector-effect=non-scaling-stroke />"
            )
        present = {i for _, _, i in xy}
        paths += [  # a lone value (its neighbours empty) would not show as a line
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r=2 fill='{colour}' />"
            for x, y, i in xy
            if i - 1 not in present and i + 1 not in present
        ]
    return _svg("".join(paths) or "<line x1=0 y1=43 x2=360 y2=43 stroke='#d0d5dd'/>", "chart")


def _bars(values: list[float], colour: str) -> str:
    top = max(values or [0.0]) or 1.0
    width = _W / max(1, len(values))
    rects = "".join(
        f"<rect x='{i * width:.1f}' y='{_H - (v / top) * (_H - 2):.1f}' width='{width:.2f}' "
        f"height='{(v / top) * (_H - 2):.1f}' fill='{colour}' />"
        for i, v in enumerate(values)
        if v
    )
    return _svg(rects or "<line x1=0 y1=43 x2=360 y2=43 stroke='#d0d5dd'/>", "errors")


_BANDS = ("#c6f6d5", "#bee3f8", "#fefcbf", "#e9d8fd", "#fed7e2")


def _timeline(series: Series) -> str:
    """Bands per served version over the hour; each rejected attempt a red mark (its step in
    the tooltip)."""
    start = series.start
    span = series.bucket_s * len(series.rps)
    end = start + span

    def x(t: float) -> float:
        return max(0.0, min(float(_W), (t - start) / span * _W))

    swaps = [e for e in series.events if e.kind == "swap"]
    parts = []
    for i, event in enumerate(swaps):
        until = swaps[i + 1].at if i + 1 < len(swaps) else end
        left, right = x(event.at), x(until)
        left = min(left, right - 3)  # a version served only seconds is still seen
        colour = _BANDS[event.version % len(_BANDS)]
        parts.append(
            f"<rect class=band x='{left:.1f}' y=0 width='{right - left:.1f}' height=18 "
            f"fill='{colour}'><title>v{event.version} from {_clock(event.at)}</title></rect>"
        )
        if right - left > 18:
            parts.append(f"<text x='{left + 3:.1f}' y=13 font-size=11>v{event.version}</text>")
    for event in series.events:
        if event.kind == "reject":
            px = x(event.at)
            parts.append(
                f"<path class=reject d='M{px - 4:.1f},22 L{px + 4:.1f},22 L{px:.1f},15 Z' "
                f"fill='#c53030'><title>v{event.version} rejected at {escape(event.step or '')}"
                f" ({_clock(event.at)})</title></path>"
            )
    return (
        "<figure class='chart timeline'><figcaption>versions served "
        "<span class=dim>(red: a rejected attempt)</span></figcaption>"
        f"<svg class=spark viewBox='0 0 {_W} 24' preserveAspectRatio='none' role=img "
        f"aria-label='swap timeline'>{''.join(parts)}</svg></figure>"
    )


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _main(
    models: list[dict[str, Any]],
    cache: dict[str, Any],
    registry: dict[str, Any],
    error: str | None,
    history: dict[str, Series],
    workers: int,
    splits: list[dict[str, Any]] | None = None,
) -> str:
    reachable = registry.get("reachable")
    if reachable is None:
        reg = "<span class=warn>starting</span>"
    elif reachable:
        last = _when(registry.get("last_poll_at"))
        reg = f"<span class=ok>reachable</span> &middot; last poll {last}"
    else:
        reg = f"<span class=bad>unreachable since {_when(registry.get('unreachable_since'))}</span>"
    limit = "no size limit" if cache.get("limit") is None else f"limit {_size(cache['limit'])}"
    keep = f"{cache['keep']} versions kept per model" if cache.get("keep") else "all versions kept"
    cache_line = (
        f"{_size(cache['bytes'])} in {cache['entries']} versions ({limit}, {keep})"
        f" &middot; {cache['hits']} hits, {cache['misses']} downloads &middot; "
        f"<code>{escape(cache['dir'])}</code>"
        if cache
        else "&mdash;"
    )
    failure = f"<div class=bad>{escape(error)}</div>" if error else ""
    who = (
        f"<div><b>workers</b> {workers} (charts: the worker that answered)</div>"
        if workers > 1
        else ""
    )
    cards = "".join(_model(m, history.get(m["name"])) for m in models) or "<p>No models yet.</p>"
    arms = "".join(_split(split) for split in splits or [])
    return f"""<div class=summary>
  <div><b>registry</b> {escape(str(registry.get("identity", "")))} &middot; {reg}</div>
  <div><b>cache</b> {cache_line}</div>
  {who}{arms}{failure}
</div>
{cards}"""


def _split(split: dict[str, Any]) -> str:
    """One route with arms: each arm's share (or shadow), version and counts."""
    parts = []
    for arm in split["arms"]:
        status = arm.get("status") or {}
        version = f"v{status['version']}" if status.get("version") is not None else "not ready"
        if arm["shadow"]:
            what = (f"shadow, {version}: {arm['mirrored']} mirrored, "
                    f"{arm['mirror_dropped']} dropped")  # fmt: skip
        else:
            what = (f"{arm['share'] * 100:.0f}%, {version}: {arm['answered']} answered, "
                    f"{arm['fallbacks']} by fallback")  # fmt: skip
        parts.append(f"{escape(arm['arm'])} ({escape(what)})")
    sticky = f" &middot; sticky on {escape(split['sticky'])}" if split.get("sticky") else ""
    return f"<div><b>{escape(split['name'])}</b> arms: {' &middot; '.join(parts)}{sticky}</div>"


def _page(phase: str, count: int, main: str) -> str:
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<noscript><meta http-equiv=refresh content={REFRESH_S}></noscript>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>modeld &middot; {count} models</title>
<style>
 body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 62rem;
        color: #1d2430; background: #f6f7f9; padding: 0 1rem; overflow-wrap: anywhere; }}
 header {{ display: flex; justify-content: space-between; align-items: baseline;
          flex-wrap: wrap; gap: .5rem; }}
 h1 {{ margin: 0 0 .5rem; }} h2 {{ margin: 0 0 .5rem; font-size: 1.2rem; }}
 .summary, .model {{ background: #fff; border-radius: 8px; padding: 1rem 1.2rem; margin: 1rem 0;
        box-shadow: 0 1px 3px rgba(0,0,0,.08); border-left: 6px solid #9aa3af; }}
 .m-ok {{ border-left-color: #1f9d55; }} .m-warn {{ border-left-color: #d69e2e; }}
 .m-bad {{ border-left-color: #d64545; }}
 .ok {{ color: #1f7a44; }} .warn {{ color: #9a6b12; }} .bad {{ color: #b42323; }}
 .state {{ font-size: .85rem; padding: .1rem .5rem; border-radius: 1rem; background: #eef0f3; }}
 .tag {{ font-size: .8rem; padding: .05rem .45rem; border-radius: .3rem; background: #e6eefc;
        margin-left: .3rem; }}
 .tag.gone {{ background: #fde2e2; color: #b42323; }}
 table {{ border-collapse: collapse; width: 100%; table-layout: fixed; }}
 th {{ text-align: left; width: 9rem; color: #5b6474; font-weight: 500; vertical-align: top; }}
 td, th {{ padding: .2rem 0; }} ul {{ margin: 0; padding-left: 1.2rem; }}
 .dim {{ color: #7b8494; }} code {{ font-size: .9em; word-break: break-all; }}
 .hour {{ margin-top: .6rem; }}
 .charts {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(13rem, 1fr));
           gap: .4rem 1rem; }}
 figure.chart {{ margin: 0; }} figcaption {{ font-size: .8rem; color: #5b6474; }}
 svg.spark {{ width: 100%; height: 44px; background: #fafbfc; border-radius: 4px; }}
 .timeline svg.spark {{ height: 24px; }}
 @media (max-width: 40rem) {{ body {{ margin: 1rem auto; }} th {{ width: 6.5rem; }} }}
</style></head>
<body>
<header><h1>modeld</h1><span class=dim>{phase} &middot; refreshes every {REFRESH_S}s</span></header>
<main id=main>
{main}
</main>
<script>
setInterval(async () => {{
  try {{
    const r = await fetch("?part=body", {{cache: "no-store"}});
    if (r.ok) document.getElementById("main").innerHTML = await r.text();
  }} catch (e) {{}}
}}, {REFRESH_S * 1000});
</script>
</body></html>"""
