"""Safe reading of foreign checkpoints: fairseq HuBERT ``.pt`` files and fairseq/SpeechGPT k-means files.

Neither reader executes code from the file:

* fairseq checkpoints load with ``torch.load(weights_only=True)``. The pickle names fairseq (and
  omegaconf) classes that cannot be imported here, e.g. ``fairseq.data.dictionary.Dictionary`` in the task
  state; each such name is admitted as an inert ``Stub`` that only stores what the pickle gives it. Any
  other global that torch's restricted unpickler does not already allow is refused.
* k-means files are joblib pickles of scikit-learn's ``MiniBatchKMeans``. They are read by a joblib
  unpickler whose ``find_class`` admits numpy's array reconstruction, joblib's array wrapper (numeric
  dtypes only) and inert stubs for scikit-learn classes; everything else is refused.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import numpy as np
import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks to run or build something a checkpoint has no business with."""


class Stub:
    """Stands in for a class that cannot (or must not) be imported: keeps args and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):  # never pickled back out
        raise TypeError("Stub objects are read-only placeholders")


def _stub_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (Stub,), {"__module__": module, "__qualname__": name})


STUBBED_PREFIXES = ("fairseq.", "omegaconf.", "enum.")  # inert placeholders for these
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_restricted(path: str | Path) -> dict:
    """``torch.load`` with torch's weights-only unpickler, plus inert stubs for fairseq/omegaconf names."""
    import argparse

    allowed: list = [argparse.Namespace]
    for _ in range(200):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            match = _GLOBAL_RE.search(str(e))
            name = match.group(1) if match else None
            if name and name.startswith(STUBBED_PREFIXES) and not any(
                isinstance(a, tuple) and a[1] == name for a in allowed
            ):
                allowed.append((_stub_class(name), name))
                continue
            what = f"global {name}" if name else str(e).splitlines()[0]
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the checkpoint's pickle asks for {what}, which a model checkpoint "
                "does not need (it may run code). Only load checkpoints you trust with other tools."
            ) from None
        except (RuntimeError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    raise UnsafeCheckpointError(f"{path}: too many unknown globals")


def plain(obj):
    """Stubs of omegaconf containers/enums → plain dicts, lists and values (best effort)."""
    if isinstance(obj, Stub):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:
            return plain(state["_content"])
        if "_val" in state:
            return plain(state["_val"])
        if "_value_" in state:
            return state["_value_"]
        if obj.args:
            return plain(obj.args[0])
        return {k: plain(v) for k, v in state.items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return {k: plain(v) for k, v in vars(obj).items()}
    return obj


# ----------------------------------------------------------------------------------------------- k-means
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
}


def joblib_load_restricted(path: str | Path):
    """Load a joblib file holding scikit-learn estimators as ``Stub`` objects with their fitted state."""
    from joblib import numpy_pickle

    class SafeArrayWrapper(numpy_pickle.NumpyArrayWrapper):
        def read(self, *args, **kwargs):
            if np.dtype(self.dtype).hasobject:
                raise UnsafeCheckpointError(f"{path}: refused: object arrays in a k-means file may run code")
            return super().read(*args, **kwargs)

    class RestrictedUnpickler(numpy_pickle.NumpyUnpickler):
        def find_class(self, module, name):
            if (module, name) in _NUMPY_GLOBALS:
                return super().find_class(module, name)
            if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
                return SafeArrayWrapper
            if module.startswith("sklearn."):
                return _stub_class(f"{module}.{name}")
            if (module, name) == ("copyreg", "_reconstructor"):
                return _reconstructor
            if (module, name) == ("builtins", "object"):
                return object
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the pickle asks for {module}.{name}, which a k-means file does not "
                "need (it may run code)"
            )

    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if head[:1] != b"\x80":
                raise ValueError(f"{path}: not an uncompressed joblib/pickle file")
            f.seek(0)
            kwargs = {"mmap_mode": None}
            if "ensure_native_byte_order" in inspect.signature(numpy_pickle.NumpyUnpickler.__init__).parameters:
                kwargs["ensure_native_byte_order"] = True  # joblib >= 1.5
            return RestrictedUnpickler(str(path), f, **kwargs).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a readable joblib k-means file ({type(e).__name__}: {e})") from None


def _reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, Stub)):
        raise UnsafeCheckpointError(f"refused copyreg reconstruction of {cls!r}")
    return cls()
