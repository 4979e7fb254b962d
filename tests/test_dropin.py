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


def test_env_managers_mean_what_they_mean_to_mlflow_and_conda_says_why():
    local = config_from_args(
        args("-m", "models:/iris/1", "--install-mlflow", "--env-manager", "local"), {}
    )
    assert local.dependencies.policy == "warn"
    for manager in ("uv", "virtualenv"):  # every version in its own environment, as MLflow
        built = config_from_args(args("-m", "models:/iris/1", "--env-manager", manager), {})
        assert built.dependencies.policy == "isolate_always"
    only_mismatches = config_from_args(
        args("-m", "models:/iris/1", "--env-manager", "uv", "--dependency-policy", "isolate"), {}
    )
    assert only_mismatches.dependencies.policy == "isolate"
    with pytest.raises(ConfigProblems) as info:
        config_from_args(args("-m", "models:/iris/1", "--env-manager", "conda"), {})
    assert "--env-manager 'conda'" in str(info.value) and "conda is not supported" in str(
        info.value
    )
    with pytest.raises(ConfigProblems) as info:
        config_from_args(
            args("-m", "models:/iris/1", "--env-manager", "uv", "--dependency-policy", "strict"),
            {},
        )
    assert "contradicts --dependency-policy strict" in str(info.value)


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


def mlflow_answer(model, body: dict):
    """What `mlflow models serve` answers: MLflow's own scoring function, in process."""
    from mlflow.pyfunc.scoring_server import invocations

    answer = invocations(json.dumps(body), "application/json", model, None)
    return answer.status, json.loads(answer.response)


def save_params_echo(path):
    """Answers, for a unified LLM request, the params it was given and the keys of its input."""
    import mlflow.pyfunc

    class ParamsEcho(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            keys = sorted(model_input) if isinstance(model_input, dict) else None
            return {"params": params, "keys": keys}

    mlflow.pyfunc.save_model(str(path), python_model=ParamsEcho(), pip_requirements=[])
    return path


def save_chat_model(path):
    import mlflow.pyfunc
    from mlflow.types.llm import ChatCompletionResponse, ChatMessage

    class Parrot(mlflow.pyfunc.ChatModel):
        def predict(self, context, messages, params):
            last = messages[-1].content
            reply = ChatMessage(role="assistant", content=f"{last}! (max {params.max_tokens})")
            return ChatCompletionResponse(
                choices=[{"index": 0, "message": reply.to_dict(), "finish_reason": "stop"}],
                model="parrot",
            )

    mlflow.pyfunc.save_model(str(path), python_model=Parrot(), pip_requirements=[])
    return path


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "once upon", "temperature": 0.5},
        {"input": ["a", "b"]},
    ],
)
async def test_unified_llm_bodies_answer_as_mlflow_does(
    aiohttp_client, registry, cache_dir, tmp_path, body
):
    echo = save_params_echo(tmp_path / "echo")
    client = await start(aiohttp_client, make_config(registry, cache_dir, f"llm={echo}"))
    resp = await client.post("/invocations", json=body)
    ours = (resp.status, await resp.json())
    assert ours == mlflow_answer(loader.load_model(str(echo), cache_dir=cache_dir), body)
    assert ours[1]["params"] == {}  # {} when there are none, not None


async def test_a_chat_model_answers_as_mlflow_does(aiohttp_client, registry, cache_dir, tmp_path):
    chat = save_chat_model(tmp_path / "chat")
    config = make_config(registry, cache_dir, f"chat={chat}")
    client = await start(aiohttp_client, config)
    model = loader.load_model(str(chat), cache_dir=cache_dir)
    for body in (
        {"messages": [{"role": "user", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 7},
    ):
        for path in ("/invocations", "/models/chat/invocations"):
            resp = await client.post(path, json=body)
            ours = (resp.status, await resp.json())
            theirs = mlflow_answer(model, body)
            for answer in (ours, theirs):  # ids and times differ per call
                answer[1].pop("id", None)
                answer[1].pop("created", None)
            assert ours == theirs, path
            assert ours[1]["choices"][0]["message"]["content"].startswith("hello!")


def save_odd_outputs(path):
    import mlflow.pyfunc

    class Odd(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            if float(model_input.iloc[0, 0]) < 0:
                raise ValueError("negative input")
            return {1: "one", 2.5: "two and a half"}

    mlflow.pyfunc.save_model(str(path), python_model=Odd(), pip_requirements=[])
    return path


async def test_non_string_keys_and_stack_traces(aiohttp_client, registry, cache_dir, tmp_path):
    """A dict output with non-string keys was a 500 (orjson); stack_trace is sent only when
    server.stack_traces is on."""
    odd = save_odd_outputs(tmp_path / "odd")
    for traces in (False, True):
        config = make_config(registry, cache_dir, f"odd={odd}", server__stack_traces=traces)
        client = await start(aiohttp_client, config)
        one = {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}}
        minus_one = {"dataframe_split": {"columns": ["x"], "data": [[-1.0]]}}
        resp = await client.post("/invocations", json=one)
        assert resp.status == 200 and (await resp.json()) == {
            "predictions": {"1": "one", "2.5": "two and a half"}
        }
        bad = await client.post("/invocations", json=minus_one)
        assert bad.status == 400
        body = await bad.json()
        assert ("stack_trace" in body) is traces
        if traces:
            assert "ValueError: negative input" in body["stack_trace"]
        await client.close()


def save_chat_agent(path):
    import mlflow.pyfunc
    from mlflow.types.agent import ChatAgentMessage, ChatAgentResponse

    class EchoAgent(mlflow.pyfunc.ChatAgent):
        def predict(self, messages, context=None, custom_inputs=None):
            reply = ChatAgentMessage(
                role="assistant", content=f"echo: {messages[-1].content}", id="1"
            )
            return ChatAgentResponse(messages=[reply], custom_outputs=custom_inputs)

    mlflow.pyfunc.save_model(str(path), python_model=EchoAgent(), pip_requirements=[])
    return path


def save_responses_agent(path):
    import mlflow.pyfunc
    from mlflow.types.responses import ResponsesAgentResponse

    class EchoResponses(mlflow.pyfunc.ResponsesAgent):
        def predict(self, request):
            text = request.input[-1].content
            item = self.create_text_output_item(text=f"echo: {text}", id="1")
            return ResponsesAgentResponse(output=[item])

    mlflow.pyfunc.save_model(str(path), python_model=EchoResponses(), pip_requirements=[])
    return path


@pytest.mark.parametrize(
    ("save", "body"),
    [
        (save_chat_agent, {"messages": [{"role": "user", "content": "hi"}]}),
        (
            save_chat_agent,
            {"messages": [{"role": "user", "content": "hi"}], "custom_inputs": {"k": 1}},
        ),
        (save_responses_agent, {"input": [{"role": "user", "content": "hi"}]}),
    ],
)
async def test_agents_answer_as_mlflow_does(
    aiohttp_client, registry, cache_dir, tmp_path, save, body
):
    path = save(tmp_path / "agent")
    client = await start(aiohttp_client, make_config(registry, cache_dir, f"agent={path}"))
    model = loader.load_model(str(path), cache_dir=cache_dir)
    for route in ("/invocations", "/models/agent/invocations"):
        resp = await client.post(route, json=body)
        assert (resp.status, await resp.json()) == mlflow_answer(model, body), route


def mlflow_error(model, body: bytes) -> str:
    """The message `mlflow models serve` answers for a bad body (its own scoring function)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations

    try:
        answer = invocations(body, "application/json", model, model.metadata.get_input_schema())
    except MlflowException as exc:
        return exc.message
    return answer.response


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"dataframe_split": ', "Ensure that input is a valid JSON formatted string"),
        (b"[1, 2]", "The input must be a JSON dictionary with exactly one of the input fields"),
        (
            b'{"inputs": [[1, 2, 3, 4]], "instances": [[1, 2, 3, 4]]}',
            "The input must be a JSON dictionary with exactly one of the input fields",
        ),
        (
            b'{"dataframe_split": {"columns": ["sepal length (cm)"], "data": [[99.5]]}}',
            "Model is missing inputs",
        ),
    ],
)
async def test_error_wording_is_mlflows_without_the_callers_data(
    aiohttp_client, registry, cache_dir, body, words
):
    client = await start(aiohttp_client, make_config(registry, cache_dir, "models:/iris/2"))
    resp = await client.post(
        "/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400
    ours = (await resp.json())["message"]
    model = loader.load_model(str(registry.models["const2"]), cache_dir=cache_dir)
    assert words in ours and words in mlflow_error(model, body), ours
    assert "99.5" not in ours


def save_type_hint_models(root):
    """Pyfuncs whose signature comes from Python type hints, as MLflow 3 infers them."""
    import mlflow.pyfunc

    class Upper(mlflow.pyfunc.PythonModel):
        def predict(self, model_input: list[str], params=None) -> list[str]:
            return [s.upper() for s in model_input]

    class Totals(mlflow.pyfunc.PythonModel):
        def predict(self, model_input: list[dict[str, int]], params=None) -> list[int]:
            return [sum(row.values()) * 2 for row in model_input]

    paths = {}
    for name, model, example in (
        ("upper", Upper(), ["a", "b"]),
        ("totals", Totals(), [{"x": 1, "y": 2}]),
    ):
        path = root / name
        mlflow.pyfunc.save_model(
            str(path), python_model=model, pip_requirements=[], input_example=example
        )
        paths[name] = path
    return paths


async def test_type_hint_models_answer_as_mlflow_does(
    aiohttp_client, registry, cache_dir, tmp_path
):
    paths = save_type_hint_models(tmp_path)
    config = make_config(registry, cache_dir, *(f"{n}={p}" for n, p in paths.items()))
    client = await start(aiohttp_client, config)
    cases = [
        ("upper", {"inputs": ["hello", "world"]}),
        ("totals", {"inputs": [{"a": 3, "b": 4}, {"c": 5}]}),
        ("upper", {"inputs": [1, 2]}),  # not strings: refused the same way
        ("upper", {"dataframe_split": {"columns": ["a"], "data": [["x"]]}}),  # needs inputs
    ]
    for name, body in cases:
        model = loader.load_model(str(paths[name]), cache_dir=cache_dir)
        resp = await client.post(f"/models/{name}/invocations", json=body)
        ours = await resp.json()
        try:
            status, theirs = mlflow_answer(model, body)
        except Exception as exc:  # MLflow raises its errors: the server turns them into 400s
            status, theirs = 400, {"message": str(getattr(exc, "message", exc))}
        assert resp.status == status, (name, body, ours, theirs)
        if status == 200:
            assert ours == theirs, (name, body)
        else:  # the same sentence, without the data MLflow quotes
            mine, their = ours["message"], theirs["message"]
            assert (
                mine.split("'")[0].split(".")[0].strip()
                == their.split("'")[0].split(".")[0].strip()
            ), mine
            if "Error:" in their:
                assert their.split("Error:")[1].split(",")[0] in mine, (mine, their)
            assert "Expected type str, but got int" not in mine
