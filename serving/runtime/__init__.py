"""The daemon's machinery, below any transport (no ``aiohttp.web`` here).

- :mod:`~serving.runtime.dataplane`: route -> handle -> batch -> predict, for any transport;
- :mod:`~serving.runtime.batching`: one route's predict worker (adaptive batching);
- :mod:`~serving.runtime.predict`: the model call with MLflow's error semantics;
- :mod:`~serving.runtime.streaming`: ``"stream": true``, the model's ``predict_stream`` as events;
- :mod:`~serving.runtime.lifecycle`: start, follow, apply an edited config, stop;
- :mod:`~serving.runtime.follower`: the poll loop and file watching;
- :mod:`~serving.runtime.metrics`: Prometheus metrics;
- :mod:`~serving.runtime.history`: the last hour per route, for the status page's charts;
- :mod:`~serving.runtime.peers`: with ``--workers``, each worker's state, merged into one view;
- :mod:`~serving.runtime.supervisor`: ``--workers N`` processes on one port.
"""
