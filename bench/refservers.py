"""The two ceilings every serving benchmark reports modeld against (issue 18):

- ``bare``: an aiohttp server that reads the body and answers a fixed body: no parse, no
  predict. Nothing built on aiohttp answers faster on this machine.
- ``naive``: orjson-parse the body, call the scikit-learn estimator on a NumPy array of the
  ``dataframe_split`` rows, orjson-encode; on the event loop, no batching, no checks. What
  anyone would write in ten lines for one known model.

Both run on the same event loop modeld runs on (uvloop when installed), one process each.
For gRPC, the same idea: ``grpc-aio`` (grpcio's asyncio server) and ``grpc-sync`` (its
thread-pool server) answer every ``ModelInfer`` with a fixed serialized response, no parse:
what grpcio itself can do per call on this machine.

    .venv/bin/python bench/refservers.py bare|naive|grpc-aio|grpc-sync --port P [--model-uri URI]
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web


def bare_app() -> web.Application:
    answer = orjson.dumps({"predictions": [0]})

    async def invocations(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/ping", lambda _: _pong())
    return app


async def _pong() -> web.Response:
    return web.Response(text="\n")


def naive_app(model_uri: str) -> web.Application:
    import mlflow.sklearn
    import numpy as np

    estimator = mlflow.sklearn.load_model(model_uri)

    async def invocations(request: web.Request) -> web.Response:
        document = orjson.loads(await request.read())
        rows = np.array(document["dataframe_split"]["data"], dtype=np.float64)
        result = estimator.predict(rows)
        body = orjson.dumps({"predictions": result}, option=orjson.OPT_SERIALIZE_NUMPY)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/ping", lambda _: _pong())
    return app


def serve_grpc_bare(port: int, *, sync: bool) -> None:
    """A gRPC ``ModelInfer`` that answers a fixed response, and a /ping-like ServerLive."""
    import grpc

    from serving.codecs import messages as pb

    answer = pb.ModelInferResponse(model_name="iris", model_version="1")
    answer.outputs.add(name="predict", datatype="INT64", shape=[1])
    answer.raw_output_contents.append(b"\0" * 8)
    fixed = answer.SerializeToString()
    live = pb.ServerLiveResponse(live=True).SerializeToString()

    def handlers(infer: object, ping: object) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),  # type: ignore[arg-type]
                "ServerLive": grpc.unary_unary_rpc_method_handler(ping),  # type: ignore[arg-type]
            },
        )

    address = f"127.0.0.1:{port}"
    if sync:
        from concurrent import futures

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handlers(lambda r, c: fixed, lambda r, c: live),))
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return

    async def infer(request: bytes, context: object) -> bytes:
        return fixed

    async def ping(request: bytes, context: object) -> bytes:
        return live

    async def run() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handlers(infer, ping),))
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("bare", "naive", "grpc-aio", "grpc-sync"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-uri")
    args = parser.parse_args()
    if args.kind.startswith("grpc-"):
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        serve_grpc_bare(args.port, sync=args.kind == "grpc-sync")
        return
    import warnings

    # The naive server sends arrays to an estimator fitted on a DataFrame: sklearn warns.
    warnings.filterwarnings("ignore", message="X does not have valid feature names")
    app = bare_app() if args.kind == "bare" else naive_app(args.model_uri)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    loop = loop_factory()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
