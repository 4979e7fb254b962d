"""``modeld demo``: a local sqlite registry with a real iris model, served at once."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import threading
from pathlib import Path

from serving.config import Config, load_config

log = logging.getLogger(__name__)

MODEL_NAME = "iris"
REQUIREMENTS = ("mlflow", "scikit-learn", "numpy", "pandas", "scipy", "skops")


def build_registry(state_dir: Path) -> str:
    """Create (once) a registry with iris v1 (alias champion) and v2 (Production).

    Returns the tracking URI.
    """
    import mlflow.sklearn
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    state_dir.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{state_dir.resolve() / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if client.get_latest_versions(MODEL_NAME, ["Production"]):
            return uri
    except MlflowException:
        client.create_registered_model(MODEL_NAME, description="modeld demo: iris classifier")
    X, y = load_iris(return_X_y=True, as_frame=True)
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in REQUIREMENTS]
    for number, c in ((1, 0.05), (2, 1.0)):
        path = state_dir / "models" / f"iris-v{number}"
        if not path.exists():
            model = LogisticRegression(C=c, max_iter=500).fit(X, y)
            mlflow.sklearn.save_model(
                model, str(path), input_example=X.head(2), pip_requirements=pins
            )
        client.create_model_version(MODEL_NAME, source=str(path.resolve()))
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    client.transition_model_version_stage(MODEL_NAME, "2", "Production")
    return uri


def promote_new_version(
    state_dir: Path, uri: str, url: str, banner: str, *, delay_s: float = 5.0
) -> None:
    """Once every model is loaded, print ``banner`` (its curl line answers from then on), then
    register a new iris version and move it to Production, so the demo shows modeld following
    the registry and swapping without a restart."""
    import time
    import urllib.request

    import mlflow.sklearn
    from mlflow import MlflowClient
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:  # refused, or 503 while loading
            time.sleep(0.2)
    else:
        print("\nmodeld demo: the models did not load within 120 s; see the log above", flush=True)
        return
    print(banner, flush=True)
    time.sleep(delay_s)
    X, y = load_iris(return_X_y=True, as_frame=True)
    path = state_dir / "models" / f"iris-{int(time.time())}"
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in REQUIREMENTS]
    model = LogisticRegression(C=10.0, max_iter=1000).fit(X, y)
    mlflow.sklearn.save_model(model, str(path), input_example=X.head(2), pip_requirements=pins)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.create_model_version(MODEL_NAME, source=str(path.resolve()))
    client.transition_model_version_stage(MODEL_NAME, mv.version, "Production", True)
    print(
        f"\nmodeld demo: registered iris v{mv.version} and moved it to Production "
        f"(archiving the old one). Within a poll interval the server swaps to it without "
        f"dropping a request: see the X-Model-Version header of the curl above, or "
        f"curl -s {url}/models/iris\n",
        flush=True,
    )


def prepare(state_dir: str, *, host: str, port: int) -> tuple[Config, threading.Thread]:
    """Build the demo registry and return what to serve: the config, and the (unstarted)
    thread that prints the banner once the models are loaded, then promotes a new version."""
    import warnings

    # MLflow's deprecation notes about stages and schema hints are noise in a first-run demo.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    state = Path(state_dir)
    print(f"modeld demo: building a local MLflow registry in {state}/ ...", flush=True)
    uri = build_registry(state)
    config = load_config(
        overrides={
            "server.host": host,
            "server.port": port,
            "registry.tracking_uri": uri,
            "registry.registry_uri": uri,
            "cache.dir": str(state / "cache"),
            "registry.poll_interval_s": 2.0,
        },
        extra_models=[
            f"models:/{MODEL_NAME}/Production",
            f"champion=models:/{MODEL_NAME}@champion",
        ],
    )
    payload = json.dumps(
        {
            "dataframe_split": {
                "columns": [
                    "sepal length (cm)",
                    "sepal width (cm)",
                    "petal length (cm)",
                    "petal width (cm)",
                ],
                "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]],
            }
        }
    )
    banner = (
        f"\nmodeld demo serving models:/{MODEL_NAME}/Production on http://{host}:{port}\n"
        f"Try:\n  curl -si -X POST http://{host}:{port}/invocations "
        f"-H 'Content-Type: application/json' -d '{payload}'\n"
        f"  curl -s http://{host}:{port}/models\n"
        "Stop with Ctrl-C.\n"
    )
    url = f"http://{host}:{port}"
    promoter = threading.Thread(
        target=promote_new_version, args=(state, uri, url, banner), name="modeld-demo", daemon=True
    )
    return config, promoter
