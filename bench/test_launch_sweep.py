"""The launch-constant sweep (``launch_sweep.py``) is for a GPU session with
little device time: its dry run (CPU, interpreter) runs here so that it
cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_a_row_per_configuration_and_layout():
    out = subprocess.run(
        [sys.executable, "bench/launch_sweep.py", "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 256 |")]
    assert [r.split("|")[2].strip() + "/" + r.split("|")[4].strip() for r in rows] == [
        "2/flat", "2/64 tensors", "3/flat", "3/64 tensors"
    ]
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # a perturb time was measured
