import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_loader_imports_neither_aiohttp_nor_serving():
    code = (
        "import sys, loader; loader.load_model; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'serving')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_scipy_special_is_imported_ahead_of_mlflow(tmp_path):
    """skops scans sys.modules in import order for each ufunc: scipy.special must come before
    MLflow's modules (loader.pyfunc.import_ahead_of_mlflow), else a first skops load pays
    ~0.5 s more."""
    code = (
        "import sys; from loader.api import make_source; "
        f"make_source(cache_dir={str(tmp_path)!r}, tracking_uri='sqlite:///:memory:'); "
        "order = list(sys.modules); "
        "print(*(order.index(m) if m in order else -1 for m in ('scipy.special', 'mlflow')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    special, mlflow = map(int, proc.stdout.split())
    assert 0 <= special < mlflow
