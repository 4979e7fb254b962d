"""`--workers N`: one port, one cache, one download per version, restarts, drain, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, iris_frame, save_slow_model, wait_http

ROOT = Path(__file__).resolve().parent.parent


def post(url, body, timeout=30):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read()), dict(resp.headers)


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
        assert len(pids) == 2, pids
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

        victim = int(next(iter(pids)))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        fresh = set()
        while time.monotonic() < deadline and not (fresh - pids):
            try:
                fresh |= workers_seen(10)
            except OSError:
                time.sleep(0.2)
        assert fresh - pids, "the killed worker was not replaced"

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
