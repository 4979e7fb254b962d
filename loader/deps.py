"""Check a model's recorded dependencies against the running Python environment.

Reads the model's own files: ``requirements.txt`` (pip pins), ``python_env.yaml`` (Python
version) and ``MLmodel`` (mlflow and flavor versions), and compares them with the installed
distributions (``importlib.metadata``) using PEP 440/508 semantics (``packaging``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from loader.errors import ConfigError, DependencyMismatch

log = logging.getLogger(__name__)

Policy = Literal["strict", "warn", "ignore", "isolate", "isolate_always"]
Match = Literal["exact", "minor", "major"]
POLICIES = ("strict", "warn", "ignore", "isolate", "isolate_always")
#: ``--env-manager`` (``mlflow models serve``'s flag) as a policy: ``local`` is today's
#: in-process serving; ``uv`` and ``virtualenv`` give every version its own environment.
ENV_MANAGERS = {"local": "warn", "uv": "isolate_always", "virtualenv": "isolate_always"}
MATCHES = ("exact", "minor", "major")
_RELEASE_PARTS = {"exact": None, "minor": 2, "major": 1}
#: MLmodel flavor keys whose version field names a PyPI distribution.
_FLAVOR_PACKAGES = {
    "sklearn": ("sklearn_version", "scikit-learn"),
    "xgboost": ("xgb_version", "xgboost"),
    "lightgbm": ("lgb_version", "lightgbm"),
    "catboost": ("catboost_version", "catboost"),
    "pytorch": ("pytorch_version", "torch"),
    "tensorflow": ("keras_version", "tensorflow"),
    "keras": ("keras_version", "keras"),
    "statsmodels": ("statsmodels_version", "statsmodels"),
    "prophet": ("prophet_version", "prophet"),
    "transformers": ("transformers_version", "transformers"),
    "onnx": ("onnx_version", "onnx"),
    "spacy": ("spacy_version", "spacy"),
}


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One unmet requirement: ``package: installed X, model needs Y``."""

    package: str
    installed: str | None
    needed: str
    source: str

    def __str__(self) -> str:
        have = self.installed if self.installed is not None else "not installed"
        if self.installed is not None:
            have = f"installed {have}"
        return f"{self.package}: {have}, model needs {self.needed}"

    def to_dict(self) -> dict[str, str | None]:
        return {
            "package": self.package,
            "installed": self.installed,
            "needed": self.needed,
            "source": self.source,
            "text": str(self),
        }


@dataclass(frozen=True, slots=True)
class DependencyReport:
    """The result of one check: every requirement looked at and every mismatch."""

    checked: tuple[str, ...] = ()
    mismatches: tuple[Mismatch, ...] = ()
    skipped: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checked": list(self.checked),
            "mismatches": [m.to_dict() for m in self.mismatches],
            "skipped": list(self.skipped),
        }


@dataclass(frozen=True, slots=True)
class DependencyPolicy:
    """How to react to mismatches, and how strictly to compare ``==`` pins."""

    policy: Policy = "warn"
    match: Match = "minor"
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError("dependency_policy", self.policy, " | ".join(POLICIES))
        if self.match not in MATCHES:
            raise ConfigError("dependency_match", self.match, " | ".join(MATCHES))
        if isinstance(self.ignore, str):
            raise ConfigError("dependency_ignore", self.ignore, "a list of package names")
        object.__setattr__(self, "ignore", tuple(canonicalize_name(p) for p in self.ignore))

    def isolates(self, report: DependencyReport) -> bool:
        """Whether a version with this report runs in its own environment."""
        return self.policy == "isolate_always" or (self.policy == "isolate" and not report.ok)

    def enforce(self, label: str, report: DependencyReport) -> None:
        """Apply the policy to a report.

        Raises:
            DependencyMismatch: policy is ``strict`` and the report has mismatches.
        """
        if report.ok or self.policy in ("ignore", "isolate_always"):
            return
        if self.policy == "isolate":
            log.info(
                "%s dependency mismatch: serving it from its own environment (%s)",
                label,
                "; ".join(str(m) for m in report.mismatches),
            )
            return
        if self.policy == "strict":
            raise DependencyMismatch(label, report.mismatches)
        log.warning(
            "%s dependency mismatch (policy warn, loading anyway): %s",
            label,
            "; ".join(str(m) for m in report.mismatches),
        )


def check_model_dir(
    model_dir: str | Path, policy: DependencyPolicy | None = None
) -> DependencyReport:
    """Compare the requirements recorded in ``model_dir`` with the running environment."""
    policy = policy or DependencyPolicy()
    if policy.policy == "ignore":
        return DependencyReport()
    root = Path(model_dir)
    checked: list[str] = []
    skipped: list[str] = []
    mismatches: list[Mismatch] = []
    seen: set[str] = set()

    for line in _read_lines(root / "requirements.txt"):
        try:
            req = Requirement(line)
        except InvalidRequirement:
            skipped.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        name: str = canonicalize_name(req.name)
        seen.add(name)
        if name in policy.ignore:
            continue
        checked.append(line)
        problem = _compare(name, str(req.specifier), policy.match, "requirements.txt")
        if problem:
            mismatches.append(problem)

    for name, spec, source in _mlmodel_pins(root / "MLmodel"):
        if name in seen or name in policy.ignore:
            continue
        seen.add(name)
        checked.append(f"{name}{spec}")
        problem = _compare(name, spec, policy.match, source)
        if problem:
            mismatches.append(problem)

    python = _python_version(root / "python_env.yaml")
    if python and "python" not in policy.ignore:
        checked.append(f"python=={python}")
        if not _same_release(Version(platform.python_version()), Version(python), policy.match):
            mismatches.append(
                Mismatch("python", platform.python_version(), f"=={python}", "python_env.yaml")
            )
    return DependencyReport(tuple(checked), tuple(mismatches), tuple(skipped))


@functools.cache
def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (canonical), None when absent; looked
    up once per process, by name: a model names a handful of packages, and scanning every
    installed distribution costs ~0.1 s of a cold start."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_fingerprint(model_dir: str | Path) -> str:
    """A digest of the installed versions of everything the model names, plus Python.

    Two processes with the same fingerprint unpickle the same objects the same way.
    """
    root = Path(model_dir)
    names = {"mlflow", "numpy", "pandas", "cloudpickle"}
    for line in _read_lines(root / "requirements.txt"):
        try:
            names.add(canonicalize_name(Requirement(line).name))
        except InvalidRequirement:
            continue
    names.update(name for name, _, _ in _mlmodel_pins(root / "MLmodel"))
    text = "\n".join([sys.version, *(f"{n}=={installed_version(n) or '-'}" for n in sorted(names))])
    return hashlib.sha256(text.encode()).hexdigest()


def _compare(name: str, spec: str, match: Match, source: str) -> Mismatch | None:
    installed = installed_version(name)
    if installed is None:
        return Mismatch(name, None, spec or "any version", source)
    if not spec:
        return None
    try:
        have = Version(installed)
    except InvalidVersion:
        return Mismatch(name, installed, spec, source)
    from packaging.specifiers import SpecifierSet

    for one in SpecifierSet(spec):
        if one.operator in ("==", "===") and "*" not in one.version:
            try:
                ok = _same_release(have, Version(one.version), match)
            except InvalidVersion:
                ok = one.contains(have, prereleases=True)
        else:
            ok = one.contains(have, prereleases=True)
        if not ok:
            return Mismatch(name, installed, spec, source)
    return None


def _same_release(have: Version, need: Version, match: Match) -> bool:
    parts = _RELEASE_PARTS[match]
    if parts is None:
        return have.release == need.release or have == need
    return (have.release + (0, 0, 0))[:parts] == (need.release + (0, 0, 0))[:parts]


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's lines without comments and blanks (options kept)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    lines = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _read_lines(path: Path) -> Iterable[str]:
    """The requirements themselves: no options (``-c``, ``-r``), no URLs."""
    return [
        line for line in requirement_lines(path) if not line.startswith("-") and "://" not in line
    ]


def _mlmodel_pins(path: Path) -> list[tuple[str, str, str]]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(data, dict):
        return []
    pins = []
    if data.get("mlflow_version"):
        pins.append(("mlflow", f"=={data['mlflow_version']}", "MLmodel"))
    for flavor, conf in (data.get("flavors") or {}).items():
        key_pkg = _FLAVOR_PACKAGES.get(flavor)
        if key_pkg and isinstance(conf, dict) and conf.get(key_pkg[0]):
            pins.append((key_pkg[1], f"=={conf[key_pkg[0]]}", "MLmodel"))
    return pins


def _python_version(path: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    value = data.get("python") if isinstance(data, dict) else None
    if value is None:
        return None
    try:
        Version(str(value))
    except InvalidVersion:
        return None
    return str(value)
