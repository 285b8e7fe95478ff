"""Where a result came from: versions, git commit, devices, world size (recorded with every run)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def devices_line(devices: dict) -> str:
    """`environment()["devices"]` in words: the GPUs (count and name), else the CPU's name
    and the vector ISA torch's kernels use."""
    cuda = devices.get("cuda") or []
    return f"{len(cuda)}x {cuda[0]}" if cuda else f"CPU {devices.get('cpu')} ({devices.get('cpu_isa')})"


def environment(world_size: int = 1) -> dict:
    """Versions, git commit, devices and world size (what lm-evaluation-harness records)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("lvr", "torch", "transformers", "deepspeed", "pydantic", "decord", "av", "vllm", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devices: dict = {"cpu_count": os.cpu_count(), "cpu": cpu_name()}
    try:
        import torch

        devices["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices["torch_threads"] = torch.get_num_threads()
        devices["cpu_isa"] = torch.backends.cpu.get_cpu_capability()  # the vector unit torch's kernels use
    except Exception:  # torch missing or a broken CUDA install: report what we can
        devices["cuda"] = []
    return {
        "python": platform.python_version(), "platform": platform.platform(), "hostname": socket.gethostname(),
        "versions": versions, "git_commit": git_commit(), "devices": devices, "world_size": world_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

