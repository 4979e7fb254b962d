"""The two ceilings every serving benchmark reports modeld against (issue 18):

- ``bare``: an aiohttp server that reads the body and answers a fixed body: no parse, no
  predict. Nothing built on aiohttp answers faster on this machine.
- ``naive``: orjson-parse the body, call the scikit-learn estimator on a NumPy array of the
  ``dataframe_split`` rows, orjson-encode; on the event loop, no batching, no checks. What
  anyone would write in ten lines for one known model.

Both run on the same event loop modeld runs on (uvloop when installed), one process each:

    .venv/bin/python bench/refservers.py bare|naive --port P [--model-uri URI]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("bare", "naive"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-uri")
    args = parser.parse_args()
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
