import pytest

from loader import InvalidModelURI, RefKind, parse_uri


@pytest.mark.parametrize(
    ("uri", "kind", "fields"),
    [
        ("models:/iris/3", RefKind.VERSION, {"name": "iris", "version": 3}),
        ("models:/iris/latest", RefKind.LATEST, {"name": "iris"}),
        ("models:/iris/LATEST", RefKind.LATEST, {"name": "iris"}),
        ("models:/iris/production", RefKind.STAGE, {"name": "iris", "stage": "Production"}),
        ("models:/iris/STAGING", RefKind.STAGE, {"name": "iris", "stage": "Staging"}),
        ("models:/iris/None", RefKind.STAGE, {"name": "iris", "stage": "None"}),
        ("models:/iris/archived", RefKind.STAGE, {"name": "iris", "stage": "Archived"}),
        ("models:/iris@champion", RefKind.ALIAS, {"name": "iris", "alias": "champion"}),
        ("models:/my model@v-1", RefKind.ALIAS, {"name": "my model", "alias": "v-1"}),
        # MLflow 3: a logged model by id, as log_model returns it (and any single name, as
        # MLflow's own parser reads it)
        ("models:/m-0123abcd", RefKind.MODEL_ID, {"model_id": "m-0123abcd", "name": None}),
        ("models:/iris", RefKind.MODEL_ID, {"model_id": "iris"}),
        # an artifact store: served through MLflow's own repository for the scheme
        ("s3://bucket/models/iris", RefKind.ARTIFACT, {"path": "/models/iris"}),
        ("mlflow-artifacts:/shared/iris", RefKind.ARTIFACT, {"path": "/shared/iris"}),
        ("wasbs://c@acct.blob.core.windows.net/m", RefKind.ARTIFACT, {"path": "/m"}),
        ("runs:/abc123/model", RefKind.RUN, {"run_id": "abc123", "path": "model"}),
        ("runs:/abc123/sub/model/", RefKind.RUN, {"run_id": "abc123", "path": "sub/model"}),
        ("file:///srv/models/iris", RefKind.PATH, {"path": "/srv/models/iris"}),
        ("/srv/models/iris", RefKind.PATH, {"path": "/srv/models/iris"}),
    ],
)
def test_accepted_forms(uri, kind, fields):
    ref = parse_uri(uri)
    assert ref.kind is kind
    assert ref.uri == uri
    for key, value in fields.items():
        assert getattr(ref, key) == value


def test_movable_and_registry_flags():
    assert parse_uri("models:/a/latest").is_movable
    assert parse_uri("models:/a@x").is_movable
    assert parse_uri("models:/a/Staging").is_movable
    assert not parse_uri("models:/a/1").is_movable
    assert parse_uri("models:/a/1").is_registry
    assert not parse_uri("runs:/abc/m").is_registry
    assert parse_uri("models:/m-1").is_remote and not parse_uri("models:/m-1").is_registry
    assert not parse_uri("models:/m-1").is_movable


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "   ",
        "models:/",
        "models:",
        "models://iris/1",
        "models:/..",
        "models:/iris/",
        "models:/iris/1/extra",
        "models:/iris/Prod",
        "models:/iris/0",
        "models:/..@x",
        "models:/../1",
        "models:/./latest",
        "models:/iris@",
        "models:/@alias",
        "models:/a@b@c",
        "models:/iris/1?x=1",
        "models:/ir\x00is/1",
        "models:/iris/1 ",
        "runs:/",
        "runs:/abc",
        "runs:/abc/",
        "runs:/abc/../etc",
        "runs:/ab-c/model",
        "file://host/path",
        "file:relative",
        "s3:///model",
        "x" * 5000,
        None,
        42,
    ],
)
def test_malformed_uris_quote_value_and_list_forms(uri):
    with pytest.raises(InvalidModelURI) as info:
        parse_uri(uri)
    message = str(info.value)
    assert repr(uri)[:50] in message
    for form in ("models:/NAME/VERSION", "models:/NAME@ALIAS", "runs:/RUN_ID/PATH"):
        assert form in message
