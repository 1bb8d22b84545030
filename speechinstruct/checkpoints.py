"""Safe reading of foreign checkpoints: fairseq HuBERT ``.pt`` files and fairseq/SpeechGPT k-means files.

Neither reader executes code from the file:

* fairseq checkpoints load with ``torch.load(weights_only=True)``. Their pickles name classes that cannot
  be imported here: ``fairseq.data.dictionary.Dictionary`` in the task state, omegaconf's ``DictConfig``
  and nodes when ``cfg`` was pickled as an object, fairseq ``ChoiceEnum`` members, ``typing.Any``. Each is
  admitted as an inert ``Stub`` that only stores what the pickle gives it; plain containers
  (``builtins.dict`` …) are admitted as themselves. Any other global is refused, naming it.
* ``fairseq_config`` turns whichever config form the checkpoint holds (plain dict, pickled DictConfig,
  argparse Namespace) into plain dicts; ``literal_arithmetic`` reads fairseq's layer-spec expressions
  (``"[(512,10,5)] + [(512,3,2)] * 4"``) without ``eval``.
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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks to run or build something a checkpoint has no business with."""


class Stub:
    """Stands in for a class that cannot (or must not) be imported: keeps args and state, runs nothing.

    Pickles build objects either by calling the class (``args``) or with ``cls.__new__`` and then
    ``__setstate__`` (``state``), so both start out empty at class level."""

    args: tuple = ()
    kwargs: dict = {}
    state = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __reduce__(self):  # never pickled back out
        raise TypeError("Stub objects are read-only placeholders")


def _stub_class(qualified: str) -> type:
    module, _, name = qualified.rpartition(".")
    return type(name, (Stub,), {"__module__": module, "__qualname__": name})


def _subscript(container, item):
    """Stands in for ``operator.getitem`` in a pickle: omegaconf pickles type annotations such as
    ``Tuple[float, ...]`` as ``getitem(typing.Tuple, (float, Ellipsis))``. Nothing is subscripted."""
    return Stub(container, item)


def _plain_dict(*_factory):
    """Stands in for ``collections.defaultdict``: the items arrive afterwards; no factory is kept."""
    return {}


# Globals a fairseq checkpoint may name, admitted as plain data. fairseq's and omegaconf's own classes
# (and ``typing`` names used as annotations) become inert ``Stub`` classes; nothing here can run code
# beyond building a container or a number.
_ADMITTED = {
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple, "builtins.int": int,
    "builtins.float": float, "builtins.str": str, "builtins.bool": bool, "builtins.bytes": bytes,
    "builtins.frozenset": frozenset, "builtins.Ellipsis": Ellipsis, "builtins.NoneType": type(None),
    "collections.defaultdict": _plain_dict, "_operator.getitem": _subscript, "operator.getitem": _subscript,
}
STUBBED_PREFIXES = ("fairseq.", "omegaconf.", "typing.", "enum.")  # inert placeholders for these


def _admit(name: str, path) -> tuple:
    import argparse

    if name == "argparse.Namespace":
        return (argparse.Namespace, name)
    if name in _ADMITTED:
        return (_ADMITTED[name], name)
    if name.startswith(STUBBED_PREFIXES):
        return (_stub_class(name), name)
    raise UnsafeCheckpointError(
        f"{path}: refused to load: the checkpoint's pickle asks for global {name}, which a model checkpoint "
        "does not need (it may run code). Only load checkpoints you trust with other tools."
    )


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_restricted(path: str | Path) -> dict:
    """``torch.load`` with torch's weights-only unpickler, plus the globals in ``_ADMITTED`` and inert
    stubs for fairseq/omegaconf/typing names. The pickle's globals are listed first (without running
    anything), so the file is read once; anything else is refused with the name it asked for."""
    import torch  # here: every command's error handling imports this module, and most never load a checkpoint

    path = Path(path)
    allowed: dict[str, tuple] = {}
    try:
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
            allowed[name] = _admit(name, path)
    except UnsafeCheckpointError:
        raise
    except Exception:  # legacy (non-zip) files cannot be listed: learn the globals while loading
        pass
    for _ in range(200):
        try:
            with torch.serialization.safe_globals(list(allowed.values())):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            match = _GLOBAL_RE.search(str(e))
            name = match.group(1) if match else None
            if name and name not in allowed:
                allowed[name] = _admit(name, path)
                continue
            what = f"global {name}" if name else str(e).splitlines()[0]
            raise UnsafeCheckpointError(f"{path}: refused to load: {what}") from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    raise UnsafeCheckpointError(f"{path}: too many unknown globals")


def plain(obj):
    """omegaconf containers, nodes and enum members (as stubs) → plain dicts, lists and values."""
    if isinstance(obj, Stub):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:  # DictConfig / ListConfig
            return plain(state["_content"])
        if "_val" in state:  # omegaconf value nodes
            return plain(state["_val"])
        if "_value_" in state:
            return state["_value_"]
        if obj.args:  # an enum member pickled as Choices("default"), or a subscripted annotation
            return plain(obj.args[0])
        return {k: plain(v) for k, v in state.items()}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return {k: plain(v) for k, v in vars(obj).items()}
    return obj


# ---------------------------------------------------------------------------------------- fairseq config
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _resolve(value, cfg: dict, depth: int = 0):
    """Resolve omegaconf interpolations such as ``${task.label_rate}`` against the whole config (a
    pickled DictConfig keeps them unresolved); anything else is returned unchanged."""
    match = _INTERPOLATION.match(value) if isinstance(value, str) else None
    if not match or depth > 10:
        return value
    node = cfg
    for part in match.group(1).split("."):
        if not isinstance(node, dict) or part not in node:
            return value
        node = node[part]
    return _resolve(node, cfg, depth + 1)


def fairseq_config(ckpt, path: str | Path) -> tuple[dict, dict]:
    """(model config, task config) of a loaded fairseq checkpoint, whichever form it was saved in: ``cfg``
    as a plain dict (fairseq >= 0.12), as a pickled omegaconf DictConfig (older hydra-era saves), or
    ``cfg`` None with an argparse ``args`` Namespace (pre-hydra). Raises one clear ValueError otherwise."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: not a fairseq checkpoint (a {type(ckpt).__name__}, not a dict)")
    if "model" not in ckpt:
        raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' weights; keys: {sorted(map(str, ckpt))[:8]})")
    if not isinstance(ckpt["model"], dict):
        raise ValueError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, not a dict of weights")
    cfg = plain(ckpt.get("cfg"))
    if cfg is None and ckpt.get("args") is not None:  # pre-hydra: one Namespace for model and task
        args = plain(ckpt["args"])
        if not isinstance(args, dict):
            raise ValueError(f"{path}: 'args' is a {type(ckpt['args']).__name__}, not an argparse Namespace")
        cfg = {"model": args, "task": args}
    if cfg is None:
        raise ValueError(f"{path}: the checkpoint holds no config (neither 'cfg' nor 'args')")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: 'cfg' is a {type(cfg).__name__}, not a mapping")
    parts = {}
    for key in ("model", "task"):
        value = cfg.get(key)
        if key == "model" and not value:
            raise ValueError(f"{path}: the checkpoint holds no model config (cfg.model / args)")
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{path}: cfg.{key} is a {type(value).__name__} ({str(value)[:40]!r}), not a mapping")
        parts[key] = {k: _resolve(v, cfg) for k, v in (value or {}).items()}
    return parts["model"], parts["task"]


_ARITHMETIC_LIMIT = 10_000


def literal_arithmetic(text: str, what: str = "expression"):
    """Evaluate fairseq's layer specs such as ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``
    without ``eval``: numbers, strings, lists and tuples of them, ``+`` and ``*`` (and unary minus).
    Anything else (names, calls, attributes, huge repetitions) is a ValueError."""
    import ast

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.List):
            return [walk(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(walk(e) for e in node.elts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            if isinstance(value, (int, float)):
                return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add) and type(left) is type(right) and not isinstance(left, str):
                result = left + right
            elif isinstance(node.op, ast.Mult) and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                result = left * right
            elif isinstance(node.op, ast.Mult) and isinstance(left, (list, tuple)) and isinstance(right, int) \
                    or isinstance(node.op, ast.Mult) and isinstance(right, (list, tuple)) and isinstance(left, int):
                seq, times = (left, right) if isinstance(left, (list, tuple)) else (right, left)
                if len(seq) * max(times, 0) > _ARITHMETIC_LIMIT:
                    raise ValueError(f"{what}: {text!r} repeats a sequence too often")
                result = seq * times
            else:
                raise ValueError(f"{what}: {text!r}: cannot apply {type(node.op).__name__} to "
                                 f"{type(left).__name__} and {type(right).__name__}")
            if isinstance(result, (int, float)) and abs(result) > 1e12:
                raise ValueError(f"{what}: {text!r}: number too large")
            return result
        raise ValueError(f"{what}: {text!r} is not a literal layer spec (found {type(node).__name__}); "
                         "only numbers, lists, tuples, + and * are read")

    if not isinstance(text, str):
        return text  # already a list (some tools write the literal)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"{what}: {text!r} is not a Python expression ({e.msg})") from None
    return walk(tree)


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


def load_pretrained(cls, checkpoint: str, what: str, local: bool | None = None, unexpected_ok: bool = False):
    """``cls.from_pretrained(checkpoint)`` (a transformers model class; ``local``: a folder, read offline) with every
    weight accounted for: a checkpoint with weights missing (they would start random: a codec would give every
    utterance the same constant units), of the wrong shape, or (unless ``unexpected_ok``) unexpected is refused,
    naming them; a file that is no checkpoint (garbage, a pickle that torch refuses) is one line."""
    try:
        local = Path(checkpoint).is_dir() if local is None else local
        model, info = cls.from_pretrained(str(checkpoint), local_files_only=local, output_loading_info=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  safetensors' SafetensorError, torch's UnpicklingError, OSError, …
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"{checkpoint}: cannot load the {what} ({type(e).__name__}: {first})") from None
    checks = [("missing_keys", "missing"), ("mismatched_keys", "of the wrong shape")]
    for key, says in checks + ([] if unexpected_ok else [("unexpected_keys", "unexpected")]):
        names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in info.get(key) or ())
        if names:
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(f"{checkpoint}: not a whole {what}: {len(names)} weights {says} ({listed})")
    return model
