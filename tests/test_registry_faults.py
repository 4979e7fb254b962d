"""A slow, dead and flapping registry, through a TCP proxy in front of a real mlflow server."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import (
    POLL_S,
    iris_frame,
    make_config,
    register,
    served,
    split_payload,
    start,
    until,
)


class TcpProxy:
    """Forwards 127.0.0.1:port to the registry. ``mode``: "up"; "slow" (every request waits
    ``delay_s``); "down" (connections refused and open ones cut, keep-alive included)."""

    def __init__(self, upstream_port: int, delay_s: float = 2.0) -> None:
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self._mode = "up"
        self.connections = 0
        self._open: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value
        if value == "down":
            for writer in list(self._open):
                writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        self.connections += 1
        if self.mode == "down":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self._open |= {writer, up_writer}

        async def pipe(src, dst, delay):
            try:
                while data := await src.read(65536):
                    if delay and self.mode == "slow":
                        await asyncio.sleep(self.delay_s)
                    if self.mode == "down":
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                self._open.discard(dst)

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def close(self) -> None:
        self.mode = "down"
        if self.server is not None:
            self.server.close()


@pytest.mark.slow
async def test_slow_dead_and_flapping_registry(aiohttp_client, registry, mlflow_server, cache_dir):
    c = registry.client()
    name = "flappy"
    register(c, name, registry.models["const1"], stage="Production")
    proxy = TcpProxy(mlflow_server.port)
    port = await proxy.start()
    url = f"http://127.0.0.1:{port}"
    config = make_config(
        registry,
        cache_dir,
        f"models:/{name}/Production",
        registry__tracking_uri=url,
        registry__registry_uri=url,
        registry__poll_interval_s=POLL_S,
    )
    client = await start(aiohttp_client, config)
    payload = split_payload(iris_frame(1))

    async def fast_predictions(seconds: float) -> float:
        worst, deadline = 0.0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            resp = await client.post("/invocations", json=payload)
            assert resp.status == 200
            worst = max(worst, time.monotonic() - t0)
            await asyncio.sleep(0.02)
        return worst

    try:
        proxy.mode = "slow"  # every registry call takes 2 s: serving does not notice
        assert await fast_predictions(3.0) < 0.5
        assert proxy.connections >= 1  # the registry is really reached through the proxy

        proxy.mode = "down"

        async def outage_seen():
            status = await (await client.get("/models")).json()
            return status["registry"]["reachable"] is False

        seen = await until(outage_seen, timeout_s=30)
        assert seen, (proxy.connections, await (await client.get("/models")).text())
        before = proxy.connections
        assert await fast_predictions(6.0) < 0.5
        attempts = proxy.connections - before
        # A 0.2 s poll with MLflow's 2 retries, without backoff, would connect ~90 times in 6 s.
        assert attempts <= 20, attempts

        register(c, name, registry.models["const2"])
        c.transition_model_version_stage(name, 2, "Production")
        for _ in range(6):  # flapping
            proxy.mode = "up" if proxy.mode == "down" else "down"
            assert await fast_predictions(0.5) < 0.5
        proxy.mode = "up"

        async def on_two():
            return await served(client, name) == 2

        assert await until(on_two, timeout_s=60)
    finally:
        proxy.close()
