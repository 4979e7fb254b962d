"""Operator commands: ``modeld pull | resolve | check | cache ls|verify|gc | env ls|gc``.

For init containers and image baking (``pull`` fills the cache), and for people at a terminal.
Exit codes: 0 done, 1 the operation failed (or ``check`` found what strict would refuse),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from loader.cache import SNAPSHOT_FILE
from loader.deps import ENV_MANAGERS, POLICIES
from loader.errors import LoaderError

PROGRESS_MIN_BYTES = 5 * 1024 * 1024


def add_commands(sub: Any) -> None:
    pull = sub.add_parser("pull", help="download models into the cache (init containers)")
    pull.add_argument("uris", nargs="+", metavar="URI")
    pull.add_argument(
        "--no-load",
        action="store_true",
        help="only download (by default each version is also loaded once: proof that it loads "
        "here, and the load snapshot a later start loads from)",
    )
    _common(pull)
    resolve = sub.add_parser("resolve", help="print which version a ref names now")
    resolve.add_argument("uri", metavar="URI")
    _common(resolve)
    check = sub.add_parser("check", help="dependency report; exit 1 when strict would refuse")
    check.add_argument("uri", metavar="URI")
    _common(check)
    cache = sub.add_parser("cache", help="inspect or tidy the disk cache")
    cache.add_argument("action", choices=("ls", "verify", "gc"))
    cache.add_argument("--max-bytes", type=int, help="gc: evict down to this size")
    cache.add_argument(
        "--keep-versions", type=int, help="gc: keep this many versions of each model"
    )
    _common(cache)
    env = sub.add_parser("env", help="list or remove isolated environments")
    env.add_argument("action", choices=("ls", "gc"))
    env.add_argument(
        "--max-bytes",
        type=int,
        help="gc: remove unused environments, least recently used first, down to this size "
        "(default: every unused one)",
    )
    _common(env)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config: registry, cache and dependency settings")
    parser.add_argument(
        "--cache-dir", help="disk cache (default $MODELD_CACHE_DIR or ~/.cache/modeld)"
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--registry-uri", help="MLflow registry URI (default: the tracking URI)")
    parser.add_argument("--dependency-policy", choices=POLICIES)
    parser.add_argument(
        "--env-manager",
        choices=sorted(ENV_MANAGERS),
        help="uv | virtualenv: every version in its own environment (pull builds them)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def run_operation(args: argparse.Namespace) -> int:
    from serving.config import ConfigProblems, load_config

    try:
        config = load_config(
            args.config,
            overrides={
                "cache.dir": args.cache_dir,
                "registry.tracking_uri": args.tracking_uri,
                "registry.registry_uri": args.registry_uri,
                "dependencies.policy": (
                    ENV_MANAGERS[args.env_manager] if args.env_manager else args.dependency_policy
                ),
            },
        )
    except ConfigProblems as exc:
        print(f"modeld: {exc}", file=sys.stderr)
        return 2
    if args.command in ("cache", "env"):  # the disk alone: no MLflow to import (seconds)
        from loader.api import make_cache, make_envs

        try:
            if args.command == "cache":
                return _cache(make_cache(config.source_options()), args)
            return _env(make_envs(config.source_options()), args)
        except LoaderError as exc:
            print(f"modeld {args.command}: {exc}", file=sys.stderr)
            return 1
    from loader.api import make_source
    from serving.config import bound_mlflow_http_retries

    problem = _no_registry(config, args)
    if problem:
        print(f"modeld {args.command}: {problem}", file=sys.stderr)
        return 2
    bound_mlflow_http_retries()
    try:
        source = make_source(config.source_options())
        command = {"pull": _pull, "resolve": _resolve, "check": _check}
        return command[args.command](source, args)
    except LoaderError as exc:
        print(f"modeld {args.command}: {exc}", file=sys.stderr)
        return 1


def _no_registry(config: Any, args: argparse.Namespace) -> str | None:
    """Why a registry ref cannot be resolved here: no registry is configured anywhere (MLflow
    would quietly create ./mlflow.db and report the model missing from that empty registry)."""
    uris = getattr(args, "uris", None) or [getattr(args, "uri", "")]
    needs_registry = any(u.startswith(("models:", "runs:")) for u in uris if u)
    if not needs_registry or config.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (
        "no registry to ask: pass --tracking-uri URI, set MLFLOW_TRACKING_URI, or set "
        "[registry] tracking_uri in --config"
    )


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(orjson.dumps(data, default=str, option=orjson.OPT_INDENT_2).decode())
    else:
        print(text)


def _pull(source: Any, args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:  # what one pull fetched, cache.keep_versions spares
        return _pull_each(source, args, held)


def _pull_each(source: Any, args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from loader.uri import parse_uri

    failed = 0
    for uri in args.uris:
        try:
            version = source.resolve(parse_uri(uri)).version
            with _Progress(source.cache.root / "tmp", version.label):
                prepared = source.prepare(version)
            if prepared.cache_key is not None:
                held.enter_context(source.cache.lease(prepared.cache_key))
            env = source.environment(prepared)  # built now, not at the first start
            started = time.perf_counter()
            if not args.no_load:
                model = source.load(prepared, uri=uri, env=env)
                close = getattr(model, "close", None)
                if env is not None and close is not None:
                    close()  # its worker proved the load; the environment stays
            load_s = time.perf_counter() - started
            source.remember(parse_uri(uri), version)  # a sidecar starting offline serves it
        except LoaderError as exc:
            print(f"modeld pull: {uri}: {exc}", file=sys.stderr)
            failed += 1
            continue
        size = sum(
            p.stat().st_size
            for p in prepared.path.rglob("*")
            if p.is_file() and p.name != SNAPSHOT_FILE
        )
        how = "downloaded" if prepared.downloaded else "already cached"
        if env is not None:
            how += f", environment {env.key} (Python {env.python})"
        if not args.no_load:
            how += f", loads in {load_s:.2f}s"
        _print(
            args,
            {
                "uri": uri,
                "version": version.to_dict(),
                "path": str(prepared.path),
                "bytes": size,
                "downloaded": prepared.downloaded,
                "load_s": None if args.no_load else round(load_s, 3),
                "dependency_report": prepared.report.to_dict(),
                "environment": env.to_dict() if env is not None else None,
            },
            f"{uri} -> {version.label} {how} ({size} bytes) at {prepared.path}",
        )
        for mismatch in prepared.report.mismatches:
            print(f"  warning: {mismatch}", file=sys.stderr)
    return 1 if failed else 0


def _resolve(source: Any, args: argparse.Namespace) -> int:
    from loader.uri import parse_uri

    resolution = source.resolve(parse_uri(args.uri))
    v = resolution.version
    stale = " (stale: registry unreachable, from the cache's memory)" if resolution.stale else ""
    aliases = f", aliases {', '.join(v.aliases)}" if v.aliases else ""
    _print(
        args,
        {**v.to_dict(), "stale": resolution.stale},
        f"{args.uri} -> {v.label} (stage {v.stage}{aliases}, run {v.run_id}, source {v.source})"
        f"{stale}",
    )
    return 0


def _check(source: Any, args: argparse.Namespace) -> int:
    from loader.deps import DependencyPolicy, check_model_dir
    from loader.uri import parse_uri

    version = source.resolve(parse_uri(args.uri)).version
    if version.local_path:
        path = Path(version.local_path)
    else:
        from loader.registry import METADATA_FILES

        path = source.cache.fetch_metadata(
            version, lambda dst: source.registry.download(version, dst, files=METADATA_FILES)
        ).path
    strict = DependencyPolicy("strict", source.policy.match, source.policy.ignore)
    report = check_model_dir(path, strict)
    lines = [f"{version.label}: {len(report.checked)} requirements checked"]
    lines += [f"  {m}" for m in report.mismatches] or ["  all satisfied"]
    _print(args, {"version": version.label, **report.to_dict()}, "\n".join(lines))
    return 0 if report.ok else 1


def _cache(cache: Any, args: argparse.Namespace) -> int:
    if args.action == "ls":
        entries = sorted(cache.entries(), key=lambda e: e["last_used"], reverse=True)
        table = [("VERSION", "BYTES", "LAST USED", "PINNED", "PATH")] + [
            (
                f"{e['version']['name']}@{e['version']['version']}",
                str(e["bytes"]),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])),
                "pinned" if e["pinned"] else "",
                str(e["path"]),
            )
            for e in entries
        ]
        total = sum(e["bytes"] for e in entries)
        _print(
            args, entries, "\n".join([*_columns(table), f"{len(entries)} entries, {total} bytes"])
        )
        return 0
    if args.action == "verify":
        report = cache.verify(full=True)
        damaged = {k: v for k, v in report.items() if v}
        lines = [f"{k}: {v} (discarded)" for k, v in damaged.items()]
        _print(args, report, "\n".join([*lines, f"{len(report)} checked, {len(damaged)} damaged"]))
        return 1 if damaged else 0
    limit = args.max_bytes if args.max_bytes is not None else cache.max_bytes
    keep = args.keep_versions if args.keep_versions is not None else cache.keep_versions
    if limit is None and keep is None:
        print(
            "modeld cache gc: give --max-bytes or --keep-versions, or set cache.max_bytes or "
            "cache.keep_versions",
            file=sys.stderr,
        )
        return 2
    if keep is not None and keep < 1:
        print(f"modeld cache gc: --keep-versions {keep}: expected >= 1", file=sys.stderr)
        return 2
    evicted = cache.evict(limit, keep_versions=keep)
    _print(args, evicted, "\n".join([*evicted, f"{len(evicted)} evicted"]))
    return 0


def _env(envs: Any, args: argparse.Namespace) -> int:
    if args.action == "ls":
        entries = envs.entries()
        table = [("ENVIRONMENT", "PYTHON", "BYTES", "LAST USED", "IN USE", "PACKAGES")] + [
            (
                e["key"],
                e["python"],
                str(e["size_bytes"]),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])),
                "in use" if e["in_use"] else "",
                " ".join(f"{n}=={v}" for n, v in sorted(e["packages"].items())),
            )
            for e in entries
        ]
        total = sum(e["size_bytes"] for e in entries)
        _print(
            args,
            entries,
            "\n".join([*_columns(table), f"{len(entries)} environments, {total} bytes"]),
        )
        return 0
    removed = envs.gc(keep_bytes=args.max_bytes or 0)
    _print(args, removed, "\n".join([*removed, f"{len(removed)} removed"]))
    return 0


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as aligned text columns (numbers right-aligned, the last column as it is)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if cell.isdigit() or i == 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


class _Progress:
    """A progress line on stderr while a large download lands in the cache's tmp/."""

    def __init__(self, tmp: Path, label: str) -> None:
        self.tmp, self.label = tmp, label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modeld-progress", daemon=True)
        self._shown = False
        self._total: int | None = None  # from the download's MLmodel, read once it is there

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._shown:
            print(file=sys.stderr)

    def _run(self) -> None:
        prefix = f"{os.getpid()}."
        while not self._stop.wait(0.5):
            done = 0
            for d in self.tmp.glob(f"*.{prefix}*"):
                done += _size(d)
                self._total = self._total or _expected_size(d)  # MLmodel is small: lands early
            if not done or (done < PROGRESS_MIN_BYTES and not self._shown):
                continue  # nothing yet, or already renamed into the cache: keep the last line
            self._shown = True
            bar = ""
            if total := self._total:
                filled = int(30 * min(done, total) / total)
                bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:>3}% "
            print(f"\r{self.label}: {bar}{done / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)


def _size(root: Path) -> int:
    """Bytes under ``root`` so far (a download the cache renames into place meanwhile stops
    counting rather than raising)."""
    total = 0
    with contextlib.suppress(OSError):
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size if path.is_file() else 0
    return total


def _expected_size(download: Path) -> int | None:
    """The ``model_size_bytes`` MLflow records in ``MLmodel``, once it is in ``download``."""
    import yaml

    try:
        mlmodel = next(download.rglob("MLmodel"))
        return int(yaml.safe_load(mlmodel.read_text()).get("model_size_bytes") or 0) or None
    except (StopIteration, ValueError, OSError, AttributeError, TypeError, yaml.YAMLError):
        return None
