"""Pure bytes <-> model input/output, one module per wire protocol; no aiohttp, no HTTP status.

- :mod:`serving.codecs.base`: :class:`Decoded`, :class:`Codec`, :class:`ProtocolError` and the
  error envelopes as data;
- :mod:`serving.codecs.mlflow`: MLflow's scoring protocol (JSON, CSV, Parquet, params);
- :mod:`serving.codecs.oip`: Open Inference Protocol v2 tensors.
"""
