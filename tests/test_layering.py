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
