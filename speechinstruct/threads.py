"""How many threads this process should use, and telling OpenMP (FAISS), BLAS and torch before they load.

On a shared node the CPUs we may use are fewer than ``os.cpu_count()``: the scheduler affinity (``taskset``,
SLURM's ``--cpus-per-task``) and a cgroup CPU quota (containers, Kubernetes limits) both cap them. OpenMP's
default active waiting burns those CPUs while another process needs them (FAISS k-means fell to 0.6-4x of
scikit-learn's speed beside one busy process), so waiting is made passive. Environment variables the user
set win; libraries read them when they load, so ``configure`` runs before any of them is imported.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def decode_workers(device: str | None = None) -> int:
    """Audio decoding threads when none are asked for: every usable CPU, at most 16, when the model runs on a GPU,
    so that decoding keeps up with it, else 2 (the CPU's cores compute the model). On the 2-core development
    machine one thread decoded 16 kHz FLAC at 5,200-5,900x real time and Common Voice's kind of audio (48 kHz
    MP3, resampled to 16 kHz) at 2,000x; two threads 9,800-11,000x and 3,900x: short of the 5,000x and 10,000x
    GPU targets. Sixteen are well past them; more would only hold more decoded audio in flight (4 per thread)."""
    on_gpu = device is not None and str(device).split(":")[0] != "cpu"
    return min(16, available_cpus()) if on_gpu else 2


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2 (or v1) CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def configure(threads: int | None = None) -> int:
    """Set the thread variables (``threads``, else the available CPUs) and passive OpenMP waiting, unless
    the user set them; returns the thread count in force. Call before importing torch or faiss."""
    n = threads or available_cpus()
    for name in THREAD_VARIABLES:
        if threads or name not in os.environ:
            os.environ[name] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return int(os.environ["OMP_NUM_THREADS"])
