"""Resolution against a real sqlite registry, and over HTTP against a real mlflow server."""

import time

import mlflow.pyfunc
import pytest
from mlflow import MlflowClient

from loader import ModelNotFound, Registry, RegistryUnavailable, parse_uri
from serving.config import bound_mlflow_http_retries as bound_http_retries
from tests.helpers import iris_frame, register

PARITY_URIS = [
    "models:/iris/1",
    "models:/iris/3",
    "models:/iris/latest",
    "models:/iris/Production",
    "models:/iris/production",
    "models:/iris/STAGING",
    "models:/iris@champion",
]


@pytest.fixture(scope="module")
def reg(registry):
    return Registry(registry.client())


@pytest.mark.parametrize("uri", PARITY_URIS)
def test_resolution_matches_mlflow(reg, uri):
    ours = reg.resolve(parse_uri(uri))
    theirs = int(mlflow.pyfunc.load_model(uri).predict(iris_frame(1))[0])
    # const-k models answer k for every row, so MLflow's prediction names its version.
    assert ours.version == theirs
    assert ours.status == "READY"


def test_resolved_fields(reg):
    v = reg.resolve(parse_uri("models:/iris@champion"))
    assert (v.name, v.version, v.stage, v.aliases) == ("iris", 1, "Staging", ("champion",))
    assert v.source and v.last_updated_ms
    assert v.label == "iris@1"


def test_two_versions_in_one_stage_resolve_to_the_higher(registry, reg):
    client = registry.client()
    for k in (1, 2, 3):
        register(client, "two-in-stage", registry.models[f"const{k}"], stage="Production")
    assert reg.resolve(parse_uri("models:/two-in-stage/Production")).version == 3
    client.transition_model_version_stage("two-in-stage", 3, "Archived")
    assert reg.resolve(parse_uri("models:/two-in-stage/Production")).version == 2
    assert reg.resolve(parse_uri("models:/two-in-stage/archived")).version == 3


def test_alias_moved_and_version_deleted(registry, reg):
    client = registry.client()
    for k in (1, 2):
        register(client, "moving", registry.models[f"const{k}"])
    client.set_registered_model_alias("moving", "live", "1")
    ref = parse_uri("models:/moving@live")
    assert reg.resolve(ref).version == 1
    client.set_registered_model_alias("moving", "live", "2")
    assert reg.resolve(ref).version == 2
    assert reg.resolve(parse_uri("models:/moving/latest")).version == 2
    client.delete_model_version("moving", "2")
    assert reg.resolve(parse_uri("models:/moving/latest")).version == 1
    # deleting the version deleted its alias (MLflow before 3.1 leaves the alias pointing at
    # the deleted version: then that version is what is missing)
    with pytest.raises(ModelNotFound, match="live|no version 2"):
        reg.resolve(ref)
    with pytest.raises(ModelNotFound):
        reg.resolve(parse_uri("models:/moving/2"))


def test_non_ready_versions_are_skipped(reg):
    assert reg.resolve(parse_uri("models:/pending/latest")).version == 1
    with pytest.raises(ModelNotFound, match="READY"):
        reg.resolve(parse_uri("models:/pending/2"))


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("models:/no-such-model/1", "no-such-model"),
        ("models:/iris/99", "iris"),
        ("models:/iris@nobody", "nobody"),
        ("models:/iris/Archived", "Archived"),
    ],
)
def test_not_found_names_what_was_asked(reg, uri, needle):
    with pytest.raises(ModelNotFound) as info:
        reg.resolve(parse_uri(uri))
    assert needle in str(info.value)


def test_resolve_many_reports_per_ref(reg):
    refs = [parse_uri("models:/iris/latest"), parse_uri("models:/nope/latest")]
    out = reg.resolve_many(refs)
    assert out[refs[0]].version == 3
    assert isinstance(out[refs[1]], ModelNotFound)


@pytest.mark.slow
def test_resolve_many_twenty_models_is_one_http_request(registry, mlflow_server):
    client = registry.client()
    for i in range(20):
        register(client, f"fleet-{i:02d}", registry.models["const1"], stage="Production")
        client.set_registered_model_alias(f"fleet-{i:02d}", "live", "1")
    bound_http_retries()
    remote = Registry(MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url))
    refs = [parse_uri(f"models:/fleet-{i:02d}/Production") for i in range(10)]
    refs += [parse_uri(f"models:/fleet-{i:02d}@live") for i in range(10, 20)]
    before = len(mlflow_server.api_requests())
    out = remote.resolve_many(refs)
    time.sleep(0.3)  # let the access log flush
    made = mlflow_server.api_requests()[before:]
    assert all(v.version == 1 for v in out.values()), out
    assert "registered-models/search" in made[0]
    if '" 400 ' in made[0]:  # an MLflow server without IN (before 2.2x): one call per model
        assert len(made) == 21 and remote.resolve_many(refs) and not remote._batch_filter_ok
        return
    assert len(made) == 1, made


@pytest.mark.slow
def test_unreachable_registry_is_quick_and_typed():
    bound_http_retries()
    dead = Registry(
        MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    )
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as info:
        dead.resolve(parse_uri("models:/iris/latest"))
    assert time.monotonic() - started < 15
    assert "127.0.0.1:9" in str(info.value)


def test_backend_refusing_in_filter_falls_back_to_per_model_calls(registry, caplog, monkeypatch):
    """(tests/test_azure.py meets a workspace that refuses it through the real plugin.)"""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    client = MlflowClient(tracking_uri=registry.uri, registry_uri=registry.uri)
    store = client._get_registry_client().store
    search = store.search_registered_models

    class NoInFilter:
        """A registry backend that refuses `name IN (...)` (as some hosted ones do)."""

        refused = 0

        @staticmethod
        def search_registered_models(filter_string=None, *args, **kwargs):
            if filter_string and " IN (" in filter_string:
                NoInFilter.refused += 1
                raise MlflowException("IN is not supported", error_code=INVALID_PARAMETER_VALUE)
            return search(filter_string, *args, **kwargs)

    # (MLflow caches the sqlite store per URI: monkeypatch puts it back after the test)
    monkeypatch.setattr(store, "search_registered_models", NoInFilter.search_registered_models)
    reg = Registry(client)
    refs = [
        parse_uri(u)
        for u in (
            "models:/iris/Production",
            "models:/iris@champion",
            "models:/bad-deps/latest",
            "models:/nope/latest",
        )
    ]
    for _ in range(2):
        out = reg.resolve_many(refs)
        assert [getattr(out[r], "version", None) for r in refs[:3]] == [2, 1, 1]
        assert isinstance(out[refs[3]], ModelNotFound)
    assert NoInFilter.refused == 1  # remembered: the batch is not retried every poll
    assert "polling per model" in caplog.text


def test_deleted_fixed_version_is_reported_without_a_call_per_poll(registry):
    """A fixed version that is not among the model's latest costs no call while the model is
    unchanged; once a version is deleted (which touches the registered model) it is fetched
    again, and its deletion is reported instead of being served as if it still existed."""

    class Counting(MlflowClient):
        gets = 0

        def get_model_version(self, name, version):
            Counting.gets += 1
            return super().get_model_version(name, version)

    client = registry.client()
    for k in (1, 2, 3):
        register(client, "doomed", registry.models[f"const{k}"])
    reg = Registry(Counting(tracking_uri=registry.uri, registry_uri=registry.uri))
    ref = parse_uri("models:/doomed/1")  # version 3 is the latest: 1 is not in the batch answer
    first = reg.resolve_many([ref])[ref]
    assert first.version == 1 and Counting.gets == 1
    for _ in range(3):
        assert reg.resolve_many([ref], known={ref: first})[ref].version == 1
    assert Counting.gets == 1  # unchanged model: the remembered answer stands

    client.delete_model_version("doomed", "1")
    gone = reg.resolve_many([ref], known={ref: first})[ref]
    assert isinstance(gone, ModelNotFound) and "doomed" in str(gone)
    assert Counting.gets == 2
