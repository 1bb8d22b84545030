"""The package's import graph, read from its own imports (module-level and inside functions): no cycles, so a
module can be read knowing only those below it, and no import runs back up the pipeline."""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "speechinstruct"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                for target in [base, *(f"{base}.{a.name}" for a in node.names)]:
                    if target in modules and target != name:
                        edges[name].add(target)
    return {name: edges[name] for name in modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycles():
    edges = import_graph()
    assert len(edges) > 50 and sum(map(len, edges.values())) > 200  # the graph is really read
    assert cycles(edges) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]  # and a cycle would be seen


PIPELINE = ("judges", "sources", "units", "curate", "compose", "release", "model")  # the subpackages, in order
JOB = {"speechinstruct.cli", "speechinstruct.pipeline", "speechinstruct.recipe"}     # the top: may import anything


def floor(module: str) -> int:
    """0: the ground floor (the package's own top-level modules); 1…: the subpackages in pipeline order."""
    parts = module.split(".")
    if module in JOB:
        return len(PIPELINE) + 1
    return PIPELINE.index(parts[1]) + 1 if len(parts) > 2 or (len(parts) == 2 and parts[1] in PIPELINE) else 0


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a module to a later floor: the ground floor importing a subpackage, a stage importing a later
    stage; anything importing the job's modules, except the recipe (every stage reads its defaults there)."""
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if a not in JOB and floor(b) > floor(a) and b != "speechinstruct.recipe")


def test_no_import_runs_back_up_the_pipeline():
    edges = import_graph()
    assert {m.split(".")[1] for m in edges if m.count(".") >= 2} >= set(PIPELINE)  # the floors are really there
    assert upward(edges) == []
    assert upward({"speechinstruct.io": {"speechinstruct.units.kmeans"},  # and one would be seen
                   "speechinstruct.units.extract": {"speechinstruct.release.report", "speechinstruct.judges.asr"},
                   "speechinstruct.release.report": {"speechinstruct.units.vocoder"}}) == [
        "speechinstruct.io -> speechinstruct.units.kmeans", "speechinstruct.units.extract -> speechinstruct.release.report"]


def test_modules_moved_out_of_the_flat_package_are_still_importable_by_their_old_names(tmp_path):
    """``speechinstruct.extract`` is ``speechinstruct.units.extract`` (the same object: patching either patches
    both), with a DeprecationWarning; the split ``score`` module is a view of the modules it became."""
    import subprocess
    import sys

    code = """
import warnings
warnings.simplefilter("error")
import speechinstruct.units.extract as new
import speechinstruct.sources.corpora.hf as new_hf
import speechinstruct.judges.judge as judge
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as said:
    import speechinstruct.extract as old
    from speechinstruct.corpora.hf import local_folder
    from speechinstruct.score import Gates, Judge, score
    from speechinstruct import features
assert old is new and local_folder is new_hf.local_folder and Judge is judge.Judge and features.MFCC
assert old.__spec__.name == "speechinstruct.units.extract", old.__spec__.name
assert len([w for w in said if issubclass(w.category, DeprecationWarning)]) == 5  # corpora, then corpora.hf, [str(w.message) for w in said]
print(said[0].message)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "speechinstruct.extract is now speechinstruct.units.extract" in done.stdout


def test_no_stage_takes_quiet():
    """Logging decides what is shown: only the command line's ``-q`` option is named ``quiet``."""
    takers = [f"{path.name}:{node.name}" for path in PACKAGE.rglob("*.py") if path.name != "cli.py"
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              and "quiet" in [a.arg for a in node.args.args + node.args.kwonlyargs]]
    assert takers == []


def test_progress_bars_follow_the_log_level(librispeech_root, tmp_path, capsys):
    import logging

    from typer.testing import CliRunner

    from speechinstruct.cli import app
    from speechinstruct.sources.shard import shard_corpus

    runner = CliRunner()
    shown = runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "librispeech chapters" in shown.stderr and "100%" in shown.stderr
    quiet = runner.invoke(app, ["shard", "librispeech", str(librispeech_root), str(tmp_path / "b"), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "librispeech chapters" not in quiet.stderr
    logger = logging.getLogger("speechinstruct")
    level, handlers = logger.level, logger.handlers[:]
    try:  # a library call with logging as Python leaves it (warnings only): no bar
        logger.setLevel(logging.NOTSET)
        logger.handlers.clear()
        capsys.readouterr()
        shard_corpus("librispeech", librispeech_root, tmp_path / "c")
        assert "librispeech chapters" not in capsys.readouterr().err
        logger.setLevel(logging.INFO)  # a user who asks for the stages' lines gets the bars too
        shard_corpus("librispeech", librispeech_root, tmp_path / "d")
        assert "librispeech chapters" in capsys.readouterr().err
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers


def test_each_record_kind_is_one_module_with_its_composer_and_its_rule():
    """kinds.RECORD_KINDS: every kind has compose/{kind}.py holding a composer named for it; the kinds whose
    schema cannot say everything hold ``record_errors`` there, which validate applies (and nothing else does)."""
    import importlib

    from speechinstruct.kinds import RECORD_KINDS
    from speechinstruct.release.validate import kind_rule

    for name in RECORD_KINDS:
        module = importlib.import_module(f"speechinstruct.compose.{name}")
        assert callable(getattr(module, name)), name
        assert kind_rule(name) is getattr(module, "record_errors", None)
    assert {n for n in RECORD_KINDS if kind_rule(n)} == {"cross_modal", "chain_of_modality", "dialogue", "interleaved",
                                                         "duplex"}
    assert kind_rule("units") is None and kind_rule("manifest") is None


def test_each_stage_takes_its_recipe_section():
    """A stage's settings come as its recipe section (``cfg``), declared once in recipe.py: no stage declares one
    of them again as a parameter of its own; the CLI builds the section from its options (checked as a recipe
    is), and ``run`` passes the recipe's."""
    import importlib
    import inspect

    from speechinstruct import recipe

    stages = {"sources.shard:shard_corpus": "Shard", "units.extract:extract": "Features",
              "units.engine_ray:extract_ray": "Features", "units.cluster:cluster": "KMeans",
              "curate.dedup:dedup": "Dedup", "compose.cross_modal:cross_modal": "CrossModal",
              "compose.pretrain:pretrain": "Pretrain", "compose.chain_of_modality:chain_of_modality": "ChainOfModality",
              "compose.dialogue:dialogue": "Dialogue", "compose.interleaved:interleaved": "Interleaved",
              "compose.duplex:duplex": "Duplex", "release.publish:publish": "Output"}
    for target, section in stages.items():
        module, name = target.split(":")
        parameters = inspect.signature(getattr(importlib.import_module(f"speechinstruct.{module}"), name)).parameters
        assert section in str(parameters["cfg"].annotation), target
        built = {"tts"}  # the engine, built from the section's tts and tts_model
        assert not (set(getattr(recipe, section).model_fields) & set(parameters)) - built, target
    from speechinstruct.model.train import TrainConfig
    assert TrainConfig is recipe.Train  # train's settings in the same idiom
