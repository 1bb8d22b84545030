"""Which device a stage runs on: ``auto`` is the GPU when torch sees one."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; anything else as given, once torch knows it as a
    device this machine has (one line otherwise: a misspelt device, or a GPU where torch sees none, stopped with
    torch's traceback)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no GPU on this machine (torch {torch.__version__}); "
                             "use cpu or auto")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}")
    return device


def actor_device(device: str, num_gpus_per_actor: float,
                 names: tuple[str, str] = ("--device", "--num-gpus-per-actor")) -> str:
    """The device every actor of a Ray job runs on (units/engine_ray.py): ``auto`` is cuda when actors get GPUs.
    One line, before Ray starts, for a device no actor can have: Ray shows an actor only the GPUs it was given
    (``CUDA_VISIBLE_DEVICES``), as cuda:0 onwards, and none to an actor given no GPU. ``names``: the settings'
    names in the line (the CLI's options, or a recipe's keys)."""
    import math

    import torch

    if device == "auto":
        return "cuda" if num_gpus_per_actor > 0 else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{names[0]} {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if parsed.type == "cuda":
        if num_gpus_per_actor <= 0:
            raise ValueError(f"{names[0]} {device}: an actor given no GPU ({names[1]} 0) sees none; give "
                             f"{names[1]} 1 (or a fraction, 0.5: two actors a GPU) or {names[0]} auto")
        visible = max(1, math.ceil(num_gpus_per_actor))
        if parsed.index is not None and parsed.index >= visible:
            raise ValueError(f"{names[0]} {device}: each actor sees only the GPU(s) Ray gives it, as cuda:0.."
                             f"cuda:{visible - 1}; give {names[0]} cuda or auto")
    return device


# bfloat16 dense tensor peaks in TFLOP/s (NVIDIA's data sheets; their larger figures are "with sparsity"), by the
# name torch gives the card: the most specific name first
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def given_peak() -> tuple[float, str] | None:
    """``SPEECHINSTRUCT_PEAK_TFLOPS`` as (TFLOP/s, its name), None when unset; one line when it is not a positive
    number (extract reads it before any work, so that a typo does not wait for the end of a long run)."""
    import math
    import os

    given = os.environ.get("SPEECHINSTRUCT_PEAK_TFLOPS")
    if not given:
        return None
    try:
        peak = float(given)
    except ValueError:
        peak = 0.0
    if not (peak > 0 and math.isfinite(peak)):
        raise ValueError(f"SPEECHINSTRUCT_PEAK_TFLOPS={given!r}: not a positive number of TFLOP/s")
    return peak, "SPEECHINSTRUCT_PEAK_TFLOPS"


def card(device: str) -> str | None:
    """torch's name for the GPU ``device`` (``NVIDIA H200``, say); None for the CPU."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.device(device))


def peak_tflops(device: str, name: str | None = None) -> tuple[float, str] | None:
    """(bfloat16 dense peak TFLOP/s, where that figure comes from) of ``device`` (or of the card called ``name``,
    elsewhere: a Ray actor's): ``SPEECHINSTRUCT_PEAK_TFLOPS`` when set, else the card's data-sheet figure when
    :data:`BF16_PEAK_TFLOPS` knows its name; None for the CPU and for other cards."""
    given = given_peak()
    if given:
        return given
    name = name or card(device)
    if not name:
        return None
    return next(((peak, f"{name}, bf16 dense") for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def utilisation(flops: float, seconds: float, peaks: list[tuple[float, str] | None]) -> dict:
    """A stage's model FLOP rate over its wall time, and its MFU where every device's peak is known (``peaks``:
    one per device the model ran on, :func:`peak_tflops`): that rate over their sum. What extract's summary shows."""
    if not flops or seconds <= 0:
        return {}
    rate = flops / seconds / 1e12
    out = {"model_tflop_per_s": float(f"{rate:.4g}")}  # four significant digits: a CPU's rate is a small number
    if peaks and all(peaks):
        total = sum(peak for peak, _ in peaks)
        out["mfu"] = float(f"{rate / total:.4g}")
        sources = sorted({source for _, source in peaks})
        out["mfu_of"] = (f"{total:g} TFLOP/s ({sources[0]})" if len(peaks) == 1 else
                         f"{total:g} TFLOP/s ({len(peaks)} devices: {'; '.join(sources)})")
    return out
