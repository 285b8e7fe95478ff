import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LVR_CACHE", str(ROOT / ".cache" / "lvr"))
os.environ.setdefault("LVR_NO_PROGRESS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_lvr(*args, cwd=None, env=None, timeout=600):
    """Run the real `lvr` console script; return the CompletedProcess."""
    exe = Path(sys.executable).with_name("lvr")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture
def lvr():
    return run_lvr
