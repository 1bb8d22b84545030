"""torchaudio's Kaldi-compatible features (``torchaudio.compliance.kaldi``: ``fbank``, ``mfcc``), as the makers'
reference for ours. torchaudio cannot be imported beside our torch, but that module is plain torch code: it is
read from the torchaudio wheel ``scripts/setup.sh test`` downloads into ``.venv/reference`` and run as it is
(its ``import torchaudio`` serves ``resample_waveform``, which no test calls, and ``mfcc``'s DCT matrix:
``torchaudio.functional.create_dct``, read from the same wheel)."""

import ast
import math
import sys
import types
import zipfile
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[1] / ".venv" / "reference"


def kaldi() -> types.ModuleType:
    wheels = sorted(REFERENCE.glob("torchaudio-*.whl"))
    if not wheels:
        raise RuntimeError(f"no torchaudio wheel in {REFERENCE}: run scripts/setup.sh test")
    wheel = zipfile.ZipFile(wheels[-1])
    source = wheel.read("torchaudio/compliance/kaldi.py").decode()
    module = types.ModuleType("torchaudio_reference_kaldi")
    saved = sys.modules.get("torchaudio")
    stand_in = types.ModuleType("torchaudio")  # for kaldi.py's top-level import
    stand_in.functional = types.SimpleNamespace(
        create_dct=_function(wheel.read("torchaudio/functional/functional.py").decode(), "create_dct"))
    sys.modules["torchaudio"] = stand_in
    try:
        exec(compile(source, f"{wheels[-1].name}/torchaudio/compliance/kaldi.py", "exec"), module.__dict__)
    finally:
        if saved is None:
            del sys.modules["torchaudio"]
        else:
            sys.modules["torchaudio"] = saved
    return module


def _function(source: str, name: str):
    """One top-level function of a module's source, compiled alone (its module imports torchaudio's C++ parts)."""
    import torch

    tree = ast.parse(source)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"torch": torch, "math": math, "Tensor": torch.Tensor, "Optional": __import__("typing").Optional}
    exec(compile(ast.Module([node], []), name, "exec"), namespace)
    return namespace[name]
