"""``modeld`` command line: the parser, ``serve``, ``demo``, ``check-config`` and the operator
commands (:mod:`serving.cli.ops`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loader.deps import ENV_MANAGERS, POLICIES
from serving.cli.ops import add_commands, run_operation
from serving.cli.serve import bind, cannot_listen, keep_secrets_in, serve
from serving.config import (
    MLFLOW_TIMEOUT_ENV,
    MLFLOW_WORKERS_ENV,
    Config,
    ConfigProblems,
    load_config,
)

log = logging.getLogger("modeld")
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modeld", description="Keep MLflow models served, cached and fresh."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="serve models over HTTP (MLflow scoring protocol)",
        add_help=False,  # -h is --host, as in `mlflow models serve`
    )
    serve.add_argument("--help", action="help", help="show this help message and exit")
    _serve_options(serve)

    demo = sub.add_parser("demo", help="create a local registry with a model and serve it")
    demo.add_argument("--state-dir", default=".modeld-demo", help="where the demo keeps its files")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)

    check = sub.add_parser("check-config", help="validate a config file and exit (2 when bad)")
    check.add_argument("config", help="TOML config file")

    add_commands(sub)
    return parser


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        "--model-uri",
        dest="model",
        action="append",
        default=[],
        metavar="[NAME=]URI",
        help="model to serve (repeatable); NAME names the route, else the registered name",
    )
    parser.add_argument("--config", help="TOML config file (see config.example.toml)")
    parser.add_argument("-h", "--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("-p", "--port", type=int, help="port to bind (default 8080)")
    parser.add_argument(
        "--cache-dir", help="disk cache (default $MODELD_CACHE_DIR or ~/.cache/modeld)"
    )
    parser.add_argument(
        "--dependency-policy",
        choices=POLICIES,
        help="what to do when a model's requirements are not met: strict (refuse) | warn "
        "(default) | ignore | isolate (its own environment) | isolate_always",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between registry polls (default 10)",
    )
    parser.add_argument(
        "-w",
        "--workers",
        type=int,
        help="serving processes sharing the port and the cache (default 1)",
    )
    parser.add_argument(
        "-t",
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="a prediction taking longer gets 504 (default 60)",
    )
    parser.add_argument(
        "--env-manager",
        metavar="local|uv|virtualenv",
        help="as `mlflow models serve`: uv or virtualenv serve every version from its own "
        "environment, built with uv from the model's requirements (--dependency-policy "
        "isolate_always); local (the default here) serves in modeld's own environment and "
        "checks each model's dependencies against it; conda is refused with the reason",
    )
    parser.add_argument(
        "--no-conda", action="store_true", help="as `mlflow models serve`: --env-manager local"
    )
    parser.add_argument(
        "--install-mlflow",
        action="store_true",
        help="as `mlflow models serve` (accepted): modeld's environments always hold MLflow, "
        "the version the model's requirements name, else the one that logged it",
    )
    parser.add_argument(
        "--predict-threads",
        type=int,
        metavar="N",
        help="predict calls one model may run at once (default 1; more for models that wait "
        "on I/O)",
    )
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--unix-socket", metavar="PATH", help="listen on this Unix domain socket instead of TCP"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help="also serve the Open Inference Protocol over gRPC on this port (default: off)",
    )
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON")


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """The config a ``serve`` command line means: flags, then ``mlflow models serve``'s own
    variables where its flags would take them (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` for
    ``-t``, ``MLFLOW_MODELS_WORKERS`` for ``-w``, ``SERVING_MODEL_CONFIG``), then
    ``MODELD_*`` variables, then the TOML file.

    Raises:
        ConfigProblems: every problem found.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    timeout = (
        args.timeout if args.timeout is not None else _env_number(env, MLFLOW_TIMEOUT_ENV, problems)
    )
    workers = (
        args.workers if args.workers is not None else _env_number(env, MLFLOW_WORKERS_ENV, problems)
    )
    overrides: dict[str, Any] = {
        "server.host": args.host,
        "server.port": args.port,
        "server.log_level": args.log_level,
        "server.workers": int(workers) if workers is not None else None,
        "server.request_timeout_s": timeout,
        "server.predict_threads": args.predict_threads,
        "server.log_format": args.log_format,
        "server.ssl_certfile": args.ssl_certfile,
        "server.ssl_keyfile": args.ssl_keyfile,
        "server.unix_socket": args.unix_socket,
        "server.grpc_port": args.grpc_port,
        "cache.dir": args.cache_dir,
        "dependencies.policy": args.dependency_policy,
        "registry.poll_interval_s": args.poll_interval,
    }
    if args.no_conda and args.env_manager not in (None, "local"):
        problems.append(f"--no-conda contradicts --env-manager {args.env_manager}")
    elif args.env_manager in ("uv", "virtualenv"):
        if args.dependency_policy not in (None, "isolate", "isolate_always"):
            problems.append(
                f"--env-manager {args.env_manager} contradicts --dependency-policy "
                f"{args.dependency_policy}"
            )
        overrides["dependencies.policy"] = args.dependency_policy or ENV_MANAGERS["uv"]
    elif args.env_manager not in (None, "local"):
        problems.append(
            f"--env-manager {args.env_manager!r}: expected local, uv or virtualenv (modeld "
            "builds environments with uv from the model's pip requirements; conda is not "
            "supported: conda.yaml's pip section is used where a model has only that)"
        )
    if problems:
        raise ConfigProblems(problems)
    config = load_config(args.config, env=env, overrides=overrides, extra_models=args.model)
    if not config.models:
        raise ConfigProblems(["no model to serve: pass -m URI or add [[models]] to --config"])
    return config


def _env_number(env: Mapping[str, str], key: str, problems: list[str]) -> float | None:
    text = env.get(key)
    if text is None or not text.strip():
        return None
    try:
        return float(int(text))
    except ValueError:
        problems.append(f"{key} = {text[:40]!r}: expected a whole number")
        return None


def reloader(args: argparse.Namespace) -> Callable[[], Config]:
    """Re-read the config file with the same env and flags (for hot reload)."""
    return lambda: config_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    if given == ["serve", "-h"]:  # -h is the host there; alone, it can only mean help
        given = ["serve", "--help"]
    args = parser.parse_args(given)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command in ("pull", "resolve", "check", "cache", "env"):
        return run_operation(args)
    if args.command == "demo":
        from serving.cli.demo import prepare

        config, promoter = prepare(args.state_dir, host=args.host, port=args.port)
        promoter.start()
        return serve(config)
    try:
        config = config_from_args(args)
    except ConfigProblems as exc:
        print(f"modeld: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from serving.runtime.supervisor import is_worker, supervise

    if config.server.workers > 1 and not is_worker():
        from serving.logsetup import setup_logging

        setup_logging(config.server.log_level, config.server.log_format)
        try:  # one listening socket, inherited by every worker
            sock = bind(config.server.host, config.server.port)
        except OSError as exc:
            return cannot_listen(config.server.host, config.server.port, exc)
        keep_secrets_in(config)  # the supervisor read the tokens too
        import importlib

        from loader.api import share_stores

        return supervise(
            sock,
            config.server.workers,
            lambda: serve(config, reload=reloader(args)),
            drain_timeout_s=config.server.drain_timeout_s,
            load_timeout_s=config.server.load_timeout_s,
            # imported once, in the parent: the workers share its pages
            prepare=lambda: importlib.import_module("serving.app"),
            share=lambda: share_stores(config.source_options()),
        )
    return serve(config, reload=reloader(args))


def _check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigProblems as exc:
        print(f"modeld: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    models = ", ".join(f"{m.name}={m.uri}" for m in config.models) or "no models"
    print(f"{path}: ok ({models})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
