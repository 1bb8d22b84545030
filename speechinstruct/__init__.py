"""speechinstruct: build SpeechInstruct-style cross-modal speech-instruction datasets (SpeechGPT).

The package reads in pipeline order: ``judges`` (the models that judge speech), ``sources`` (shard), ``units``
(extract, cluster, quantize), ``curate`` (score, dedup), ``compose`` (one module per record kind), ``release``
(publish, validate, report) and ``model`` (train, chat), over a ground floor of modules every stage may read (files,
audio, the folder contract, record schemas, SpeechGPT's format). Modules that lived at the top of the flat package are
still importable by their old names (``speechinstruct.extract`` is ``speechinstruct.units.extract``, the same module
object), with a DeprecationWarning, for one release.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

MOVED = {  # the old module -> where it lives now
    "alignments": "sources.alignments", "corpora": "sources.corpora", "decoding": "sources.decoding",
    "demo": "sources.demo", "shard": "sources.shard", "storage": "sources.storage", "tts": "sources.tts",
    "vad": "sources.vad",
    "onnx_graph": "judges.onnx_graph", "speakers": "judges.speakers",
    "cluster": "units.cluster", "codecs": "units.codecs", "engine_ray": "units.engine_ray", "extract": "units.extract",
    "features": "units.features", "quantize": "units.quantize", "tokenizer": "units.tokenizer",
    "vocoder": "units.vocoder",
    "dedup": "curate.dedup",
    "dialogue": "compose.dialogue", "duplex": "compose.duplex", "interleaved": "compose.interleaved",
    "templates": "compose.templates",
    "publish": "release.publish", "report": "release.report", "validate": "release.validate",
    "chat": "model.chat", "train": "model.train",
}
SPLIT = {  # an old module split in several: its names are looked up in these, in order
    "score": ("curate.score", "judges", "judges.dnsmos", "judges.asr", "judges.gates", "judges.judge"),
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``speechinstruct.<old>[.sub]`` as the module that now holds it (the same object, so that patching either
    name patches both); a split module as a view of the modules it became."""

    def __init__(self):
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        head = fullname.split(".")[1] if fullname.startswith(__name__ + ".") else None
        if head in MOVED or (head in SPLIT and fullname == f"{__name__}.{head}"):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name[len(__name__) + 1:]
        head, _, rest = old.partition(".")
        if head in SPLIT:
            new = f"{__name__}.{{{', '.join(SPLIT[head])}}}"
            module = _SplitModule(spec.name, [f"{__name__}.{m}" for m in SPLIT[head]])
        else:
            new = f"{__name__}.{MOVED[head]}" + (f".{rest}" if rest else "")
            module = importlib.import_module(new)
            self._specs[spec.name] = module.__spec__  # by old name: another thread may import another meanwhile
        warnings.warn(f"{spec.name} is now {new}; the old name goes in the next release", DeprecationWarning,
                      stacklevel=3)
        return module

    def exec_module(self, module):
        if not isinstance(module, _SplitModule):  # the import system stamped the old name's spec on it: put it back
            module.__spec__ = self._specs.pop(module.__spec__.name)


class _SplitModule(type(sys)):
    def __init__(self, name, modules):
        super().__init__(name)
        self._modules = modules

    def __getattr__(self, name):
        for module in self._modules:
            found = getattr(importlib.import_module(module), name, _OldNames)
            if found is not _OldNames:
                return found
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


sys.meta_path.insert(0, _OldNames())
