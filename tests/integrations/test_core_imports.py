"""The core never imports a framework: importing presam_kernels and every core
module leaves lightning, transformers, accelerate and timm unimported."""
from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "timm")


def test_core_modules_import_no_framework():
    code = (
        "import pkgutil, sys, importlib, presam_kernels\n"
        "for m in pkgutil.walk_packages(presam_kernels.__path__, 'presam_kernels.'):\n"
        "    if not m.name.startswith('presam_kernels.integrations.') and not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the core imported: {out.stdout.strip()}"
