"""Everything aiohttp: keys, the one error map, auth, and the route families.

- :mod:`~serving.http.keys`: the app's and the request's typed keys;
- :mod:`~serving.http.errors`: the ONE map from an error to a status and an envelope;
- :mod:`~serving.http.auth`: bearer tokens and loopback checks;
- :mod:`~serving.http.predict`: what every prediction route shares (auth, metrics, headers);
- :mod:`~serving.http.mlflow`: MLflow's scoring routes, multi-model routes, probes;
- :mod:`~serving.http.oip`: the Open Inference Protocol v2, a sub-app at ``/v2``;
- :mod:`~serving.http.admin`: refresh, pin and webhooks, a sub-app at ``/admin``;
- :mod:`~serving.http.status`: the status page and ``/metrics``.
"""
