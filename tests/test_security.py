"""Bearer tokens, TLS, Unix sockets, and MLflow credentials that never leak."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    free_port,
    iris_frame,
    make_config,
    self_signed,
    split_payload,
    start,
    wait_http,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_prediction_token(aiohttp_client, registry, cache_dir):
    config = make_config(registry, cache_dir, "models:/iris/2", server__token="pred-token")
    client = await start(aiohttp_client, config)
    body = split_payload(iris_frame(1))
    for path in ("/invocations", "/models/iris/invocations"):
        resp = await client.post(path, json=body)
        assert resp.status == 401 and (await resp.json())["error_code"] == "UNAUTHENTICATED"
        assert "pred-token" not in await resp.text()
    wrong = await client.post("/invocations", json=body, headers={"Authorization": "Bearer x"})
    assert wrong.status == 401
    v2 = await client.post("/v2/models/iris/infer", json={"inputs": []})
    assert v2.status == 401 and "error" in await v2.json()
    ok = await client.post(
        "/invocations", json=body, headers={"Authorization": "Bearer pred-token"}
    )
    assert ok.status == 200
    for probe in ("/ping", "/health", "/v2/health/live", "/metrics"):
        assert (await client.get(probe)).status == 200, probe


def serve(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.mark.slow
def test_tls_and_unix_socket(registry, tmp_path, certificate):
    cert, key = certificate
    port = free_port()
    sock = tmp_path / "modeld.sock"
    env = {"MLFLOW_TRACKING_URI": registry.uri}
    common = ["-m", "models:/iris/2", "--cache-dir", str(tmp_path / "cache")]
    tls = serve(
        *common,
        "--port",
        str(port),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        env=env,
    )
    uds = serve(*common, "--unix-socket", str(sock), env=env)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        import urllib.request

        deadline_ok = False
        for _ in range(600):
            try:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/health", context=context, timeout=2
                ) as resp:
                    deadline_ok = resp.status == 200
                    break
            except OSError:
                assert tls.poll() is None, tls.stderr.read()
                import time

                time.sleep(0.2)
        assert deadline_ok

        async def over_unix():
            health = "no answer"
            for _ in range(600):  # listening comes before loading: wait until healthy
                try:
                    async with (
                        aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as s,
                        s.get("http://modeld/health") as ready,
                    ):
                        health = await ready.text()
                        if ready.status != 200:
                            await asyncio.sleep(0.2)
                            continue
                        async with s.post(
                            "http://modeld/invocations", json=split_payload(iris_frame(2))
                        ) as resp:
                            return resp.status, await resp.json()
                except (aiohttp.ClientError, FileNotFoundError):
                    await asyncio.sleep(0.2)
            raise AssertionError(f"unix socket never healthy: {health}")

        status, body = asyncio.run(over_unix())
        assert status == 200 and body == {"predictions": [2, 2]}
    finally:
        for proc in (tls, uds):
            proc.terminate()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_credentials_pass_through_and_never_leak(registry, mlflow_server, tmp_path):
    """A registry that demands MLFLOW_TRACKING_TOKEN: modeld passes it through, and neither the
    token nor MLFLOW_TRACKING_PASSWORD appears in logs, status or metrics."""
    token, password = "tok-Zq8-secret", "pw-Zq8-secret"
    proxy_port = free_port()
    proxy_log = tmp_path / "proxy.log"
    proxy = subprocess.Popen(
        [sys.executable, "-c", PROXY, str(proxy_port), mlflow_server.url, token, str(proxy_log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    port = free_port()
    uri = f"http://127.0.0.1:{proxy_port}"
    proc = None
    seen = ""
    try:
        wait_http(f"http://127.0.0.1:{proxy_port}/health", proc=proxy)
        proc = serve(
            "-m",
            "models:/iris/Production",
            "--port",
            str(port),
            "--cache-dir",
            str(tmp_path / "cache"),
            env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_TOKEN": token},
        )
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
        import urllib.request

        for path in ("/models", "/models/iris", "/metrics", "/health"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as resp:
                seen += resp.read().decode()
        assert (
            json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/models/iris").read())[
                "version"
            ]
            == 2
        )
        assert "authorized" in proxy_log.read_text()  # the registry saw the token
    finally:
        if proc is not None:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
            seen += err
        proxy.terminate()
        proxy.wait(timeout=10)
    assert token not in seen and password not in seen


PROXY = r"""
import sys, aiohttp
from aiohttp import web
port, upstream, token, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
async def handle(request):
    if request.path != "/health":
        if request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="no token")
        open(log, "a").write("authorized\n")
    headers = {"Content-Type": request.headers.get("Content-Type", "")}
    async with aiohttp.ClientSession() as s:
        async with s.request(request.method, upstream + request.path_qs,
                             data=await request.read(), headers=headers) as r:
            return web.Response(status=r.status, body=await r.read(),
                                content_type=r.content_type)
app = web.Application()
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, print=None)
"""


def test_token_values_are_never_echoed_by_config_errors(tmp_path):
    from serving.config import ConfigProblems, load_config

    path = tmp_path / "c.toml"
    path.write_text("[server]\ntoken = 12345678\n[admin]\nwebhook_secret = 87654321\n")
    with pytest.raises(ConfigProblems) as info:
        load_config(path, env={})
    assert "12345678" not in str(info.value) and "87654321" not in str(info.value)
    assert "server.token = <hidden>" in str(info.value)
