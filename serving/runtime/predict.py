"""The model call: ``predict`` with MLflow's error semantics, the lean call and the direct
scikit-learn path.

Runs on a route's predict threads (:mod:`serving.runtime.batching`); bad input is a
:class:`~serving.codecs.base.ProtocolError`, whatever the model raised.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from typing import Any

from loader.lean import LeanCall, ModelMemo
from serving.codecs.base import ProtocolError, bound
from serving.codecs.mlflow import error_code_of, first_part

log = logging.getLogger(__name__)

_MISSING = object()
_DIRECT = ModelMemo()


def predict(
    model: Any,
    data: Any,
    params: dict[str, Any] | None,
    *,
    conformant: bool = False,
    lean: LeanCall | None = None,
) -> Any:
    """``model.predict`` with MLflow's error semantics (bad input -> 400).

    With ``lean`` (:mod:`loader.lean`: proven at warm-up to answer as the pyfunc path does),
    ``data`` is a conformant request's matrix and goes to the estimator's own method. Else a
    ``conformant`` frame for a scikit-learn model without params goes straight to the model's
    predict function: MLflow's schema enforcement would return the same frame, and it costs a
    third of the request (DESIGN.md: ~0.4 ms of ~1.1 ms).

    Raises:
        ProtocolError: the model refused the input (schema) or raised.
    """
    from mlflow.exceptions import MlflowException

    from loader.errors import WorkerUnavailable

    try:
        if lean is not None:
            return lean(data)
        direct = _direct_predict(model) if conformant and not params else None
        if direct is not None:
            return direct(data)
        # As MLflow's scoring server: params as parsed, {} included (a chat or agent model's
        # request without any), None only when the request had none at all.
        return model.predict(data) if params is None else model.predict(data, params=params)
    except WorkerUnavailable:  # an isolated model's worker died or restarts: 503, not 400
        raise
    except MlflowException as exc:  # MLflow's words, without the data it quotes
        raise ProtocolError(
            f"Failed to predict data. \nError: {first_part(exc.message)}",
            error_code_of(exc),
            stack_trace=traceback.format_exc(),
        ) from exc
    except Exception as exc:
        log.warning("predict raised %s: %s", type(exc).__name__, bound(str(exc), 300))
        raise ProtocolError(
            "Encountered an unexpected error while evaluating the model. Verify that the "
            f"input is compatible with the model for inference. Error: {type(exc).__name__}: "
            f"{bound(str(exc), 300)}",
            stack_trace=traceback.format_exc(),
        ) from exc


def _direct_predict(model: Any) -> Any:
    """The scikit-learn flavor's predict function behind a PyFuncModel, else None."""
    cached = _DIRECT.get(model, _MISSING)
    if cached is not _MISSING:
        return cached
    fn = None
    if getattr(model, "loader_module", None) == "mlflow.sklearn":
        metadata = model.metadata
        if (
            not metadata._is_signature_from_type_hint()
            and not metadata._is_type_hint_from_example()
        ):
            fn = getattr(model, "_predict_fn", None)
    with contextlib.suppress(TypeError):
        _DIRECT.set(model, fn)
    return fn
