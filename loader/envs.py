"""Isolated environments: a venv per requirement set, built with uv, shared on one volume.

A model's environment comes from its own files (``requirements.txt`` and ``constraints.txt``,
else ``conda.yaml``'s pip section) plus the MLflow it was logged with, on a Python of this
machine with the model's major.minor (none is downloaded). It lives under
``<cache root>/envs/<key>``, where the key is a digest of the requirement set and the
interpreter: every version with the same requirements shares it.

Built once per node: under a per-key lock (``flock``, so N workers or pods on one volume build
it once) and one of ``parallel_builds`` build slots, into a temporary directory renamed into
place only once its interpreter runs and finds MLflow, so a crash mid-build never leaves a
usable half-environment. A process serving from an environment holds a shared lock on it;
:meth:`EnvStore.gc` and the disk budget remove only environments nobody holds, least recently
used first. A cached environment needs no package index: an offline restart serves from it.

uv gets the package index configuration pip has on this machine (``pip config list``: pip's
files and ``PIP_*`` variables) unless uv has its own (a ``uv.toml`` or ``UV_*`` variables, which
uv reads itself and which win).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loader.deps import requirement_lines
from loader.errors import EnvBuildError
from loader.files import flock, remove_tree

log = logging.getLogger(__name__)

#: Bump when the layout or the worker protocol changes: old environments are not reused.
LAYOUT = 1
MANIFEST = "modeld-env.json"
BUILD_TIMEOUT_S = 900.0
#: Packages shown for an environment (status, ``modeld env ls``) besides those it pins.
KEY_PACKAGES = ("mlflow", "numpy", "pandas", "scikit-learn", "cloudpickle")
_LOCK_POLL_S = 0.2
_TAIL_LINES = 12
_CHECK = (
    "import importlib.metadata as m, importlib.util as u, json, sys\n"
    "assert u.find_spec('mlflow'), 'mlflow is not installed'\n"
    "names = json.loads(sys.argv[1])\n"
    "def v(n):\n"
    "    try:\n"
    "        return m.version(n)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    "print(json.dumps({n: v(n) for n in names}))\n"
)


@dataclass(frozen=True, slots=True)
class EnvSpec:
    """What a model asks of its environment, read from its files."""

    python: str | None  #: ``major.minor`` (None: the model does not say)
    requirements: tuple[str, ...]  #: pip requirement lines, as the model states them
    constraints: tuple[str, ...] = ()
    source: str = "requirements.txt"  #: the file the requirements came from
    skipped: tuple[str, ...] = ()  #: conda packages uv cannot install (noted, not fatal)

    @property
    def packages(self) -> list[str]:
        """The distribution names the requirements name (for status)."""
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name

        names: list[str] = []
        for line in self.requirements:
            with contextlib.suppress(InvalidRequirement):
                names.append(canonicalize_name(Requirement(line).name))
        return names


@dataclass(frozen=True, slots=True)
class Interpreter:
    path: str
    version: str  #: ``3.11.7``
    implementation: str = "cpython"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


@dataclass(frozen=True, slots=True)
class EnvInfo:
    """One built environment, as its manifest records it."""

    key: str
    path: str
    python: str
    interpreter: str
    requirements: tuple[str, ...]
    packages: dict[str, str | None] = field(default_factory=dict)
    built_at: float = 0.0
    build_s: float = 0.0
    size_bytes: int = 0

    @property
    def executable(self) -> str:
        return str(Path(self.path) / "venv" / "bin" / "python")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["requirements"] = list(self.requirements)
        return out


def model_environment(model_dir: str | Path) -> EnvSpec:
    """The environment ``model_dir``'s files ask for (with MLflow pinned to the version that
    logged it when the requirements do not name MLflow)."""
    root = Path(model_dir)
    mlmodel = _yaml(root / "MLmodel")
    python_env = _yaml(root / "python_env.yaml")
    conda = _yaml(root / "conda.yaml")
    requirements = requirement_lines(root / "requirements.txt")
    constraints = requirement_lines(root / "constraints.txt")
    source, skipped = "requirements.txt", list[str]()
    if not (root / "requirements.txt").is_file():
        requirements, skipped = _conda_pip(conda)
        source = "conda.yaml" if conda else "none"
    requirements = [r for r in requirements if not r.startswith(("-c", "--constraint"))]
    if not any(_names_mlflow(line) for line in requirements):
        logged = mlmodel.get("mlflow_version")
        requirements.insert(0, f"mlflow=={logged}" if logged else "mlflow")
    python = _minor(python_env.get("python"))
    if python is None:
        python = _minor(_conda_python(conda))
    if python is None:
        pyfunc = (mlmodel.get("flavors") or {}).get("python_function") or {}
        python = _minor(pyfunc.get("python_version") if isinstance(pyfunc, dict) else None)
    return EnvSpec(python, tuple(requirements), tuple(constraints), source, tuple(skipped))


# -- interpreters -----------------------------------------------------------------------------


def find_pythons(extra: Sequence[str] = ()) -> list[Interpreter]:
    """The Python interpreters on this machine: ``extra`` (configured paths or globs), the
    daemon's own, every ``python3.N`` on ``PATH`` and under pyenv's and uv's version
    directories. Each is asked its version once per process."""
    candidates: list[str] = []
    for pattern in extra:
        candidates.extend(sorted(glob.glob(os.path.expanduser(pattern))) or [pattern])
    base = getattr(sys, "_base_executable", None) or sys.executable
    candidates.append(base)
    for directory in os.get_exec_path():
        candidates.extend(sorted(glob.glob(os.path.join(directory, "python3*"))))
    for pattern in (
        "~/.pyenv/versions/*/bin/python3",
        "~/.local/share/uv/python/*/bin/python3",
        "/usr/local/bin/python3*",
        "/usr/bin/python3*",
    ):
        candidates.extend(sorted(glob.glob(os.path.expanduser(pattern))))
    found: dict[str, Interpreter] = {}
    for path in candidates:
        if path.endswith("-config") or not os.access(path, os.X_OK) or os.path.isdir(path):
            continue
        real = os.path.realpath(path)
        if real in found:
            continue
        interp = _ask(path)
        if interp is not None:
            found[real] = interp
    return list(found.values())


@functools.cache
def _ask(path: str) -> Interpreter | None:
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3], sys.implementation.name)"
    try:
        out = subprocess.run(
            [path, "-I", "-c", code], capture_output=True, text=True, timeout=10, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return Interpreter(path, out[0], out[1]) if len(out) == 2 else None


def pick_python(spec: EnvSpec, found: Sequence[Interpreter], label: str) -> Interpreter:
    """The newest CPython in ``found`` with the model's major.minor (the daemon's own when the
    model names none).

    Raises:
        EnvBuildError: none matches (the message names what is needed and what was found).
    """
    want = spec.python or ".".join(platform.python_version_tuple()[:2])
    matching = [i for i in found if i.minor == want and i.implementation == "cpython"]
    if not matching:
        have = sorted({i.version for i in found}, key=_version_key)
        raise EnvBuildError(
            f"{label} needs Python {want} (python_env.yaml), which is not on this machine "
            f"(found: {', '.join(have) or 'none'}); modeld downloads no interpreter: install "
            "one, or name its path in environments.pythons"
        )
    return max(matching, key=lambda i: _version_key(i.version))


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


# -- the store --------------------------------------------------------------------------------


class EnvStore:
    """Build, find, lease and collect environments under ``root``.

    Args:
        root: the environments' directory (``<cache root>/envs``).
        build_timeout_s: a build taking longer is stopped and fails (its files are removed).
        max_bytes: disk budget; after a build, unused environments beyond it are removed,
            least recently used first (None: no limit).
        parallel_builds: builds that may run at once on this node (one by default: a build
            is CPU and network heavy and would slow the models serving beside it).
        pythons: extra interpreter paths (or globs) to consider.
        uv: the uv binary (default: the ``uv`` package's, else ``uv`` on PATH).
        observer: called as ``observer("env_build", {"seconds", "ok"})``.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        build_timeout_s: float = BUILD_TIMEOUT_S,
        max_bytes: int | None = None,
        parallel_builds: int = 1,
        pythons: Sequence[str] = (),
        uv: str | None = None,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.build_timeout_s = build_timeout_s
        self.max_bytes = max_bytes
        self.parallel_builds = max(1, parallel_builds)
        self.pythons = tuple(pythons)
        self._uv = uv
        self.observer = observer

    # -- find or build ------------------------------------------------------------------------

    def key(self, spec: EnvSpec, interp: Interpreter) -> str:
        text = json.dumps(
            {
                "layout": LAYOUT,
                "python": [interp.path, interp.version, interp.implementation],
                "machine": platform.machine(),
                "requirements": sorted(spec.requirements),
                "constraints": sorted(spec.constraints),
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def ensure(self, spec: EnvSpec, model_dir: str | Path, label: str) -> EnvInfo:
        """The environment for ``spec``: the cached one (checked: its interpreter runs and
        finds MLflow), else built now.

        Raises:
            EnvBuildError: no matching Python, or the build failed or timed out (the message
                ends with the tail of uv's output).
        """
        interp = pick_python(spec, find_pythons(self.pythons), label)
        key = self.key(spec, interp)
        final = self.root / key
        deadline = time.monotonic() + self.build_timeout_s
        with self._lock(f"{key}.lock", deadline, label):
            info = self._usable(final)
            if info is not None:
                _touch(final)
                return info
            self._reap(key)
            with self._slot(deadline, label):
                info = self._build(spec, Path(model_dir), interp, key, deadline, label)
        self.evict()
        return info

    @contextlib.contextmanager
    def lease(self, info: EnvInfo) -> Iterator[None]:
        """Hold ``info`` in use (a shared lock: :meth:`gc` leaves it alone) until exit."""
        fd = os.open(Path(info.path) / ".in-use", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            _touch(Path(info.path))
            yield
        finally:
            os.close(fd)

    def _usable(self, final: Path) -> EnvInfo | None:
        info = _read_manifest(final)
        if info is None:
            if final.exists():
                log.warning("environment %s has no manifest: rebuilding it", final.name)
                remove_tree(final)
            return None
        try:
            self._run([info.executable, "-I", "-c", _CHECK, "[]"], timeout_s=60)
        except EnvBuildError as exc:
            log.warning("environment %s failed its check (%s): rebuilding it", final.name, exc)
            remove_tree(final)
            return None
        return info

    def _build(
        self,
        spec: EnvSpec,
        model_dir: Path,
        interp: Interpreter,
        key: str,
        deadline: float,
        label: str,
    ) -> EnvInfo:
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        log.info(
            "%s: building its environment %s (Python %s, %d requirements)",
            label,
            key,
            interp.version,
            len(spec.requirements),
        )
        ok = False
        try:
            uv = self.uv_binary()
            config = self._uv_config(tmp)
            base = [uv, "--no-progress", "--quiet"] + (["--config-file", config] if config else [])
            self._run(
                [*base, "venv", "--relocatable", "--python", interp.path, str(tmp / "venv")],
                deadline=deadline,
            )
            reqs = tmp / "requirements.txt"
            reqs.write_text("\n".join(spec.requirements) + "\n", encoding="utf-8")
            install = [*base, "pip", "install", "--python", str(tmp / "venv/bin/python")]
            install += ["-r", str(reqs)]
            if spec.constraints:
                cons = tmp / "constraints.txt"
                cons.write_text("\n".join(spec.constraints) + "\n", encoding="utf-8")
                install += ["-c", str(cons)]
            self._run(install, deadline=deadline, cwd=model_dir)
            names = sorted({*KEY_PACKAGES, *spec.packages})
            packages = json.loads(
                self._run(
                    [str(tmp / "venv/bin/python"), "-I", "-c", _CHECK, json.dumps(names)],
                    deadline=deadline,
                )
            )
            info = EnvInfo(
                key=key,
                path=str(self.root / key),
                python=interp.version,
                interpreter=interp.path,
                requirements=spec.requirements,
                packages={n: v for n, v in packages.items() if v is not None},
                built_at=time.time(),
                build_s=round(time.monotonic() - started, 3),
                size_bytes=_tree_bytes(tmp),
            )
            (tmp / MANIFEST).write_text(json.dumps(info.to_dict(), indent=1), encoding="utf-8")
            os.rename(tmp, self.root / key)  # the venv is relocatable: it moves with it
            ok = True
        finally:
            if not ok:
                remove_tree(tmp)
            self._record(key, label, ok, time.monotonic() - started)
        log.info("%s: environment %s built in %.1fs", label, key, info.build_s)
        return info

    def _record(self, key: str, label: str, ok: bool, seconds: float) -> None:
        line = json.dumps(
            {"key": key, "model": label, "ok": ok, "seconds": round(seconds, 3), "at": time.time()}
        )
        with contextlib.suppress(OSError), open(self.root / "builds.jsonl", "a") as f:
            f.write(line + "\n")
        if self.observer is not None:
            try:
                self.observer("env_build", {"seconds": seconds, "ok": ok})
            except Exception:  # metrics must never break a build
                log.exception("observer failed on env_build")

    def builds(self) -> list[dict[str, Any]]:
        """Every build attempt on this volume, oldest first (``builds.jsonl``)."""
        try:
            lines = (self.root / "builds.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    # -- uv -----------------------------------------------------------------------------------

    def uv_binary(self) -> str:
        if self._uv:
            return self._uv
        try:
            import uv

            return str(uv.find_uv_bin())
        except (ImportError, FileNotFoundError):
            found = shutil.which("uv")
            if found is None:
                raise EnvBuildError(
                    "uv is not installed (pip install uv): isolated environments need it"
                ) from None
            return found

    def _uv_config(self, tmp: Path) -> str | None:
        """A uv.toml carrying pip's index settings, unless uv is configured on its own."""
        if any(
            Path(p).expanduser().is_file()
            for p in ("/etc/uv/uv.toml", "~/.config/uv/uv.toml", "/etc/xdg/uv/uv.toml")
        ):
            return None
        settings = pip_index_settings()
        tmp.mkdir(parents=True, exist_ok=True)
        path = tmp / "uv.toml"
        lines = ['python-downloads = "never"']
        for key, value in settings.items():
            lines.append(f"{key} = {json.dumps(value)}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(path)

    def _run(
        self,
        argv: list[str],
        *,
        deadline: float | None = None,
        timeout_s: float | None = None,
        cwd: Path | None = None,
    ) -> str:
        if timeout_s is None:
            timeout_s = max(1.0, (deadline or time.monotonic() + 600) - time.monotonic())
        try:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=cwd,
                start_new_session=True,  # a timeout stops uv and everything it started
            )
        except OSError as exc:
            raise EnvBuildError(f"could not run {argv[0]}: {exc}") from exc
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if deadline is None:
                bound = f"{timeout_s:g}s"
            else:  # a build step: name the budget the user set, not what was left of it
                bound = f"{self.build_timeout_s:g}s (environments.build_timeout_s)"
            raise EnvBuildError(f"{_what(argv)} did not finish within {bound}") from None
        if proc.returncode != 0:
            tail = "\n".join((err or out).strip().splitlines()[-_TAIL_LINES:])
            raise EnvBuildError(f"{_what(argv)} failed (exit {proc.returncode}): {tail}")
        return out

    # -- locks --------------------------------------------------------------------------------

    def _lock(
        self, name: str, deadline: float, label: str
    ) -> contextlib.AbstractContextManager[None]:
        return flock(
            self.root / ".locks" / name,
            fcntl.LOCK_EX,
            deadline,
            lambda: EnvBuildError(
                f"{label}: gave up waiting for another process's build of the same "
                "environment (environments.build_timeout_s)"
            ),
        )

    @contextlib.contextmanager
    def _slot(self, deadline: float, label: str) -> Iterator[None]:
        """One of ``parallel_builds`` build slots on this node."""
        locks = self.root / ".locks"
        fds = [
            os.open(locks / f"build-slot-{i}", os.O_RDWR | os.O_CREAT, 0o600)
            for i in range(self.parallel_builds)
        ]
        try:
            while True:
                for fd in fds:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue
                    yield
                    return
                if time.monotonic() > deadline:
                    raise EnvBuildError(
                        f"{label}: every build slot stayed busy (environments.parallel_builds "
                        f"= {self.parallel_builds}) until the build timeout"
                    )
                time.sleep(_LOCK_POLL_S)
        finally:
            for fd in fds:
                os.close(fd)

    def _reap(self, key: str) -> None:
        """Under ``key``'s lock no build of it is running: what a crash left is garbage."""
        for tmp in self.root.glob(f".tmp-{key}-*"):
            log.info("removing %s, left by a build that did not finish", tmp.name)
            remove_tree(tmp)

    # -- listing and collection ---------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every built environment with ``in_use`` and ``last_used``, most recent first."""
        out = []
        for path in self.root.glob("*"):
            info = _read_manifest(path)
            if info is None:
                continue
            entry = info.to_dict()
            entry["in_use"] = _in_use(path)
            entry["last_used"] = _last_used(path)
            out.append(entry)
        return sorted(out, key=lambda e: e["last_used"], reverse=True)

    def gc(self, *, keep_bytes: int | None = 0) -> list[str]:
        """Remove environments no process holds, least recently used first, until the
        unused ones take at most ``keep_bytes`` (0: remove every unused one). Returns the
        removed keys."""
        removed: list[str] = []
        entries = self.entries()
        total = sum(int(e["size_bytes"]) for e in entries)
        for entry in reversed(entries):  # least recently used first
            if keep_bytes is not None and keep_bytes > 0 and total <= keep_bytes:
                break
            if entry["in_use"]:
                continue
            if self._remove_unused(entry["key"]):
                removed.append(entry["key"])
                total -= int(entry["size_bytes"])
        return removed

    def evict(self) -> list[str]:
        """Apply the disk budget (after a build)."""
        if not self.max_bytes:
            return []
        removed = self.gc(keep_bytes=self.max_bytes)
        for key in removed:
            log.info("environment %s removed: over environments.max_bytes", key)
        return removed

    def _remove_unused(self, key: str) -> bool:
        path = self.root / key
        with contextlib.suppress(EnvBuildError), self._lock(f"{key}.lock", time.monotonic(), key):
            fd = os.open(path / ".in-use", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            finally:
                os.close(fd)
            remove_tree(path)
            return True
        return False


# -- pip's index settings ---------------------------------------------------------------------


@functools.cache
def pip_index_settings() -> dict[str, Any]:
    """pip's index configuration on this machine, as uv.toml settings (``pip config list``
    reads pip's files and ``PIP_*`` variables with pip's own precedence)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    values: dict[str, str] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        option = name.rpartition(".")[2]
        if option and value:
            values[option] = value.strip().strip("'\"")  # later lines (env) win
    settings: dict[str, Any] = {}
    if values.get("index-url"):
        settings["index-url"] = values["index-url"]
    if values.get("extra-index-url"):
        settings["extra-index-url"] = values["extra-index-url"].split()
        # pip takes the best version from any index; uv's default stops at the first that
        # has the package at all
        settings["index-strategy"] = "unsafe-best-match"
    if values.get("find-links"):
        settings["find-links"] = values["find-links"].split()
    if values.get("trusted-host"):
        settings["allow-insecure-host"] = values["trusted-host"].split()
    if values.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        settings["no-index"] = True
    if values.get("cert"):  # pip's CA bundle: uv reads the system's store instead
        settings["native-tls"] = True
    return settings


# -- files ------------------------------------------------------------------------------------


def _what(argv: list[str]) -> str:
    """``uv venv``, ``uv pip install`` or ``python``: the command, without its options."""
    name = Path(argv[0]).name
    if name != "uv":
        return name
    if "venv" in argv:
        return "uv venv"
    return "uv pip install" if "install" in argv else "uv"


def _read_manifest(path: Path) -> EnvInfo | None:
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        data["requirements"] = tuple(data["requirements"])
        return EnvInfo(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        (path / ".last-used").touch()


def _last_used(path: Path) -> float:
    try:
        return (path / ".last-used").stat().st_mtime
    except OSError:
        return 0.0


def _in_use(path: Path) -> bool:
    try:
        fd = os.open(path / ".in-use", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _names_mlflow(line: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        name = canonicalize_name(Requirement(line).name)
    except InvalidRequirement:
        return False
    return name in ("mlflow", "mlflow-skinny")


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _conda_pip(conda: dict[str, Any]) -> tuple[list[str], list[str]]:
    pip: list[str] = []
    skipped: list[str] = []
    for dep in conda.get("dependencies") or []:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            pip.extend(str(p) for p in dep["pip"])
        elif isinstance(dep, str) and not dep.startswith(("python=", "python ", "pip")):
            skipped.append(dep)
    return pip, skipped


def _conda_python(conda: dict[str, Any]) -> str | None:
    for dep in conda.get("dependencies") or []:
        if isinstance(dep, str) and dep.startswith("python="):
            return dep.split("=", 1)[1].lstrip("=")
    return None


def _minor(value: Any) -> str | None:
    if value is None:
        return None
    parts = str(value).split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return f"{parts[0]}.{parts[1]}"
