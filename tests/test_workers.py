"""`--workers N`: one port, one cache, one download per version, restarts, drain, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    free_port,
    iris_frame,
    register,
    save_slow_model,
    serve_modeld,
    wait_http,
    wait_shared,
)

ROOT = Path(__file__).resolve().parent.parent


def post(url, body, timeout=30):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read()), dict(resp.headers)


@pytest.mark.slow
def test_workers_share_port_and_cache_restart_and_drain(registry, tmp_path):
    slow = save_slow_model(tmp_path / "slow", answer=7)
    port = free_port()
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "-m",
            "models:/iris/Production",
            "-m",
            f"slow={slow}",
            "--cache-dir",
            str(cache),
        ],
        cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    body = {"dataframe_split": json.loads(iris_frame(1).to_json(orient="split", index=False))}
    try:
        wait_http(f"{base}/health", timeout_s=120, proc=proc)
        shared_by = wait_shared(base, 2)

        def workers_seen(n_requests=60):
            pids = set()
            for _ in range(n_requests):
                status, payload, headers = post(f"{base}/invocations", body)
                assert status == 200 and payload == {"predictions": [2]}
                pids.add(headers["X-Modeld-Worker"])
            return pids

        deadline = time.monotonic() + 60
        pids = workers_seen()
        while len(pids) < 2 and time.monotonic() < deadline:  # the 2nd worker may still load
            pids |= workers_seen(20)
        assert pids == shared_by, (pids, shared_by)
        entries = list((cache / "models" / "iris").iterdir())
        assert len(entries) == 1  # one entry for iris v2, downloaded once for both workers

        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        total = sum(
            s.value
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "modeld_requests_total" and s.labels.get("status") == "200"
        )
        assert total >= 60  # merged across both workers, whichever one answered the scrape
        # GET /models and the status page: every worker's view, whichever one answers
        for _ in range(6):
            models = json.loads(urllib.request.urlopen(f"{base}/models").read())
            iris = next(m for m in models["models"] if m["name"] == "iris")
            assert {str(w["pid"]) for w in iris["workers"]} == pids, iris
            assert iris["consistent"] and models["workers"] == 2
        page = urllib.request.urlopen(f"{base}/").read().decode()
        assert "<th>workers</th><td>2 (" in page

        victim = int(next(iter(pids)))
        other = int(next(iter(pids - {str(victim)})))
        # the supervisor's metrics directory (set after the fork: not in /proc/PID/environ)
        (state,) = Path(tempfile.gettempdir()).glob(f"modeld-metrics-*/modeld-state-{other}.json")
        shared = state.parent
        published = {p.name for p in shared.glob("modeld-state-*.json")}
        assert published == {f"modeld-state-{victim}.json", f"modeld-state-{other}.json"}
        assert list(shared.glob(f"gauge_livesum_{victim}.db"))  # its in-flight gauge
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        fresh = set()
        while time.monotonic() < deadline and not (fresh - pids):
            try:
                fresh |= workers_seen(10)
            except OSError:
                time.sleep(0.2)
        assert fresh - pids, "the killed worker was not replaced"
        # the dead worker's live gauges and published state are gone (its counters stay:
        # totals must not drop); the others' remain
        assert not (shared / f"gauge_livesum_{victim}.db").exists()
        assert not (shared / f"modeld-state-{victim}.json").exists()
        assert (shared / f"modeld-state-{other}.json").exists()
        found = {
            (s.labels["route"], s.labels["version"])
            for f in text_string_to_metric_families(
                urllib.request.urlopen(f"{base}/metrics").read().decode()
            )
            for s in f.samples
            if s.name == "modeld_model_info"
        }
        assert ("iris", "2") in found and "slow" in {route for route, _ in found}, found

        result = {}

        def slow_call():
            result["answer"] = post(f"{base}/models/slow/invocations", {"inputs": [[2.0]]})

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.7)
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=60)
        assert result["answer"][0] == 200 and result["answer"][1] == {"predictions": [7]}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and its workers
        _, err = proc.communicate(timeout=30)
    assert err.count("cached iris@2 (") == 1, err[-3000:]  # one download across workers
    assert "restarting" in err


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_ends_a_restart_backoff(tmp_path):
    """A worker dying over and over puts the supervisor in a growing backoff (2 s, 4 s, ...);
    SIGTERM during it must stop everything at once, not when the backoff ends."""
    model = save_slow_model(tmp_path / "slow", answer=1)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--workers", "2", "--port", str(port),
         "-m", f"slow={model}", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
        wait_shared(f"http://127.0.0.1:{port}", 2)
        steady = min(_children(proc.pid))  # left alone: it drains at SIGTERM
        for death in range(1, 8):  # deaths 6 and 7 start 2 s and 4 s backoffs
            victims = _children(proc.pid) - {steady}
            for _ in range(100):  # bounded: the respawn (after any backoff) shows up
                if victims:
                    break
                time.sleep(0.1)
                victims = _children(proc.pid) - {steady}
            assert victims, f"no worker to kill before death {death}"
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):  # bounded: wait until the supervisor has reaped it
                if not (_children(proc.pid) & victims):
                    break
                time.sleep(0.05)
        time.sleep(0.5)  # the supervisor is now 0.5 s into a 4 s backoff
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 2.5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert err.count("restarting") == 7, err[-3000:]


@pytest.mark.slow
def test_a_swap_rolls_the_workers_to_a_shared_new_version_without_a_failed_request(
    registry, tmp_path
):
    """Workers swap on their own, then the supervisor loads the new version once and forks a
    generation sharing it; the old generation drains. No request fails or is refused."""
    client = registry.client()
    register(client, "rolling", registry.models["const1"])
    register(client, "rolling", registry.models["const2"])
    client.set_registered_model_alias("rolling", "live", "1")
    proc, base = serve_modeld(
        registry, tmp_path / "cache", "--workers", "2", "--poll-interval", "0.5",
        "-m", "models:/rolling@live", start_new_session=True,
    )  # fmt: skip
    body = {"dataframe_split": json.loads(iris_frame(1).to_json(orient="split", index=False))}
    answers: list[object] = []
    stop = threading.Event()

    def load() -> None:
        for _ in range(5000):  # bounded; stopped once the roll is seen
            if stop.is_set():
                return
            try:
                status, payload, _ = post(f"{base}/invocations", body)
                answers.append((status, payload["predictions"][0]))
            except Exception as exc:  # a refused or reset connection is a failure too
                answers.append(("error", repr(exc)))

    try:
        wait_http(f"{base}/health", timeout_s=120, proc=proc)
        first = wait_shared(base, 2)
        caller = threading.Thread(target=load)
        caller.start()
        time.sleep(1)
        client.set_registered_model_alias("rolling", "live", "2")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            models = json.loads(urllib.request.urlopen(f"{base}/models", timeout=10).read())
            workers = models["models"][0]["workers"]
            if (
                len(workers) == 2
                and all(w["version"] == 2 and w["loaded_by"] == "inherited" for w in workers)
                and not ({str(w["pid"]) for w in workers} & first)
            ):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no shared generation on version 2: {models}")
        time.sleep(1)
        stop.set()
        caller.join(timeout=60)
        assert answers and all(status == 200 for status, _ in answers), [
            a for a in answers if a[0] != 200
        ][:5]
        assert {answer for _, answer in answers} == {1, 2}
        assert answers[-1] == (200, 2)
        for pid in first:  # the old generation is gone
            for _ in range(100):
                if not os.path.exists(f"/proc/{pid}") or _zombie(int(pid)):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"worker {pid} of the old generation still runs")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert "to share with the workers" in err, err[-3000:]
    assert err.count("cached rolling@2 (") == 1, err[-3000:]  # downloaded once


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_worker_publishes_only_the_modules_it_imported_since_its_fork(tmp_path, monkeypatch):
    """What the supervisor imports before the next generation: the worker's own imports,
    read from the end of sys.modules (walking all of it copies ~6 MB of shared pages)."""
    from serving.runtime import peers

    package = tmp_path / "src"
    package.mkdir()
    (package / "modeld_fresh_module.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.setattr(peers, "_modules_at_fork", None)
    monkeypatch.delitem(sys.modules, "modeld_fresh_module", raising=False)
    peers.forked()
    import modeld_fresh_module  # noqa: F401

    sys.modules["modeld_blocked_module"] = None  # an import blocked on purpose: not listed
    try:
        peers.publish_modules(str(tmp_path))
    finally:
        del sys.modules["modeld_fresh_module"], sys.modules["modeld_blocked_module"]
    published = json.loads((tmp_path / f"modeld-modules-{os.getpid()}.json").read_text())
    assert published == ["modeld_fresh_module"]


def test_a_shared_database_store_serves_a_forked_process_on_its_own_connection(registry):
    """``share_stores``: the supervisor builds the registry's database store once, its pool
    emptied; a process forked after it reuses that store (MLflow keeps one per URI) and
    queries the registry on a connection of its own, and so does the parent afterwards."""
    from mlflow import MlflowClient

    from loader.api import share_stores

    assert share_stores(tracking_uri=registry.uri, registry_uri=registry.uri) == 2
    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    store = client._get_registry_client().store
    assert store.engine.pool.checkedin() == 0  # nothing a fork would share
    assert share_stores(tracking_uri="http://127.0.0.1:9", registry_uri=None) == 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": the parent's store, its own connection
        code = 1
        try:
            same = MlflowClient(tracking_uri=registry.uri)._get_registry_client().store is store
            version = MlflowClient(tracking_uri=registry.uri).get_model_version("iris", "2")
            os.write(write, json.dumps([same, version.current_stage]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as fh:
        answer = json.loads(fh.read() or b"null")
    assert os.waitstatus_to_exitcode(status) == 0 and answer == [True, "Production"]
    assert client.get_model_version("iris", "1").current_stage == "Staging"


def _worker_versions(base: str, name: str) -> dict[str, object]:
    """Each worker's version of route ``name`` (pid -> version), whichever worker answers
    (none yet when that worker has not applied a load of it)."""
    try:
        view = json.loads(urllib.request.urlopen(f"{base}/models/{name}", timeout=10).read())
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        return {}
    return {str(w["pid"]): w["version"] for w in view.get("workers", [])}


def _published_routes(pids: set[str]) -> dict[str, set[str]]:
    """The routes each of ``pids`` last published (its state file in the supervisor's
    directory, written at every poll and swap)."""
    routes = {}
    for pid in pids:
        for path in Path(tempfile.gettempdir()).glob(f"modeld-metrics-*/modeld-state-{pid}.json"):
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                routes[pid] = {m["name"] for m in state["status"]["models"]}
    return routes


def _wait_versions(base: str, name: str, version: int, workers: int, *, avoid=frozenset()):
    deadline = time.monotonic() + 90
    seen: dict[str, object] = {}
    while time.monotonic() < deadline:
        seen = _worker_versions(base, name)
        if len(seen) == workers and set(seen.values()) == {version} and not set(seen) & set(avoid):
            return set(seen)
        time.sleep(0.2)
    raise AssertionError(f"not every worker serves {name} version {version}: {seen}")


@pytest.mark.slow
def test_an_admin_pin_made_through_one_worker_holds_in_every_worker(registry, tmp_path):
    """A pin reaches one worker; every worker serves the pinned version, so does a worker
    restarted later (it applies the ledger before it serves), and the unpin reaches all."""
    client = registry.client()
    register(client, "pinned", registry.models["const1"])
    register(client, "pinned", registry.models["const2"])
    proc, base = serve_modeld(
        registry, tmp_path / "cache", "--workers", "2", "--poll-interval", "0.5",
        "-m", "models:/pinned/latest", start_new_session=True,
    )  # fmt: skip
    body = {"dataframe_split": json.loads(iris_frame(1).to_json(orient="split", index=False))}

    def answers(n=30):
        return {
            (headers["X-Modeld-Worker"], payload["predictions"][0])
            for status, payload, headers in (
                post(f"{base}/models/pinned/invocations", body) for _ in range(n)
            )
            if status == 200
        }

    try:
        wait_http(f"{base}/health", timeout_s=120, proc=proc)
        wait_shared(base, 2)
        status, pinned, _ = post(f"{base}/admin/models/pinned/pin", {"version": 1})
        assert status == 200 and pinned["version"] == 1, pinned
        _wait_versions(base, "pinned", 1, 2)
        got = answers()
        assert {answer for _, answer in got} == {1}, got

        victim = next(iter(_worker_versions(base, "pinned")))
        os.kill(int(victim), signal.SIGKILL)  # forked again: it resolves latest, then the pin
        _wait_versions(base, "pinned", 1, 2, avoid={victim})
        assert {answer for _, answer in answers()} == {1}

        request = urllib.request.Request(f"{base}/admin/models/pinned/pin", method="DELETE")
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
        _wait_versions(base, "pinned", 2, 2)
        assert {answer for _, answer in answers()} == {2}

        # the Open Inference Protocol's repository: a route loaded, then unloaded, in all
        status, loaded, _ = post(f"{base}/v2/repository/models/extra/load",
                                 {"parameters": {"uri": "models:/pinned/1"}})  # fmt: skip
        assert status == 200 and loaded == {"name": "extra", "version": "1"}
        _wait_versions(base, "extra", 1, 2)
        status, _, _ = post(f"{base}/v2/repository/models/extra/unload", {})
        assert status == 200
        deadline, routes = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # what every worker publishes (a GET meets one)
            routes = _published_routes(set(_worker_versions(base, "pinned")))
            if len(routes) == 2 and not any("extra" in names for names in routes.values()):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"extra still served: {routes}")
    finally:
        # (the supervisor is rolling to a generation on version 2 by now: a SIGTERM in the
        # middle of a roll must reach the workers it forks, or it waits out the drain)
        os.killpg(proc.pid, signal.SIGTERM)
        stopping = time.monotonic()
        _, err = proc.communicate(timeout=60)
    assert time.monotonic() - stopping < 20, err[-3000:]
    assert "applying pin of pinned (1), made through another worker" in err
    assert "applying unpin of pinned" in err
    assert "applying load of extra (models:/pinned/1)" in err
    assert "applying unload of extra" in err
    assert proc.returncode == 0, err[-3000:]


def test_the_edit_ledger_keeps_what_lasts_and_drops_what_a_reload_ends(tmp_path):
    """serving.runtime.edits: later edits of a route replace earlier ones; weights and
    repository edits hold under the config they were made under, until a reload mark."""
    from serving.runtime import edits

    d = str(tmp_path)
    assert edits.read(d) == []
    one = edits.record(d, edits.PIN, "iris", 3, ref="models:/iris/latest")
    two = edits.record(d, edits.WEIGHTS, "fraud", {"b": 50}, config="A")
    three = edits.record(d, edits.UNPIN, "iris")  # replaces the pin
    four = edits.record(d, edits.LOAD, "extra", "models:/iris/1", config="A")
    assert [one, two, three, four] == [1, 2, 3, 4]
    assert [(e.seq, e.kind) for e in edits.read(d)] == [(2, "weights"), (3, "unpin"), (4, "load")]
    assert [e.seq for e in edits.pending(edits.read(d), 0, "A")] == [2, 3, 4]
    assert [e.seq for e in edits.pending(edits.read(d), 2, "A")] == [3, 4]
    assert [e.seq for e in edits.pending(edits.read(d), 0, "B")] == [3]  # another config
    edits.record(d, edits.RELOAD, "")  # SIGHUP: weights and repository edits end
    assert [e.kind for e in edits.read(d)] == ["unpin", "reload"]
    edits.record(d, edits.POLL, "")
    edits.record(d, edits.POLL, "iris")  # only the latest poll request is kept
    assert [(e.kind, e.name) for e in edits.pending(edits.read(d), 0, "A")] == [
        ("unpin", "iris"),
        ("poll", "iris"),
    ]


async def test_one_server_never_signals_its_parent_even_with_a_multiprocess_dir(
    registry, tmp_path, monkeypatch
):
    """PROMETHEUS_MULTIPROC_DIR set by a user for one `modeld serve` (prometheus-client's own
    convention) must not make it a --workers worker: no ledger, no SIGUSR1 to its parent
    (whose default action is to die)."""
    from serving.runtime import edits
    from serving.runtime.lifecycle import Daemon
    from tests.helpers import make_config

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("MODELD_WORKER", raising=False)
    monkeypatch.setattr(os, "getppid", os.getpid)  # a relay would land here, not on the shell
    daemon = Daemon(make_config(registry, tmp_path / "cache", "models:/iris/1"))
    got: list[int] = []
    previous = signal.signal(edits.RELAY_SIGNAL, lambda signum, _: got.append(signum))
    try:
        await daemon.share(edits.UNPIN, "iris")
        await asyncio.sleep(0.1)
    finally:
        signal.signal(edits.RELAY_SIGNAL, previous)
        daemon.load_pool.shutdown(wait=True)
    assert edits.read(str(tmp_path)) == [] and got == []
