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


# bfloat16 dense tensor peaks in TFLOP/s (NVIDIA's data sheets; their larger figures are "with sparsity"), by the
# name torch gives the card: the most specific name first
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0))


def peak_tflops(device: str) -> tuple[float, str] | None:
    """(bfloat16 dense peak TFLOP/s, where that figure comes from) of ``device``: ``SPEECHINSTRUCT_PEAK_TFLOPS``
    when set, else the card's data-sheet figure when :data:`BF16_PEAK_TFLOPS` knows its name; None for the CPU and
    for other cards."""
    import math
    import os

    given = os.environ.get("SPEECHINSTRUCT_PEAK_TFLOPS")
    if given:
        try:
            peak = float(given)
        except ValueError:
            peak = 0.0
        if not (peak > 0 and math.isfinite(peak)):
            raise ValueError(f"SPEECHINSTRUCT_PEAK_TFLOPS={given!r}: not a positive number of TFLOP/s")
        return peak, "SPEECHINSTRUCT_PEAK_TFLOPS"
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next(((peak, f"{name}, bf16 dense") for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def utilisation(flops: float, seconds: float, device: str) -> dict:
    """A stage's model FLOP rate over its wall time, and its MFU (that rate over the device's bf16 peak) where the
    peak is known: what extract's summary shows."""
    if not flops or seconds <= 0:
        return {}
    rate = flops / seconds / 1e12
    out = {"model_tflop_per_s": round(rate, 3)}
    peak = peak_tflops(device)
    if peak:
        out["mfu"] = round(rate / peak[0], 4)
        out["mfu_of"] = f"{peak[0]:g} TFLOP/s ({peak[1]})"
    return out
