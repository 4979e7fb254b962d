"""`modeld` as users run it: a subprocess on a free port, config errors, SIGTERM drain."""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, iris_frame, modeld, save_slow_model, wait_http

ROOT = Path(__file__).resolve().parent.parent


def post(url, body, timeout=30):
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read()), dict(resp.headers)


@pytest.fixture
def slow_model(tmp_path):
    return save_slow_model(tmp_path / "slow", answer=7)


@pytest.mark.slow
def test_serve_subprocess_answers_and_drains_on_sigterm(registry, tmp_path, slow_model):
    port = free_port()
    proc = modeld(
        "serve",
        "-m",
        "models:/iris/Production",
        "-m",
        f"slow={slow_model}",
        "--port",
        str(port),
        "--cache-dir",
        str(tmp_path / "cache"),
        env={"MLFLOW_TRACKING_URI": registry.uri},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health", timeout_s=120, proc=proc)
        frame = iris_frame(2)
        body = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        status, payload, headers = post(f"{base}/invocations", body)
        assert status == 200 and payload == {"predictions": [2, 2]}
        assert headers["X-Model-Version"] == "2"

        result = {}

        def slow_call():
            result["answer"] = post(f"{base}/models/slow/invocations", {"inputs": [[2.0]]})

        caller = threading.Thread(target=slow_call)
        caller.start()
        import time

        time.sleep(0.7)  # the slow request is in flight
        proc.send_signal(signal.SIGTERM)
        caller.join(timeout=30)
        assert result["answer"][0] == 200 and result["answer"][1] == {"predictions": [7]}
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_bad_config_exits_2_listing_every_problem(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        """
[server]
port = "eighty"
max_batch_size = 0
colour = "blue"

[dependencies]
policy = "fail"

[cache]
keep_versions = -1

[[models]]
name = "a"
uri = "models:/iris/Prod"

[[models]]
name = "a"
uri = "models:/iris/1"
swap = "sometimes"

[[models]]
name = "c"
uri = "models:/iris/2"
predict_threads = true
"""
    )
    proc = modeld("serve", "--config", str(config))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    for needle in (
        "server.port = 'eighty'",
        "server.max_batch_size = 0",
        "server.colour: unknown key",
        "dependencies.policy = 'fail'",
        "cache.keep_versions = -1: expected >= 0 (0: keep all)",
        "unknown stage 'Prod'",
        "used by two models",
        "swap = 'sometimes'",
        "predict_threads = True: expected int",
    ):
        assert needle in err, (needle, err)
    check = modeld("check-config", str(config))
    _, err2 = check.communicate(timeout=60)
    assert check.returncode == 2 and "server.colour" in err2


def test_env_overrides_and_check_config_ok(tmp_path):
    from serving.config import load_config

    config = tmp_path / "ok.toml"
    config.write_text('[server]\nport = 9000\n\n[[models]]\nuri = "models:/iris@champion"\n')
    loaded = load_config(
        config, env={"MODELD_SERVER__PORT": "9100", "MODELD_DEPENDENCIES__IGNORE": "pytest, pip"}
    )
    assert loaded.server.port == 9100
    assert loaded.dependencies.ignore == ("pytest", "pip")
    assert loaded.models[0].name == "iris" and loaded.default_model == "iris"
    proc = modeld("check-config", str(config))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "ok" in out


def test_no_model_is_a_usage_error():
    proc = modeld("serve")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "no model to serve" in err


def test_example_config_is_valid():
    from serving.config import load_config

    config = load_config(ROOT / "config.example.toml", env={})
    assert config.models


def test_mlflow_models_serve_command_line_is_accepted(capsys):
    """`mlflow models serve`'s flags mean the same here, so a Dockerfile's command line needs
    only its program name changed."""
    from serving.cli.main import build_parser, config_from_args, main

    line = "serve --model-uri models:/iris/1 -h 0.0.0.0 -p 5001 -t 12 -w 2 --env-manager local"
    config = config_from_args(build_parser().parse_args(line.split()))
    assert [m.uri for m in config.models] == ["models:/iris/1"]
    s = config.server
    assert (s.host, s.port, s.request_timeout_s, s.workers) == ("0.0.0.0", 5001, 12.0, 2)
    assert main(["serve", "-m", "models:/iris/1", "--env-manager", "conda"]) == 2
    assert "--env-manager 'conda': expected local, uv or virtualenv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # `-h` alone still asks for help
        main(["serve", "-h"])
    assert done.value.code == 0 and "-h HOST, --host HOST" in capsys.readouterr().out


@pytest.mark.slow
def test_a_connection_accepted_before_sigterm_gets_its_answer(registry, tmp_path):
    """A client that connected just before SIGTERM and sends its request just after gets an
    answer, not a closed connection (aiohttp closes such connections at once; with
    --workers an old generation is stopped like this at every roll)."""
    import socket
    import time

    port = free_port()
    proc = modeld(
        "serve", "-m", "models:/iris/Production", "--port", str(port),
        "--cache-dir", str(tmp_path / "cache"), env={"MLFLOW_TRACKING_URI": registry.uri},
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout_s=120, proc=proc)
        frame = iris_frame(1)
        body = json.dumps(
            {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        ).encode()
        request = (
            f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            time.sleep(0.3)  # accepted by the server, nothing sent yet
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)
            conn.sendall(request)
            answer = b""
            for _ in range(100):  # bounded: the server closes after answering
                chunk = conn.recv(65536)
                if not chunk:
                    break
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer[:200]
        assert json.loads(payload) == {"predictions": [2]}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
