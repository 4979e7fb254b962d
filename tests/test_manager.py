"""The manager owns its decisions: set_routes (a config reload in one call), pin(verify=True)
under its lock, and typed status snapshots. Against the real session registry."""

from __future__ import annotations

import pytest

from loader import ConfigError, InvalidModelURI, ModelManager, ModelNotFound, make_source
from loader.manager import ManagerStatus, RouteSpec, RouteStatus


@pytest.fixture
def manager(registry, cache_dir):
    source = make_source(cache_dir=cache_dir, tracking_uri=registry.uri, registry_uri=registry.uri)
    manager = ModelManager(source)
    yield manager
    manager.close()


def test_set_routes_adds_changes_and_removes_in_one_call(manager):
    assert manager.set_routes([RouteSpec("a", "models:/iris/1"), RouteSpec("b", "models:/iris/2")])
    manager.refresh()
    assert {s.name: s.version.version for s in manager.status().models} == {"a": 1, "b": 2}
    changed = manager.set_routes(
        [RouteSpec("b", "models:/iris/3"), RouteSpec("c", "models:/iris@champion")]
    )
    assert changed == ["b", "c"]
    assert manager.names() == ["b", "c"]
    assert manager.status("b").version.version == 2  # the old version serves until refreshed
    manager.refresh(changed)
    assert manager.status("b").version.version == 3
    assert manager.set_routes(manager_specs(manager)) == []  # the same specs change nothing


def manager_specs(manager):
    return [RouteSpec(s.name, s.ref) for s in manager.status().models]


@pytest.mark.parametrize(
    ("specs", "error"),
    [
        ([RouteSpec("a", "models:/iris/Prod")], InvalidModelURI),
        ([RouteSpec("a", "models:/iris/1", swap="fast")], ConfigError),  # type: ignore[arg-type]
        ([RouteSpec("a", "models:/iris/1"), RouteSpec("a", "models:/iris/2")], ConfigError),
    ],
)
def test_a_bad_spec_changes_nothing(manager, specs, error):
    manager.set_routes([RouteSpec("keep", "models:/iris/1")])
    with pytest.raises(error):
        manager.set_routes([RouteSpec("new", "models:/iris/2"), *specs])
    assert manager.names() == ["keep"]


def test_pin_verify_serves_the_version_or_restores_the_pin(manager):
    manager.set_routes([RouteSpec("p", "models:/iris/latest")])
    manager.refresh()
    assert manager.status("p").version.version == 3
    status = manager.pin("p", 1, verify=True)
    assert isinstance(status, RouteStatus) and status.version.version == 1 and status.pinned == 1
    with pytest.raises(ModelNotFound) as info:
        manager.pin("p", 99, verify=True)
    assert "version 99" in str(info.value)
    assert manager.status("p").pinned == 1 and manager.status("p").version.version == 1
    for bad in (0, -1, True, "2", None):
        with pytest.raises(ConfigError) as info:
            manager.pin("p", bad)  # type: ignore[arg-type]
        assert repr(bad) in str(info.value)
    manager.unpin("p")
    manager.refresh()
    assert manager.status("p").version.version == 3


def test_status_is_a_typed_snapshot_with_its_json_form(manager):
    manager.set_routes([RouteSpec("s", "models:/iris/Production")])
    manager.refresh()
    status = manager.status()
    assert isinstance(status, ManagerStatus) and status.ready and status.registry.reachable
    (route,) = status.models
    data = route.to_dict()
    assert data["version"] == route.version.version == 2 and data["stage"] == "Production"
    assert data["dependency_report"] == route.dependency_report.to_dict()
    assert status.to_dict()["models"] == [data]
