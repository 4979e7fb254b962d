"""``GET /``: one self-contained HTML page a person reads at a glance (no external assets), and
``GET /metrics`` (Prometheus).

Each model with its ref, served version, stage and aliases, state, last swap, rejected versions
with reasons and the dependency report; cache usage; registry reachability. Rendered on the
server (the cache figures come from disk, read in a worker thread) and refreshed by the browser.
"""

from __future__ import annotations

import asyncio
import time
from html import escape
from typing import Any

from aiohttp import web

from serving.http.keys import daemon_of

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
        body = _page("starting", [], {}, {"reachable": None}, daemon.start_error)
    else:
        status = manager.status().to_dict()
        cache = await asyncio.to_thread(_cache_usage, manager.source.cache)  # not behind loads
        body = _page("running", status["models"], cache, status["registry"], None)
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


def _model(m: dict[str, Any]) -> str:
    state = m["state"] + (" (stale)" if m["stale"] else "")
    css = "ok" if m["state"] == "loaded" and not (m["stale"] or m["rejected"]) else "warn"
    if m["state"] == "failed":
        css = "bad"
    labels = [m["stage"] or ""] + [f"@{a}" for a in m["aliases"]]
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
    problem = f"<div class=bad>{escape(m['problem'])}</div>" if m["problem"] else ""
    version = f"v{m['version']}" if m["version"] else "&mdash;"
    tags = " ".join(f"<span class=tag>{escape(x)}</span>" for x in labels if x and x != "None")
    rejected = f"<ul class=rejected>{rejected}</ul>" if rejected else "none"
    pinned = f" <span class=tag>pinned v{m['pinned']}</span>" if m["pinned"] else ""
    return f"""
<section class="model m-{css}" data-model="{escape(m["name"])}">
  <h2>{escape(m["name"])} <span class="state {css}">{escape(state)}</span>{pinned}</h2>
  <table>
    <tr><th>ref</th><td><code>{escape(m["ref"])}</code></td></tr>
    <tr><th>serving</th><td class=version>{version} {tags}</td></tr>
    <tr><th>last swap</th><td>{_when(m["last_swap_at"])} &middot; {m["swaps"]} swaps</td></tr>
    <tr><th>dependencies</th><td>{deps}</td></tr>
    <tr><th>rejected</th><td>{rejected}</td></tr>
  </table>
  {problem}
</section>"""


def _page(
    phase: str,
    models: list[dict[str, Any]],
    cache: dict[str, Any],
    registry: dict[str, Any],
    error: str | None,
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
    body = "".join(_model(m) for m in models) or "<p>No models yet.</p>"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8>
<meta http-equiv=refresh content={REFRESH_S}>
<meta name=viewport content="width=device-width, initial-scale=1">
<title>modeld &middot; {len(models)} models</title>
<style>
 body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 62rem;
        color: #1d2430; background: #f6f7f9; padding: 0 1rem; }}
 header {{ display: flex; justify-content: space-between; align-items: baseline; }}
 h1 {{ margin: 0 0 .5rem; }} h2 {{ margin: 0 0 .5rem; font-size: 1.2rem; }}
 .summary, .model {{ background: #fff; border-radius: 8px; padding: 1rem 1.2rem; margin: 1rem 0;
        box-shadow: 0 1px 3px rgba(0,0,0,.08); border-left: 6px solid #9aa3af; }}
 .m-ok {{ border-left-color: #1f9d55; }} .m-warn {{ border-left-color: #d69e2e; }}
 .m-bad {{ border-left-color: #d64545; }}
 .ok {{ color: #1f7a44; }} .warn {{ color: #9a6b12; }} .bad {{ color: #b42323; }}
 .state {{ font-size: .85rem; padding: .1rem .5rem; border-radius: 1rem; background: #eef0f3; }}
 .tag {{ font-size: .8rem; padding: .05rem .45rem; border-radius: .3rem; background: #e6eefc;
        margin-left: .3rem; }}
 table {{ border-collapse: collapse; width: 100%; }}
 th {{ text-align: left; width: 9rem; color: #5b6474; font-weight: 500; vertical-align: top; }}
 td, th {{ padding: .2rem 0; }} ul {{ margin: 0; padding-left: 1.2rem; }}
 .dim {{ color: #7b8494; }} code {{ font-size: .9em; }}
</style></head>
<body>
<header><h1>modeld</h1><span class=dim>{phase} &middot; refreshes every {REFRESH_S}s</span></header>
<div class=summary>
  <div><b>registry</b> {escape(str(registry.get("identity", "")))} &middot; {reg}</div>
  <div><b>cache</b> {cache_line}</div>
  {failure}
</div>
{body}
</body></html>"""
