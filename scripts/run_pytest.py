"""Run pytest and refuse a run that executed no test (pytest's exit code 5)."""

from __future__ import annotations

import subprocess
import sys

args = [sys.executable, "-m", "pytest", *sys.argv[1:]]
code = subprocess.call(args)
if code == 5:
    print(
        "error: pytest collected no tests; a run that tests nothing is a failure", file=sys.stderr
    )
    sys.exit(1)
sys.exit(code)
