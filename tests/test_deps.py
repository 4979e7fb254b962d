import importlib.metadata
import platform

import pytest

from loader import ConfigError, DependencyMismatch, DependencyPolicy, check_model_dir

SKLEARN = importlib.metadata.version("scikit-learn")


def write_model(tmp_path, requirements, python=None, mlmodel=None):
    (tmp_path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    if python:
        (tmp_path / "python_env.yaml").write_text(f"python: {python}\n")
    (tmp_path / "MLmodel").write_text(mlmodel or "flavors: {}\n")
    return tmp_path


def bump(version: str, index: int) -> str:
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    parts[index] += 1
    return ".".join(str(p) for p in parts[:3])


def test_clean_environment_has_no_mismatch(tmp_path):
    write_model(tmp_path, [f"scikit-learn=={SKLEARN}", "numpy"], python=platform.python_version())
    report = check_model_dir(tmp_path)
    assert report.ok, report.mismatches
    assert f"scikit-learn=={SKLEARN}" in report.checked


def test_missing_package_and_wrong_pin_both_reported(tmp_path):
    write_model(tmp_path, ["modeld-no-such-package==1.0", "scikit-learn==0.20.3"])
    report = check_model_dir(tmp_path, DependencyPolicy("warn", "exact"))
    texts = [str(m) for m in report.mismatches]
    assert "modeld-no-such-package: not installed, model needs ==1.0" in texts
    assert f"scikit-learn: installed {SKLEARN}, model needs ==0.20.3" in texts


def test_strict_raises_listing_every_mismatch(tmp_path):
    write_model(tmp_path, ["modeld-no-such-package==1.0", "scikit-learn==0.20.3"])
    policy = DependencyPolicy("strict", "exact")
    with pytest.raises(DependencyMismatch) as info:
        policy.enforce("m@1", check_model_dir(tmp_path, policy))
    assert "modeld-no-such-package" in str(info.value)
    assert "scikit-learn: installed" in str(info.value)
    assert len(info.value.mismatches) == 2


@pytest.mark.parametrize(
    ("pinned", "match", "ok"),
    [
        (SKLEARN, "exact", True),
        (bump(SKLEARN, 2), "exact", False),
        (bump(SKLEARN, 2), "minor", True),
        (bump(SKLEARN, 1), "minor", False),
        (bump(SKLEARN, 1), "major", True),
        (bump(SKLEARN, 0), "major", False),
    ],
)
def test_match_levels(tmp_path, pinned, match, ok):
    write_model(tmp_path, [f"scikit-learn=={pinned}"])
    assert check_model_dir(tmp_path, DependencyPolicy("strict", match)).ok is ok


def test_ranges_and_markers(tmp_path):
    write_model(
        tmp_path,
        [
            "scikit-learn>=1.0,<99",
            "modeld-no-such-package==1.0; python_version < '3.0'",
            "-r other.txt",
            "# a comment",
            "git+https://example.invalid/x.git",
        ],
    )
    report = check_model_dir(tmp_path, DependencyPolicy("strict", "exact"))
    assert report.ok, report.mismatches


def test_ignore_list(tmp_path):
    write_model(tmp_path, ["modeld-no-such-package==1.0", "Pytest==0.0.1"])
    report = check_model_dir(
        tmp_path, DependencyPolicy("strict", "exact", ("modeld_no_such_package", "pytest"))
    )
    assert report.ok


def test_python_version_and_mlmodel_pins(tmp_path):
    mlmodel = "mlflow_version: 0.9.0\nflavors:\n  sklearn:\n    sklearn_version: 0.20.3\n"
    write_model(tmp_path, [], python="2.7.18", mlmodel=mlmodel)
    texts = [
        str(m) for m in check_model_dir(tmp_path, DependencyPolicy("warn", "major")).mismatches
    ]
    assert f"python: installed {platform.python_version()}, model needs ==2.7.18" in texts
    assert any(t.startswith("mlflow: installed") and "==0.9.0" in t for t in texts)
    assert f"scikit-learn: installed {SKLEARN}, model needs ==0.20.3" in texts


def test_ignore_policy_skips_everything(tmp_path):
    write_model(tmp_path, ["modeld-no-such-package==1.0"])
    assert check_model_dir(tmp_path, DependencyPolicy("ignore")).ok


@pytest.mark.parametrize(
    ("policy", "match", "ignore"),
    [("fail", "exact", ()), ("warn", "patch", ()), ("warn", "exact", "pytest")],
)
def test_bad_policy_values(policy, match, ignore):
    with pytest.raises(ConfigError) as info:
        DependencyPolicy(policy, match, ignore)
    assert "expected" in str(info.value)
