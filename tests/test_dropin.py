"""`mlflow models serve`'s flags, variables and model_config mean what they mean to MLflow."""

from __future__ import annotations

import json

import pytest

import loader
from serving.cli.main import build_parser, config_from_args
from serving.config import ConfigProblems, load_config
from tests.helpers import iris_frame, make_config, split_payload, start


def save_config_echo(path):
    """A pyfunc answering, per row, the value of its model_config's "answer" (saved with one:
    MLflow lets a load override only a model_config the model was saved with)."""
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.answer = (context.model_config or {}).get("answer", "none")

        def predict(self, context, model_input, params=None):
            return [self.answer] * len(model_input)

    mlflow.pyfunc.save_model(
        str(path), python_model=Echo(), pip_requirements=[], model_config={"answer": "saved"}
    )
    return path


def args(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_mlflow_serving_variables_are_flag_defaults_and_flags_win():
    env = {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "12", "MLFLOW_MODELS_WORKERS": "2"}
    config = config_from_args(args("-m", "models:/iris/1", "--no-conda"), env)
    assert (config.server.request_timeout_s, config.server.workers) == (12.0, 2)
    config = config_from_args(args("-m", "models:/iris/1", "-t", "5", "-w", "1"), env)
    assert (config.server.request_timeout_s, config.server.workers) == (5.0, 1)
    with pytest.raises(ConfigProblems) as info:
        config_from_args(args("-m", "models:/iris/1"), {"MLFLOW_MODELS_WORKERS": "two"})
    assert "MLFLOW_MODELS_WORKERS = 'two': expected a whole number" in str(info.value)


def test_install_mlflow_is_accepted_and_other_env_managers_say_why():
    config_from_args(args("-m", "models:/iris/1", "--install-mlflow", "--env-manager", "local"), {})
    with pytest.raises(ConfigProblems) as info:
        config_from_args(args("-m", "models:/iris/1", "--env-manager", "uv"), {})
    assert "--env-manager 'uv'" in str(info.value) and "Pass local" in str(info.value)


def test_serving_model_config_reaches_the_command_line_models():
    env = {"SERVING_MODEL_CONFIG": json.dumps({"answer": "from-env"})}
    config = config_from_args(args("-m", "models:/iris/1"), env)
    assert config.models[0].model_config == {"answer": "from-env"}
    for bad in ("{", "[1, 2]"):
        with pytest.raises(ConfigProblems) as info:
            config_from_args(args("-m", "models:/iris/1"), {"SERVING_MODEL_CONFIG": bad})
        assert "SERVING_MODEL_CONFIG" in str(info.value)


def test_model_config_per_model_in_the_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[models]]\nname = "e"\nuri = "models:/echo/1"\nmodel_config = { answer = "toml" }\n'
    )
    assert load_config(path, env={}).models[0].model_config == {"answer": "toml"}
    path.write_text('[[models]]\nuri = "models:/echo/1"\nmodel_config = "nope"\n')
    with pytest.raises(ConfigProblems) as info:
        load_config(path, env={})
    assert "model_config = 'nope': expected dict" in str(info.value)


async def test_model_config_is_what_the_model_loads_with(
    aiohttp_client, registry, cache_dir, tmp_path
):
    echo = save_config_echo(tmp_path / "echo")
    config = make_config(registry, cache_dir, f"e={echo}")
    from dataclasses import replace

    model = replace(config.models[0], model_config={"answer": "configured"}, warmup=False)
    client = await start(aiohttp_client, replace(config, models=(model,)))
    resp = await client.post("/invocations", json=split_payload(iris_frame(2)))
    assert (await resp.json()) == {"predictions": ["configured", "configured"]}
    plain = loader.load_model(str(echo), cache_dir=cache_dir)
    configured = loader.load_model(str(echo), cache_dir=cache_dir, model_config={"answer": "x"})
    assert list(plain.predict(iris_frame(1))) == ["saved"]
    assert list(configured.predict(iris_frame(1))) == ["x"]


def test_a_changed_model_config_reloads_the_same_files(cache_dir, tmp_path):
    from loader import ModelManager, make_source
    from loader.manager import RouteSpec

    echo = save_config_echo(tmp_path / "echo")
    manager = ModelManager(make_source(cache_dir=cache_dir))
    try:
        manager.set_routes([RouteSpec("e", str(echo), warmup=False, model_config={"answer": "a"})])
        manager.refresh()
        assert list(manager.get("e").predict(iris_frame(1))) == ["a"]
        assert manager.set_routes(
            [RouteSpec("e", str(echo), warmup=False, model_config={"answer": "b"})]
        ) == ["e"]
        manager.refresh(["e"])
        assert list(manager.get("e").predict(iris_frame(1))) == ["b"]
        assert manager.status("e").swaps == 2
    finally:
        manager.close()
