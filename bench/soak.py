"""Soak for minutes: steady load while the registry changes every 2 s (tests/test_soak.py).

.venv/bin/python bench/soak.py --seconds 300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()
    env = {**os.environ, "MODELD_SOAK_S": str(args.seconds)}
    sys.exit(
        subprocess.call(
            [sys.executable, "-m", "pytest", "-q", "tests/test_soak.py"], cwd=ROOT, env=env
        )
    )
