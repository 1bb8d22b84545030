"""``speechinstruct run RECIPE``: the whole job from one YAML recipe.

Stages: (demo corpus) → shard → extract → cluster → quantize → compose → publish → validate → report.
Each stage writes into its own folder under ``workdir`` and, when done, a stamp (``.stage.json``) with
the hash of its settings and of its inputs' stamps. A stage whose stamp matches is skipped; one whose
settings or inputs changed is cleared and redone; one that was interrupted resumes (every stage resumes
per shard on its own). ``${VAR}`` in the recipe is read from the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from . import __version__
from .io import sha256_file, sha256_json, write_json
from .recipe import RecipeError, load_recipe  # noqa: F401 (the recipe schema lives there)


class Runner:
    """Runs stages with stamps; prints one line per stage.

    A stage folder may already hold files that are not ours (``output.report`` pointed at a folder of the
    user's, say): they are listed as ``foreign`` in the stamp when the stage first claims the folder, and
    clearing the stage for a redo deletes everything but them."""

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
        finished = _read_stamp(done)
        stamp = finished or _read_stamp(pending)
        if not self.force and finished.get("hash") == digest:
            self._say(f"{label}: up to date")
            self.log.append({"stage": name, "skipped": True, **({"ran_seconds": finished["seconds"]} if "seconds" in finished else {})})
            return digest
        foreign = stamp["foreign"] if "foreign" in stamp else _files(out)  # first claim: whatever is there is not ours
        if stamp and (stamp.get("hash") != digest or self.force):
            _clear(out, keep=set(foreign))
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.rglob(".*.tmp-*"):  # half-written files of a killed run
            if leftover.is_file():
                leftover.unlink()
        done.unlink(missing_ok=True)
        write_json(pending, {"hash": digest, "foreign": foreign})
        self._say(f"{label} → {out}")
        started = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - started, 2)
        write_json(done, {"hash": digest, "settings": settings, "finished": True, "foreign": foreign, "seconds": seconds})
        pending.unlink()
        self.log.append({"stage": name, "seconds": seconds, "result": result})
        return digest

    def _say(self, line: str):
        print(line, flush=True)


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.is_dir() else []


def _clear(folder: Path, keep: set[str]) -> None:
    """Delete the stage's own files (everything but ``keep``), then the folders left empty."""
    for rel in _files(folder):
        if rel not in keep:
            (folder / rel).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()  # only empty ones go


@contextlib.contextmanager
def workdir_lock(work: Path):
    """One ``run`` per workdir at a time: a second one stops with one clear line instead of racing the
    first (its start-up clean-up would delete the other's temporary files)."""
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    lock = work / ".run.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RecipeError(f"{work}: another `speechinstruct run` is using this workdir "
                              f"({f.read().strip() or 'pid unknown'}); wait for it or choose another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(recipe_path: str | Path, workdir: str | Path | None = None, quiet: bool = False, force: bool = False) -> dict:
    """Run every stage of the recipe (see the module docstring); ``workdir`` overrides the recipe's, and the
    outputs (``output.dataset``/``report``, relative to the workdir) follow it."""
    recipe = load_recipe(recipe_path)
    work = Path(workdir or recipe["workdir"])
    with workdir_lock(work):
        return _run(recipe, recipe_path, work, quiet, force)


def _report_vocoder(setting: str, km_path: Path, features: str):
    """The vocoder the report resynthesises its samples with (see ``Output.vocoder``), or None."""
    from .vocoder import load_vocoder

    if setting == "none" or (setting == "auto" and (features != "mfcc" or not km_path.is_dir())):
        return None
    return load_vocoder(km_path if setting == "auto" else setting)


def _run(recipe: dict, recipe_path, work: Path, quiet: bool, force: bool) -> dict:
    from . import compose, templates
    from .cluster import cluster
    from .demo import make_demo_corpus
    from .extract import extract
    from .features import load_extractor, resolve_device
    from .publish import publish
    from .quantize import quantize
    from .report import report
    from .shard import shard_corpus
    from .tts import make_tts
    from .units import load_kmeans
    from .validate import format_report, validate

    # options a recipe leaves unset are the readers' defaults
    corpora = [{**c, "options": {k: v for k, v in c["options"].items() if v is not None}} for c in recipe["corpora"]]
    if recipe["demo_corpus"]:
        corpora.insert(0, {"name": "speechinstruct-demo", "root": str(work / "demo-corpus"), "options": {}})
    names = [c["name"] for c in corpora]
    runner = Runner(force=force)
    runner.total = bool(recipe["demo_corpus"]) + 3 * len(corpora) + (0 if recipe["kmeans"]["path"] else 1) + 3 + 1 + 2
    f, km_cfg, c_cfg = recipe["features"], recipe["kmeans"], recipe["compose"]
    device = resolve_device(f["device"])
    stamps: dict[str, str] = {}

    if recipe["demo_corpus"]:
        demo = {"sentences": 300, "seed": 0, **recipe["demo_corpus"]}
        stamps["demo"] = runner.stage("demo corpus", work / "demo-corpus", demo, [],
                                      lambda: make_demo_corpus(work / "demo-corpus", demo["sentences"], demo["seed"], quiet=quiet))

    extractor = None

    def get_extractor():
        nonlocal extractor
        if extractor is None:
            extractor = load_extractor(f["kind"], f["checkpoint"], f["layer"], device, dtype=f["dtype"])
        return extractor

    feature_settings = {k: f[k] for k in ("kind", "checkpoint", "layer", "float16")}
    if f["dtype"] != "float32":  # float32 stamps stay what they were
        feature_settings["dtype"] = f["dtype"]
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
        llm = LLM(base_url=llm_cfg["base_url"], model=llm_cfg["model"], cache_dir=work / "cache" / "llm",
                  max_requests=llm_cfg["max_requests"], max_tokens=llm_cfg["max_tokens"], timeout=llm_cfg["timeout"])
    stamps["chain_of_modality"] = runner.stage(
        "compose chain-of-modality", composed / "chain_of_modality",
        {**com, "seed": seed, "llm": {k: v for k, v in (recipe["llm"] or {}).items() if k not in ("max_requests", "timeout")}},
        [stamps["kmeans"], sha256_json(feature_settings)],
        lambda: _brief(compose.chain_of_modality(
            com["instructions"], composed / "chain_of_modality", get_extractor(), km,
            make_tts(com["tts"], work / "cache" / "tts", llm=llm),
            llm=llm if com["rewrite"] else None, all_formats=com["all_formats"], seed=seed,
            license=com["license"], max_pairs=com["max_pairs"], quiet=quiet)))

    dataset = work / (recipe["output"]["dataset"] or "dataset")  # relative outputs follow the workdir
    report_dir = work / (recipe["output"]["report"] or "report")
    inputs = [stamps["cross_modal"], stamps["pretrain"], stamps["chain_of_modality"]]
    eval_splits = bool(recipe["output"]["eval_splits"])
    stamps["publish"] = runner.stage("publish", dataset, {"name": recipe["name"], "eval_splits": eval_splits}, inputs,
                                     lambda: _brief(publish(composed, dataset, name=recipe["name"], eval_splits=eval_splits)))
    runner.index += 1
    verdict = validate(dataset)
    print(f"[{runner.index}/{runner.total}] validate: {'PASS' if verdict.ok else 'FAIL'}", flush=True)
    if not verdict.ok:
        print(format_report(verdict), flush=True)
    vocoder = _report_vocoder(recipe["output"]["vocoder"], km_path, f["kind"])
    runner.stage("report", report_dir, {"vocoder": vocoder.source if vocoder else None, "samples": 4}, [stamps["publish"]],
                 lambda: _brief(report(dataset, report_dir, units=work / names[0] / "units", vocoder=vocoder, samples=4,
                                       work=work, stages=runner.log, verdict=verdict)))

    meta = json.loads((dataset / "speechinstruct.json").read_text())
    summary = {
        "dataset": str(dataset), "report": str(report_dir / "index.html"), "valid": verdict.ok,
        "hours": meta["hours"], "records": meta["counts"], "k": meta["k"],
        "stages_skipped": sum(1 for s in runner.log if s.get("skipped")),
        "seconds": round(sum(s.get("seconds", 0) for s in runner.log), 2),
    }
    numbers = json.loads((report_dir / "report.json").read_text()) if (report_dir / "report.json").is_file() else {}
    if "resynthesis_mcd_db" in numbers:  # how close the report's resynthesised samples are to the originals
        summary["resynthesis"] = {"vocoder": numbers["vocoder"], "mcd_db": numbers["resynthesis_mcd_db"],
                                  "samples": numbers["samples"]}
    write_json(work / "run-summary.json", {**summary, "stages": runner.log})
    return summary


def _brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("skipped_examples", "dropped_examples", "histogram")}
