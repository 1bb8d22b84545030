"""``speechinstruct run RECIPE``: the whole job from one YAML recipe.

Stages: (demo corpus) → shard → extract → cluster → quantize → compose → publish → validate → report.
Each stage writes into its own folder under ``workdir`` and, when done, a stamp (``.stage.json``) with
the hash of its settings and of its inputs' stamps. A stage whose stamp matches is skipped; one whose
settings or inputs changed is cleared and redone; one that was interrupted resumes (every stage resumes
per shard on its own). ``${VAR}`` in the recipe is read from the environment.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from . import __version__
from .io import sha256_file, sha256_json, write_json

DEFAULTS = {
    "name": "SpeechInstruct",
    "workdir": None,                       # default: work/<recipe name>
    "demo_corpus": None,                   # {sentences, seed}: make the demo corpus (speechinstruct-demo) and use it
    "corpora": [],                         # [{name: librispeech|librilight|gigaspeech|commonvoice, root, options}]
    "shard": {"shard_hours": 10.0},
    "features": {"kind": "mfcc", "checkpoint": None, "layer": None, "device": "auto", "batch_seconds": 100.0,
                 "float16": False, "workers": 2},
    "kmeans": {"path": None, "k": 1000, "max_frames": 1_000_000, "seed": 0, "niter": 25, "nredo": 1},
    "templates": {"asr": "builtin", "tts": "builtin"},
    "llm": None,                           # {base_url, model, max_requests}; the key comes from $OPENAI_API_KEY
    "compose": {
        "seed": 0,
        "cross_modal": {"mode": "both", "asr_fraction": 0.5, "corpora": None},
        "pretrain": {"dev_fraction": 0.01, "corpora": None},
        "chain_of_modality": {"instructions": "builtin", "tts": "espeak", "rewrite": False, "max_pairs": None,
                              "all_formats": False, "license": "unspecified"},
    },
    "output": {"dataset": None, "report": None, "eval_splits": True},
}


class RecipeError(ValueError):
    pass


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _expand(value, path: Path, missing: set[str]):
    if isinstance(value, dict):
        return {k: _expand(v, path, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, path, missing) for v in value]
    if isinstance(value, str):
        for var in re.findall(r"\$\{(\w+)\}", value):
            if var not in os.environ:
                missing.add(var)
        return os.path.expandvars(value)
    return value


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read recipe ({e})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise RecipeError(f"{path}: unknown recipe keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    missing: set[str] = set()
    recipe = _expand(_merge(DEFAULTS, raw), path, missing)
    if missing:
        raise RecipeError(f"{path}: set the environment variable(s) {', '.join('$' + m for m in sorted(missing))} "
                          "(your corpus folders / checkpoint) before running this recipe")
    recipe["workdir"] = recipe["workdir"] or f"work/{path.stem}"
    problems = []
    if not recipe["corpora"] and not recipe["demo_corpus"]:
        problems.append("no corpora and no demo_corpus")
    for c in recipe["corpora"]:
        if c.get("name") not in ("librispeech", "librilight", "gigaspeech", "commonvoice"):
            problems.append(f"corpus {c.get('name')!r} is not one of librispeech, librilight, gigaspeech, commonvoice")
        elif not c.get("root") or not Path(c["root"]).is_dir():
            problems.append(f"{c['name']} root {c.get('root')!r} is not a folder")
    f = recipe["features"]
    if f["kind"] == "hubert" and not (f["checkpoint"] and Path(f["checkpoint"]).exists()):
        problems.append(f"features.checkpoint {f['checkpoint']!r} does not exist (a fairseq .pt or HF folder)")
    if recipe["kmeans"]["path"] and not Path(recipe["kmeans"]["path"]).exists():
        problems.append(f"kmeans.path {recipe['kmeans']['path']!r} does not exist")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    return recipe


class Runner:
    """Runs stages with stamps; prints one line per stage."""

    def __init__(self, force: bool = False):
        self.force = force
        self.log: list[dict] = []
        self.total = 0
        self.index = 0

    def stage(self, name: str, out: Path, settings: dict, inputs: list[str], fn) -> str:
        self.index += 1
        digest = sha256_json({"stage": name, "settings": settings, "inputs": inputs, "version": __version__})
        done, pending = out / ".stage.json", out / ".stage-pending.json"
        label = f"[{self.index}/{self.total}] {name}"
        if not self.force and done.is_file() and json.loads(done.read_text()).get("hash") == digest:
            self._say(f"{label}: up to date")
            self.log.append({"stage": name, "skipped": True})
            return digest
        stale = (done.is_file() and json.loads(done.read_text()).get("hash") != digest) or \
                (pending.is_file() and json.loads(pending.read_text()).get("hash") != digest) or self.force
        if stale and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.rglob(".*.tmp-*"):  # half-written files of a killed run
            if leftover.is_file():
                leftover.unlink()
        if done.is_file():
            done.unlink()
        write_json(pending, {"hash": digest})
        self._say(f"{label} → {out}")
        started = time.perf_counter()
        result = fn()
        write_json(done, {"hash": digest, "settings": settings, "finished": True})
        pending.unlink()
        self.log.append({"stage": name, "seconds": round(time.perf_counter() - started, 2), "result": result})
        return digest

    def _say(self, line: str):
        print(line, flush=True)


def run(recipe_path: str | Path, workdir: str | Path | None = None, quiet: bool = False, force: bool = False) -> dict:
    from . import compose, templates
    from .cluster import cluster
    from .demo import make_demo_corpus
    from .extract import extract
    from .features import load_extractor
    from .publish import publish
    from .quantize import quantize
    from .report import report
    from .shard import shard_corpus
    from .tts import make_tts
    from .units import load_kmeans
    from .validate import format_report, validate

    recipe = load_recipe(recipe_path)
    work = Path(workdir or recipe["workdir"])
    corpora = [dict(c) for c in recipe["corpora"]]
    if recipe["demo_corpus"]:
        corpora.insert(0, {"name": "speechinstruct-demo", "root": str(work / "demo-corpus"), "options": {}})
    names = [c["name"] for c in corpora]
    if len(set(names)) != len(names):
        raise RecipeError(f"{recipe_path}: each corpus kind may appear once (got {names})")
    runner = Runner(force=force)
    runner.total = bool(recipe["demo_corpus"]) + 3 * len(corpora) + (0 if recipe["kmeans"]["path"] else 1) + 3 + 1 + 2
    f, km_cfg, c_cfg = recipe["features"], recipe["kmeans"], recipe["compose"]
    device = f["device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    stamps: dict[str, str] = {}

    if recipe["demo_corpus"]:
        demo = {"sentences": 300, "seed": 0, **recipe["demo_corpus"]}
        stamps["demo"] = runner.stage("demo corpus", work / "demo-corpus", demo, [],
                                      lambda: make_demo_corpus(work / "demo-corpus", demo["sentences"], demo["seed"], quiet=quiet))

    extractor = None

    def get_extractor():
        nonlocal extractor
        if extractor is None:
            extractor = load_extractor(f["kind"], f["checkpoint"], f["layer"], device)
        return extractor

    feature_settings = {k: f[k] for k in ("kind", "checkpoint", "layer", "float16")}
    if f["checkpoint"] and Path(f["checkpoint"]).is_file():  # a replaced checkpoint redoes extraction
        st = Path(f["checkpoint"]).stat()
        feature_settings["checkpoint_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    for c in corpora:
        n = c["name"]
        base = work / n
        stamps[f"shard:{n}"] = runner.stage(
            f"shard {n}", base / "manifest", {"corpus": n, "root": str(Path(c["root"]).resolve()), **recipe["shard"], **(c.get("options") or {})},
            [stamps.get("demo", "")] if n == "speechinstruct-demo" else [],
            lambda c=c, base=base: _brief(shard_corpus(c["name"], c["root"], base / "manifest", quiet=quiet,
                                                       shard_hours=recipe["shard"]["shard_hours"], **(c.get("options") or {}))))
        stamps[f"extract:{n}"] = runner.stage(
            f"extract {n} ({f['kind']})", base / "features", feature_settings, [stamps[f"shard:{n}"]],
            lambda base=base: extract(base / "manifest", base / "features", get_extractor(), batch_seconds=f["batch_seconds"],
                                      float16=f["float16"], workers=f["workers"], quiet=quiet))

    if km_cfg["path"]:
        km_path = Path(km_cfg["path"])
        stamps["kmeans"] = sha256_file(km_path / "centroids.npy" if km_path.is_dir() else km_path)
    else:
        km_path = work / "kmeans"
        fit_settings = {k: km_cfg[k] for k in ("k", "max_frames", "seed", "niter", "nredo")}
        first = names[0]
        stamps["kmeans"] = runner.stage(f"cluster (k={km_cfg['k']}, on {first})", km_path, fit_settings, [stamps[f"extract:{first}"]],
                                        lambda: cluster(work / first / "features", km_path, quiet=quiet, **fit_settings))
    for n in names:
        stamps[f"units:{n}"] = runner.stage(
            f"quantize {n}", work / n / "units", {}, [stamps[f"extract:{n}"], stamps["kmeans"]],
            lambda n=n: quantize(work / n / "features", load_kmeans(km_path), work / n / "units", quiet=quiet))
    km = load_kmeans(km_path)

    composed = work / "composed"
    seed = c_cfg["seed"]
    cm = c_cfg["cross_modal"]
    cm_corpora = cm.get("corpora") or [n for n in names if n != "librilight"]
    sets = {t: templates.load(recipe["templates"][t], t) for t in ("asr", "tts")}
    stamps["cross_modal"] = runner.stage(
        "compose cross-modal", composed / "cross_modal",
        {"mode": cm["mode"], "asr_fraction": cm["asr_fraction"], "seed": seed, "corpora": cm_corpora,
         "templates": {t: sets[t]["version"] for t in sets}}, [stamps[f"units:{n}"] for n in cm_corpora],
        lambda: [compose.cross_modal(work / n / "units", composed / "cross_modal", sets["asr"], sets["tts"], mode=cm["mode"],
                                     asr_fraction=cm["asr_fraction"], seed=seed, part=n, quiet=quiet) for n in cm_corpora])
    pt = c_cfg["pretrain"]
    pt_corpora = pt.get("corpora") or names
    stamps["pretrain"] = runner.stage(
        "compose pretrain", composed / "pretrain", {"dev_fraction": pt["dev_fraction"], "seed": seed, "corpora": pt_corpora},
        [stamps[f"units:{n}"] for n in pt_corpora],
        lambda: [compose.pretrain(work / n / "units", composed / "pretrain", pt["dev_fraction"], seed=seed, part=n, quiet=quiet)
                 for n in pt_corpora])
    com = c_cfg["chain_of_modality"]
    llm = None
    if recipe["llm"] and (com["rewrite"] or com["tts"] == "openai"):
        from .llm import LLM

        llm_cfg = recipe["llm"]
        llm = LLM(base_url=llm_cfg.get("base_url"), model=llm_cfg.get("model", "gpt-4o-mini"),
                  cache_dir=work / "cache" / "llm", max_requests=llm_cfg.get("max_requests"))
    stamps["chain_of_modality"] = runner.stage(
        "compose chain-of-modality", composed / "chain_of_modality",
        {**com, "seed": seed, "llm": {k: v for k, v in (recipe["llm"] or {}).items() if k != "max_requests"}},
        [stamps["kmeans"], sha256_json(feature_settings)],
        lambda: _brief(compose.chain_of_modality(
            com["instructions"], composed / "chain_of_modality", get_extractor(), km,
            make_tts(com["tts"], work / "cache" / "tts", llm=llm),
            llm=llm if com["rewrite"] else None, all_formats=com["all_formats"], seed=seed,
            license=com["license"], max_pairs=com["max_pairs"], quiet=quiet)))

    dataset = Path(recipe["output"]["dataset"] or work / "dataset")
    report_dir = Path(recipe["output"]["report"] or work / "report")
    inputs = [stamps["cross_modal"], stamps["pretrain"], stamps["chain_of_modality"]]
    eval_splits = bool(recipe["output"]["eval_splits"])
    stamps["publish"] = runner.stage("publish", dataset, {"name": recipe["name"], "eval_splits": eval_splits}, inputs,
                                     lambda: _brief(publish(composed, dataset, name=recipe["name"], eval_splits=eval_splits)))
    runner.index += 1
    verdict = validate(dataset)
    print(f"[{runner.index}/{runner.total}] validate: {'PASS' if verdict.ok else 'FAIL'}", flush=True)
    if not verdict.ok:
        print(format_report(verdict), flush=True)
    runner.stage("report", report_dir, {}, [stamps["publish"]], lambda: _brief(report(dataset, report_dir)))

    meta = json.loads((dataset / "speechinstruct.json").read_text())
    summary = {
        "dataset": str(dataset), "report": str(report_dir / "index.html"), "valid": verdict.ok,
        "hours": meta["hours"], "records": meta["counts"], "k": meta["k"],
        "stages_skipped": sum(1 for s in runner.log if s.get("skipped")),
        "seconds": round(sum(s.get("seconds", 0) for s in runner.log), 2),
    }
    write_json(work / "run-summary.json", {**summary, "stages": runner.log})
    return summary


def _brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("skipped_examples", "dropped_examples", "histogram")}
