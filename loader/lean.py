"""The lean model call: a scikit-learn estimator's own method on a NumPy matrix.

A request that the serving fast path reads as a conformant matrix (every column of an all-double
or all-float signature, in order) reaches ``mlflow.pyfunc`` as a DataFrame, and scikit-learn
then spends most of the call validating the DataFrame's feature names: on 2 cores, a one-row
``LogisticRegression.predict`` costs ~1.2 ms on a DataFrame and ~0.23 ms on the same row as an
array. :func:`decide` proves, per loaded version, that calling the estimator's method on the
matrix (columns in ``feature_names_in_`` order) gives the very answer the pyfunc path gives,
on the model's input example and on a batch of it, with no warning or exception of its own;
only then does a version take the lean call. Anything else (a custom pyfunc, another flavor, a
pipeline that selects columns by name, a signature from type hints) keeps the pyfunc path, and
the decision says why.

The estimator is called on a NumPy array whose columns are, by construction, the ones it was
fitted on; scikit-learn would warn that the array "does not have valid feature names". That one
warning is filtered (:data:`FEATURE_NAMES_WARNING`, installed once when a version first takes
the lean call): on this path it is always spurious.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

log = logging.getLogger(__name__)

#: scikit-learn's warning for an array passed to an estimator fitted with feature names.
FEATURE_NAMES_WARNING = r"X does not have valid feature names, but \w+ was fitted with feature"
#: How many copies of the example the batch check stacks (a batch of requests, as batching does).
BATCH_COPIES = 32
#: Answers must agree to this (absolute) on every element, NaN equal to NaN.
TOLERANCE = 1e-9

_MISSING = object()


class ModelMemo:
    """Facts about a loaded model, kept as long as the model lives.

    (PyFuncModel is unhashable, so a WeakKeyDictionary cannot hold it: key by identity and let a
    weak reference's callback drop the entry.)
    """

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref[Any], Any]] = {}

    def get(self, model: Any, default: Any = None) -> Any:
        entry = self._data.get(id(model))
        return entry[1] if entry is not None and entry[0]() is model else default

    def set(self, model: Any, value: Any) -> None:
        key = id(model)
        self._data[key] = (weakref.ref(model, lambda _: self._data.pop(key, None)), value)


#: Per-model answer of numeric_layout (its signature does not change once loaded).
_LAYOUTS = ModelMemo()


def numeric_layout(model: Any) -> tuple[Any, list[str]] | None:
    """(numpy dtype, input names) of a model whose signature is all required double (or all
    required float) columns, else None: the models whose requests can be read as one matrix;
    remembered per model."""
    cached = _LAYOUTS.get(model, _MISSING)
    if cached is not _MISSING:
        return cast("tuple[Any, list[str]] | None", cached)
    layout = None
    try:
        schema = model.metadata.get_input_schema()
        # A signature from type hints gets its "inputs" unparsed (MLflow's rule): no matrix.
        from_hints = model.metadata._is_signature_from_type_hint()
        if (
            schema is not None
            and not from_hints
            and not schema.is_tensor_spec()
            and schema.has_input_names()
        ):
            types = {getattr(spec.type, "name", None) for spec in schema.inputs}
            required = all(getattr(spec, "required", True) for spec in schema.inputs)
            if required and types in ({"double"}, {"float"}):
                layout = (schema.numpy_types()[0], schema.input_names())
    except Exception:
        layout = None
    with contextlib.suppress(TypeError):  # models that refuse weak references: not cached
        _LAYOUTS.set(model, layout)
    return layout


@dataclass(frozen=True, slots=True)
class LeanCall:
    """``method(matrix)``: the estimator's own predict function on the rows, whose columns are
    the signature's, which are the estimator's ``feature_names_in_`` in order."""

    method: Callable[[Any], Any]
    name: str  #: e.g. ``LogisticRegression.predict_proba``

    def __call__(self, matrix: Any) -> Any:
        return self.method(matrix)


@dataclass(frozen=True, slots=True)
class CallPath:
    """Which call a loaded version's conformant requests take, and why."""

    lean: LeanCall | None
    reason: str

    @property
    def name(self) -> str:
        return "lean" if self.lean is not None else "pyfunc"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.name, "reason": self.reason}


def decide(model: Any, example: dict[str, Any] | None = None) -> CallPath:
    """Whether ``model`` takes the lean call: only when it is a plain scikit-learn flavor model
    with a matrix signature and the lean call answers its example (``example``: MLflow's request
    format, the saved serving input example; else rows made from the signature), alone and as a
    batch, exactly as ``model.predict`` does on the DataFrame, with the same warnings."""
    try:
        found = _candidate(model)
        if isinstance(found, str):
            return CallPath(None, found)
        lean, dtype, names = found
        matrix = _example_matrix(model, example, dtype, names)
        for rows in (matrix, _tile(matrix)):
            differs = _differs(model, lean, rows, names)
            if differs:
                return CallPath(None, differs)
    except Exception as exc:  # a model that cannot even be asked keeps today's path
        return CallPath(None, f"not checked: {type(exc).__name__}: {str(exc)[:200]}")
    _install_filter()
    return CallPath(lean, f"{lean.name} on the rows: same answers as pyfunc on the example")


def _candidate(model: Any) -> tuple[LeanCall, Any, list[str]] | str:
    """The lean call to check, or why there is none."""
    if getattr(model, "loader_module", None) != "mlflow.sklearn":
        return f"flavor {getattr(model, 'loader_module', None) or type(model).__name__}"
    from mlflow.sklearn import _SklearnModelWrapper

    wrapper = getattr(model, "_model_impl", None)
    if type(wrapper) is not _SklearnModelWrapper:
        return f"custom scikit-learn wrapper {type(wrapper).__name__}"
    metadata = model.metadata
    if metadata._is_signature_from_type_hint() or metadata._is_type_hint_from_example():
        return "signature from type hints"
    layout = numeric_layout(model)
    if layout is None:
        return "signature not all double or all float columns"
    dtype, names = layout
    estimator = wrapper.sklearn_model
    bound = getattr(model, "_predict_fn", None)
    # pyfunc's predict_fn: the wrapper's predict (-> estimator.predict), or an estimator
    # method the wrapper exposes as its own (predict_proba, ...).
    if getattr(bound, "__func__", None) is _SklearnModelWrapper.predict:
        method = estimator.predict
    elif getattr(bound, "__self__", None) is estimator:
        method = bound
    else:
        return f"predict function {getattr(bound, '__name__', bound)!r}"
    fitted = getattr(estimator, "feature_names_in_", None)
    if fitted is None:
        return f"{type(estimator).__name__} was fitted without feature names"
    # (In another order scikit-learn refuses the DataFrame the pyfunc path hands it.)
    if [str(n) for n in fitted] != names:
        return f"{type(estimator).__name__}'s feature names are not the signature's columns"
    name = f"{type(estimator).__name__}.{getattr(method, '__name__', 'predict')}"
    return LeanCall(method, name), dtype, names


def _example_matrix(
    model: Any, example: dict[str, Any] | None, dtype: Any, names: list[str]
) -> Any:
    """The example's rows in the signature's order and dtype (parsed as MLflow's scoring server
    parses it), else three rows of distinct values."""
    import numpy as np

    if example:
        from mlflow.pyfunc import scoring_server

        parse: Any = scoring_server._parse_json_data  # untyped in MLflow
        parsed = parse(example, model.metadata, model.metadata.get_input_schema())
        frame = parsed.data
        if hasattr(frame, "columns") and set(names) <= set(map(str, frame.columns)) and len(frame):
            return frame[names].to_numpy(dtype=dtype)
    width = len(names)
    return (np.arange(3 * width, dtype=dtype).reshape(3, width) % 7 + 0.5).astype(dtype)


def _tile(matrix: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.tile(matrix, (BATCH_COPIES, 1)))


def _differs(model: Any, lean: LeanCall, matrix: Any, names: list[str]) -> str | None:
    """Why the lean call's answer on ``matrix`` is not the pyfunc path's, or None."""
    import pandas as pd

    frame = pd.DataFrame(matrix, columns=names, copy=False)  # as the conformant path builds it
    reference, ref_warned = _run(lambda: model.predict(frame))
    answer, warned = _run(lambda: lean(matrix))
    warned = [w for w in warned if not _is_feature_names_warning(w)]
    rows = len(matrix)
    if isinstance(reference, BaseException) or isinstance(answer, BaseException):
        raised = reference if isinstance(reference, BaseException) else answer
        return f"{rows} rows: raised {type(raised).__name__}"
    if ref_warned != warned:
        return f"{rows} rows: warnings differ ({(ref_warned or warned)[0][:120]})"
    if not _same(reference, answer):
        return f"{rows} rows: answers differ"
    return None


def _run(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``call()`` (or the exception it raised) and the warnings it issued.

    (``catch_warnings`` is process-wide: a warning another thread issues meanwhile is recorded
    here too, and at worst makes the lean call look different: the safe side.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except Exception as exc:
            result = exc
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


def _is_feature_names_warning(text: str) -> bool:
    import re

    return re.search(FEATURE_NAMES_WARNING, text) is not None


def _same(a: Any, b: Any) -> bool:
    """The same type, shape and dtype, every element equal to :data:`TOLERANCE` (NaN to NaN)."""
    import numpy as np

    if type(a) is not type(b) or not isinstance(a, np.ndarray):
        return False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=0.0, atol=TOLERANCE, equal_nan=True))
    return bool(np.array_equal(a, b))


def _install_filter() -> None:
    """Filter the feature-names warning (once: ``filterwarnings`` moves an equal filter to the
    front instead of adding it again; a test harness may have reset the filters since)."""
    warnings.filterwarnings("ignore", message=FEATURE_NAMES_WARNING, category=UserWarning)
