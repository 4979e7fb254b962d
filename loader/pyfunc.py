"""Load a cached model directory with ``mlflow.pyfunc`` and warm it up."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from loader.errors import ModelLoadError

log = logging.getLogger(__name__)


def import_ahead_of_mlflow() -> None:
    """Import ``scipy.special`` before MLflow, once per process, when skops is installed.

    skops (MLflow 3's default, safe format for scikit-learn models) names each of the ~800
    numpy and scipy ufuncs on import by scanning ``sys.modules`` in import order for it. With
    MLflow's ~1,500 modules imported first, the first skops load spends ~0.5 s in that scan;
    with scipy.special (and numpy) ahead of them it takes a few ms. Measured on the benchmark
    models: importing MLflow, scikit-learn and skops goes from ~2.4 s to ~1.9 s. Costs ~0.1 s
    where no skops model is ever loaded; does nothing once MLflow is imported (too late).
    """
    if "mlflow" in sys.modules or importlib.util.find_spec("skops") is None:
        return
    with contextlib.suppress(ImportError):  # scipy comes with scikit-learn; else as before
        import scipy.special  # noqa: F401


class PyFuncLoader:
    """Cheap to construct; :meth:`load` does the expensive ``mlflow.pyfunc.load_model``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, *, model_config: dict[str, Any] | None = None) -> Any:
        """Load the model (``model_config`` as ``mlflow.pyfunc.load_model`` takes it).

        Raises:
            ModelLoadError: mlflow could not load the files (the cause is chained).
        """
        import mlflow.pyfunc

        extra = {"model_config": model_config} if model_config else {}
        try:
            # modeld runs its own dependency check (loader.deps); MLflow's would repeat it.
            return mlflow.pyfunc.load_model(str(self.path), suppress_warnings=True, **extra)
        except Exception as exc:
            raise ModelLoadError(
                f"mlflow.pyfunc.load_model failed for {str(self.path)!r}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc

    def input_example(self) -> dict[str, Any] | None:
        """The model's saved serving input example (``serving_input_example.json``), if any."""
        path = self.path / "serving_input_example.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def warm_up(model: Any, example: dict[str, Any] | None, label: str) -> bool:
    """Run one prediction on ``example`` (MLflow's request format: the model's saved serving
    input example or a configured payload) and check the answer is well formed.

    Returns whether a warm-up ran.

    Raises:
        ModelLoadError: the prediction raised or returned nothing usable.
    """
    if not example:
        return False
    # MLflow's own request parsing: a chat or agent model's example is a unified LLM request
    # (messages, prompt or input; params split out by the params schema), a type-hint model's
    # is {"inputs": ...}, the others a DataFrame or tensor form.
    from mlflow.pyfunc import scoring_server

    parse_json: Any = scoring_server._parse_json_data  # untyped in MLflow

    try:
        schema = model.metadata.get_input_schema()
        parsed = parse_json(example, model.metadata, schema)
        data, params = parsed.data, parsed.params
        result = model.predict(data) if params is None else model.predict(data, params=params)
    except Exception as exc:
        raise ModelLoadError(
            f"{label} warm-up prediction failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if result is None:
        raise ModelLoadError(f"{label} warm-up prediction returned None")
    if not _is_pyfunc_output(result):
        raise ModelLoadError(
            f"{label} warm-up prediction returned a {type(result).__name__}; a pyfunc model "
            "returns a DataFrame, Series, array, list, dict or string"
        )
    if hasattr(result, "__len__") and len(result) == 0:
        raise ModelLoadError(f"{label} warm-up prediction returned an empty result")
    return True


def _is_pyfunc_output(result: Any) -> bool:
    """MLflow's PyFuncOutput: pandas, numpy, scipy sparse, list, dict, str (or a number)."""
    if isinstance(result, list | tuple | dict | str | int | float):
        return True
    module = type(result).__module__.split(".")[0]
    return module in ("pandas", "numpy", "scipy", "pyarrow")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."
