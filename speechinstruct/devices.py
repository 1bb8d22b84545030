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
