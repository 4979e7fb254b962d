"""Operator truth: what a restart, the status page, the logs and the CLI say is what is happening.
Against the real session registry, a real `mlflow server` killed and restarted, real restarts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import (
    POLL_S,
    MlflowServer,
    free_port,
    iris_frame,
    make_config,
    modeld,
    register,
    run,
    served,
    split_body,
    split_payload,
    start,
    through,
    until,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body: bytes) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, dict(resp.headers)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_restart_in_an_outage_serves_what_served_not_what_was_rejected(
    registry, cache_dir, tmp_path
):
    """v1 serves; v2 is rejected by the strict dependency check; the registry dies; modeld
    restarts: v1 (which served until the restart) serves again, marked stale. It used to
    remember the rejected v2, never downloaded, and answer 503 until the registry returned."""
    c = registry.client()
    name = "strict-truth"
    register(c, name, registry.models["const1"])
    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    server.start()
    port = free_port()
    args = (
        *("serve", "-m", f"a=models:/{name}/latest", "--dependency-policy", "strict"),
        *("--port", str(port), "--cache-dir", str(cache_dir), "--poll-interval", "0.3"),
    )
    env = {"MLFLOW_TRACKING_URI": server.url}
    url = f"http://127.0.0.1:{port}"
    proc = modeld(*args, env=env)
    try:
        wait_http(f"{url}/health", timeout_s=120, proc=proc)
        register(c, name, registry.models["bad-deps"])  # v2: requirements that cannot be met
        deadline = time.monotonic() + 30
        status: dict = {}
        while time.monotonic() < deadline and not status.get("rejected"):
            with urllib.request.urlopen(f"{url}/models/a", timeout=10) as resp:
                status = json.loads(resp.read())
            time.sleep(0.2)
        assert [r["version"] for r in status["rejected"]] == [2], status
        assert status["version"] == 1
        stop(proc)
        server.stop()
        proc = modeld(*args, env=env)
        wait_http(f"{url}/health", timeout_s=120, proc=proc)  # ready, not 503
        code, headers = post(f"{url}/models/a/invocations", split_body(1))
        assert code == 200 and headers["X-Model-Version"] == "1"
        assert headers["X-Model-Stale"] == "true"
    finally:
        stop(proc)
        server.stop()


async def test_a_deleted_pinned_version_stays_reported(aiohttp_client, registry, cache_dir):
    """Reported until the ref resolves again, not for one poll (it used to clear at the next
    poll, the card turning green)."""
    c = registry.client()
    for k in (1, 2):
        register(c, "pinned-gone", registry.models[f"const{k}"])
    config = make_config(
        registry, cache_dir, "d=models:/pinned-gone/1", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    await run(c.delete_model_version, "pinned-gone", "1")

    async def problem():
        return (await (await client.get("/models/d")).json())["problem"]

    assert await until(problem)
    await asyncio.sleep(POLL_S * 10)  # many polls later
    status = await (await client.get("/models/d")).json()
    assert status["problem"] and status["problem_kind"] == "not found", status
    assert status["version"] == 1 and status["stale"] is False
    page = await (await client.get("/")).text()
    assert 'data-model="d" data-state="bad"' in page and "not in the registry now" in page


@pytest.mark.slow
async def test_stale_means_could_not_ask_not_an_empty_answer(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """A start with the registry down serves the cached version, stale; when the registry
    is back and the stage is empty, the answer is no longer stale: it is a problem of its own
    (it used to keep X-Model-Stale: true and 'loaded (stale)' for ever)."""
    c = registry.client()
    name = "emptied"
    register(c, name, registry.models["const1"], stage="Staging")
    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    server.start()
    overrides = through(server)
    config = make_config(registry, cache_dir, f"models:/{name}/Staging", **overrides)
    first = await start(aiohttp_client, config)
    await first.close()
    await run(server.stop)
    try:
        offline = await start(aiohttp_client, config)
        resp = await offline.post("/invocations", json=split_payload(iris_frame(1)))
        assert resp.headers.get("X-Model-Stale") == "true"
        await run(c.transition_model_version_stage, name, "1", "Archived")  # the stage empties
        await run(server.start)

        async def answered():
            status = await (await offline.get(f"/models/{name}")).json()
            return status if status["problem_kind"] == "not found" else None

        status = await until(answered, timeout_s=60)
        assert status and status["stale"] is False and status["version"] == 1, status
        registry_status = (await (await offline.get("/models")).json())["registry"]
        assert registry_status["reachable"] is True
        resp = await offline.post("/invocations", json=split_payload(iris_frame(1)))
        assert resp.status == 200 and "X-Model-Stale" not in resp.headers
    finally:
        await run(server.stop)


async def test_rejections_no_ref_names_move_to_history(
    aiohttp_client, registry, cache_dir, tmp_path
):
    """latest moves past a rejected version: the rejection moves to history and the card is
    green again (it used to stay amber listing it until a restart)."""
    import shutil

    c = registry.client()
    name = "moving-on"
    register(c, name, registry.models["const1"])
    config = make_config(
        registry, cache_dir, f"models:/{name}/latest", registry__poll_interval_s=POLL_S
    )
    client = await start(aiohttp_client, config)
    broken = tmp_path / "broken"
    shutil.copytree(registry.models["const2"], broken)
    next(broken.glob("model.*")).unlink()
    register(c, name, broken)

    async def status():
        return await (await client.get(f"/models/{name}")).json()

    async def rejected():
        return (await status())["rejected"]

    assert await until(rejected)
    register(c, name, registry.models["const3"])  # latest moves on to v3

    async def on_three():
        return await served(client, name) == 3

    assert await until(on_three)
    final = await status()
    assert final["rejected"] == [] and [r["version"] for r in final["history"]] == [2]
    page = await (await client.get("/")).text()
    assert f'data-model="{name}" data-state="ok"' in page


async def test_a_ref_that_stops_resolving_is_logged_once(
    aiohttp_client, registry, cache_dir, caplog
):
    """Not once per poll (235 lines per route in 4 minutes at a 1 s poll, before)."""
    c = registry.client()
    register(c, "quiet", registry.models["const1"])
    c.set_registered_model_alias("quiet", "live", "1")
    config = make_config(
        registry, cache_dir, "q=models:/quiet@live", registry__poll_interval_s=0.05
    )
    client = await start(aiohttp_client, config)
    caplog.set_level(logging.INFO, logger="loader")
    await run(c.delete_registered_model_alias, "quiet", "live")

    async def problem():
        return (await (await client.get("/models/q")).json())["problem"]

    assert await until(problem)
    await asyncio.sleep(1.5)  # ~30 polls
    lines = [
        r for r in caplog.records if r.name == "loader.manager" and "alias 'live'" in r.message
    ]
    assert len(lines) == 1, [r.message for r in lines]
    await run(c.set_registered_model_alias, "quiet", "live", "1")

    async def back():
        return not await problem()

    assert await until(back)
    assert any("resolves again" in r.message for r in caplog.records)


def test_live_model_on_swap_is_for_swaps_only(registry, cache_dir, caplog):
    """The README's snippet (``old.label``) works: no call with old=None for the first load."""
    import loader

    c = registry.client()
    register(c, "snippet", registry.models["const1"])
    calls = []
    with loader.LiveModel(
        "models:/snippet/latest",
        poll_interval_s=0.1,
        on_swap=lambda old, new: calls.append((old.label, new.label)),
        cache_dir=cache_dir,
        tracking_uri=registry.uri,
        registry_uri=registry.uri,
    ) as live:
        register(c, "snippet", registry.models["const2"])
        deadline = time.monotonic() + 15
        while live.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.version == 2
    assert calls == [("snippet@1", "snippet@2")]
    assert "on_swap callback raised" not in caplog.text


def test_resolve_without_a_registry_says_so_and_creates_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "resolve", "models:/fraud/1", "--cache-dir",
         str(tmp_path / "cache")],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no registry to ask" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_not_found_names_the_registry_it_asked(registry, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "resolve", "models:/fraud/1", "--tracking-uri",
         registry.uri, "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"no registered model 'fraud' in registry {registry.uri}" in proc.stderr, proc.stderr


def test_check_config_reports_a_bad_stage_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[models]]\nuri = "models:/iris/Prod"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "serving", "check-config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    problems = [line for line in proc.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 1 and "unknown stage 'Prod'" in problems[0], proc.stderr


def test_cache_ls_columns_line_up(registry, tmp_path):
    cache = tmp_path / "cache"
    base = [sys.executable, "-m", "serving"]
    common = ["--tracking-uri", registry.uri, "--cache-dir", str(cache)]
    pull = subprocess.run(
        [*base, "pull", "models:/iris/1", "models:/iris/3", "--no-load", *common],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    ls = subprocess.run(
        [*base, "cache", "ls", *common], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    rows = ls.stdout.splitlines()[:-1]  # the last line is the total
    assert rows[0].startswith("VERSION") and len(rows) == 3, ls.stdout
    starts = {row.index(row.split()[2]) for row in rows[1:]}  # the date column
    assert len(starts) == 1, ls.stdout
    path_at = {row.index(str(cache)) for row in rows[1:]}
    assert len(path_at) == 1, ls.stdout


def test_serve_on_a_port_in_use_exits_at_once_with_the_reason(registry, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "serving", "serve", "-m", "models:/iris/1", "--port",
             str(port), "--cache-dir", str(tmp_path / "cache")],
            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1 and time.monotonic() - started < 10
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "listening" not in proc.stderr


@pytest.mark.slow
def test_demo_prints_its_curl_line_once_it_answers(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "demo", "--state-dir", str(tmp_path / "demo"),
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "curl -si -X POST" in line or not line:
                break
        assert "curl -si -X POST" in line
        code, headers = post(f"http://127.0.0.1:{port}/invocations", split_body(1))
        assert code == 200 and headers["X-Model-Version"] == "2"
    finally:
        stop(proc)


def test_worker_views_merge_into_one_status():
    """With --workers, GET /models lists every worker's version of each route."""
    from serving.runtime.peers import merged_status

    def status(version, state="loaded", reachable=True):
        model = {"name": "iris", "version": version, "state": state, "stale": False}
        return {"models": [model], "registry": {"reachable": reachable}}

    merged = merged_status(status(3), [{"pid": 2, "status": status(2)}])
    (model,) = merged["models"]
    assert sorted(w["version"] for w in model["workers"]) == [2, 3]
    assert model["consistent"] is False and merged["workers"] == 2
    same = merged_status(status(3), [{"pid": 2, "status": status(3, reachable=False)}])
    assert same["models"][0]["consistent"] is True and same["registry"]["reachable"] is False
    assert merged_status(status(3), [])["models"][0]["workers"][0]["pid"] == os.getpid()


@pytest.mark.slow
async def test_a_problem_stays_shown_through_an_outage_and_the_outage_is_one_line(
    aiohttp_client, registry, cache_dir, tmp_path, caplog
):
    """A deleted alias is a problem; the registry then goes down: the problem stays on the
    card (it used to vanish behind 'stale'), and the outage costs one log line, not one per
    route per poll."""
    c = registry.client()
    for name in ("through-a", "through-b"):
        register(c, name, registry.models["const1"])
        c.set_registered_model_alias(name, "live", "1")
    server = MlflowServer(registry.db, tmp_path / "art", tmp_path / "server.log")
    server.start()
    overrides = through(server, poll_interval_s=0.05)
    config = make_config(
        registry,
        cache_dir,
        "a=models:/through-a@live",
        "b=models:/through-b/latest",
        **overrides,
    )
    client = await start(aiohttp_client, config)
    try:
        await run(c.delete_registered_model_alias, "through-a", "live")

        async def problem():
            return (await (await client.get("/models/a")).json())["problem"]

        assert await until(problem)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="loader")
        await run(server.stop)

        async def down():
            status = await (await client.get("/models")).json()
            return status["registry"]["unreachable_since"] is not None

        assert await until(down, timeout_s=30)
        await asyncio.sleep(3)  # polls back off, but several still fail
        status = await (await client.get("/models/a")).json()
        assert status["problem_kind"] == "not found" and status["version"] == 1, status
        page = await (await client.get("/")).text()
        assert 'data-model="a" data-state="bad"' in page
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("loader")]
        assert sum("unreachable" in line for line in lines) <= 2, lines
        assert not any(line.startswith(("a:", "b:")) for line in lines), lines
    finally:
        await run(server.stop)


def test_urllib3_retry_lines_stay_out_of_the_log():
    from serving.logsetup import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("urllib3").level
    try:
        setup_logging("INFO")
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.WARNING)
        assert logging.getLogger("loader.manager").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], level, urllib3_level = saved
        root.setLevel(level)
        logging.getLogger("urllib3").setLevel(urllib3_level)
