"""``speechinstruct run RECIPE``: the whole job from one YAML recipe.

Stages: (demo corpus) → shard → (score) → extract → cluster → quantize → compose → publish → validate → report.
With a ``quality`` section, each corpus's utterances are scored (DNSMOS, ASR round trip) and compose drops
those below its thresholds, and the speech it synthesises too.
Each stage writes into its own folder under ``workdir`` and, when done, a stamp (``.stage.json``) with
the hash of its settings and of its inputs' stamps. A stage whose stamp matches is skipped; one whose
settings or inputs changed is cleared and redone; one that was interrupted resumes (every stage resumes
per shard on its own). A workdir moved or copied since its last run is relocated first (:func:`relocate`).
``${VAR}`` in the recipe is read from the environment.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from . import __version__, recipe as sections
from .io import files_state, remove_stale_temps, sha256_file, sha256_json, write_json
from .kinds import RECORD_KINDS
from .recipe import RecipeError, load_recipe  # noqa: F401 (the recipe schema lives there)
from .sources.corpora import SOURCES
from .tokenizers import CODECS

log = logging.getLogger(__name__)


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
        remove_stale_temps(out, recursive=True)  # half-written files of a killed run
        done.unlink(missing_ok=True)
        write_json(pending, {"hash": digest, "foreign": foreign})
        why = ("--force" if self.force else _why(finished, settings, inputs)) if finished else None
        self._say(f"{label} → {out}" + (f" (again: {why})" if why else ""))
        started = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - started, 2)
        write_json(done, {"hash": digest, "settings": settings, "inputs": inputs, "finished": True, "foreign": foreign,
                          "seconds": seconds})
        pending.unlink()
        self.log.append({"stage": name, "seconds": seconds, **({"again": why} if why else {}), "result": result})
        return digest

    def _say(self, line: str):
        log.info(line)


def _why(stamp: dict, settings: dict, inputs: list[str]) -> str:
    """Why a finished stage is done again, from its stamp: the settings that changed (names only: a value may be a
    secret), its inputs (a stage before it redone, a corpus changed), or another version of speechinstruct."""
    old, new = stamp.get("settings"), json.loads(json.dumps(settings))
    if isinstance(old, dict) and old != new:
        return "its settings changed: " + ", ".join(sorted(k for k in {*old, *new} if old.get(k) != new.get(k)))
    if "inputs" not in stamp:  # written before stamps kept them
        return "its input or speechinstruct's version changed"
    return "its input changed" if stamp["inputs"] != inputs else "speechinstruct's version changed"


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


LOCK_WAIT = 30.0  # seconds a lock left by a killed run's still-exiting child processes is waited for


@contextlib.contextmanager
def workdir_lock(work: Path):
    """One ``run`` per workdir at a time: a second one stops with one clear line instead of racing the
    first (its start-up clean-up would delete the other's temporary files). A lock whose run is gone but which
    a process it started still holds (forked processes inherit it) is waited for, ``LOCK_WAIT`` seconds."""
    import fcntl
    import socket

    work.mkdir(parents=True, exist_ok=True)
    lock = work / ".run.lock"
    with open(lock, "a+") as f:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "pid unknown"
            if not _gone(owner):
                raise RecipeError(f"{work}: another `speechinstruct run` is using this workdir ({owner}); "
                                  "wait for it or choose another --workdir") from None
            if time.monotonic() > deadline:
                raise RecipeError(f"{work}: the run that locked this workdir ({owner}) has ended, but a process "
                                  f"it started still holds the lock after {LOCK_WAIT:.0f} s; end that process "
                                  f"(fuser {lock}) or choose another --workdir") from None
            time.sleep(0.1)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stage_folder(folder: Path) -> None:
    """An optional stage's folder left by an earlier run whose recipe had the stage on (its ``.stage.json`` says
    a stage wrote it), so that publish does not take it; a folder no stage wrote is left alone."""
    if (folder / ".stage.json").is_file():
        shutil.rmtree(folder)


def _gone(owner: str) -> bool:
    """Whether the run a lock file names (``pid N on HOST``) ran on this host and no longer runs."""
    import re
    import socket

    found = re.fullmatch(r"pid (\d+) on (\S+)", owner)
    if not found or found[2] != socket.gethostname():
        return False  # another host's process cannot be seen from here
    try:
        os.kill(int(found[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run(recipe_path: str | Path, workdir: str | Path | None = None, force: bool = False) -> dict:
    """Run every stage of the recipe (see the module docstring); ``workdir`` overrides the recipe's, and the
    outputs (``output.dataset``/``report``, relative to the workdir) follow it."""
    recipe = load_recipe(recipe_path)
    for line in recipe["inferred"]:
        log.warning("%s: inferred %s", recipe_path, line)
    work = Path(workdir or recipe["workdir"])
    if work.exists() and not work.is_dir():
        raise NotADirectoryError(f"{work}: the workdir is a file, not a folder: give --workdir a folder (it is created)")
    check_outside_corpora(recipe, work)
    with workdir_lock(work):
        relocate(work)
        return _run(recipe, work, force)


def check_outside_corpora(recipe: dict, work: Path) -> None:
    """One line when the workdir is inside a corpus's root folder (or its ``audio_root``): the run's outputs
    (manifests, the report's audio) would be read as part of the corpus at the next run, and each run would change
    the files the shard stage's stamp holds, so that every run sharded it again."""
    from .sources.storage import is_url

    for number, corpus in enumerate(recipe["corpora"]):
        audio_root = (corpus.get("options") or {}).get("audio_root")
        for key, folder in (("root", corpus["root"]), ("options.audio_root", audio_root)):
            if (isinstance(folder, str) and folder and not is_url(folder) and Path(folder).is_dir()
                    and work.resolve().is_relative_to(Path(folder).resolve())):
                raise RecipeError(f"corpora[{number}].{key}: {folder} holds the workdir {work}: the run's outputs "
                                  "would be read as the corpus; give a workdir outside it (--workdir)")


WHERE = ".workdir.json"  # where the workdir was when a run last used it: {"path": absolute}


def relocate(work: Path) -> list[Path]:
    """A workdir moved or copied since a run last used it (``.workdir.json`` says where that was): the paths its
    stages recorded in their JSON files (a manifest's corpus root, the manifest and k-means a units folder was made
    from, the units and scores folders compose read) are rewritten from the old place to the new, as conda
    relocates an environment's prefix. Its stages are then up to date where it lands, and one redone there reads
    the files beside it, never the old place's (a copy's original may still be there). Files a stage found in its
    folder and did not write (its stamp's ``foreign``) are left alone, as are paths outside the workdir (a corpus
    root elsewhere stays where it is). Returns the files rewritten."""
    here = str(work.resolve())
    was = _read_stamp(work / WHERE).get("path")
    rewritten: list[Path] = []
    if isinstance(was, str) and was not in (here, "/") and Path(was).is_absolute():
        files = _json_files(work)
        stamps = [p for p in files if p.name in (".stage.json", ".stage-pending.json")]
        foreign = {p.parent / rel for p in stamps for rel in _read_stamp(p).get("foreign") or [] if isinstance(rel, str)}
        for path in files:
            if path in foreign or path == work / WHERE:
                continue
            try:
                text = path.read_text(encoding="utf-8")
                if was not in text and was.isascii():
                    continue
                value = json.loads(text)
            except (OSError, ValueError):
                continue  # not one of ours as a stage left it: the stage that reads it says so
            moved = _moved(value, was, here)
            if moved != value:
                write_json(path, moved)
                rewritten.append(path)
        log.info("%s: moved here from %s since its last run; %d files name the new place", work, was, len(rewritten))
    write_json(work / WHERE, {"path": here})
    return rewritten


def _json_files(work: Path) -> list[Path]:
    """The JSON files under ``work``, no link followed (a link names something elsewhere, which did not move)."""
    found = []
    for folder, dirs, files in os.walk(work):
        found += [Path(folder) / f for f in files if f.endswith(".json") and not (Path(folder) / f).is_symlink()]
    return found


def _moved(value, was: str, here: str):
    """``value`` with every string that is the path ``was`` or a path under it moved under ``here``."""
    if isinstance(value, str):
        return here + value[len(was):] if value == was or value.startswith(was + os.sep) else value
    if isinstance(value, list):
        return [_moved(v, was, here) for v in value]
    if isinstance(value, dict):
        return {_moved(k, was, here): _moved(v, was, here) for k, v in value.items()}
    return value


def _report_vocoder(setting: str, km_path: Path, features: str):
    """The vocoder the report resynthesises its samples with (see ``Output.vocoder``), or None."""
    from .units.vocoder import load_vocoder

    if setting == "none" or (setting == "auto" and (features != "mfcc" or not km_path.is_dir())):
        return None
    return load_vocoder(km_path if setting == "auto" else setting)


def _run(recipe: dict, work: Path, force: bool) -> dict:
    job = Job(recipe, work, force)
    job.demo_corpus()
    for corpus in job.corpora:
        job.shard_and_extract(corpus)
    job.cluster_and_quantize()
    job.dedup()
    job.compose()
    verdict = job.publish_and_validate()
    job.report(verdict)
    return job.summary(verdict)


class Job:
    """One ``run``: the recipe, the workdir, the stage runner and each stage's stamp (``stamps``), which the
    stages after it take as inputs. Each method is one step of :func:`_run`, in order."""

    def __init__(self, recipe: dict, work: Path, force: bool):
        from .devices import resolve_device

        self.recipe, self.work = recipe, work
        # options a recipe leaves unset are the readers' defaults
        self.corpora = [{**c, "options": {k: v for k, v in c["options"].items() if v is not None}} for c in recipe["corpora"]]
        if recipe["demo_corpus"]:
            self.corpora.insert(0, {"name": "speechinstruct-demo", "root": str(work / "demo-corpus"), "options": {}})
        self.names = [c["name"] for c in self.corpora]
        # the corpora with transcripts, which cross-modal records are made of: raw recordings (`audio`) have
        # them when the recipe names an ASR model to transcribe them with
        self.transcribed = [c["name"] for c in self.corpora if SOURCES[c["name"]].transcripts or c["options"].get("asr")]
        self.runner = Runner(force=force)
        self.quality = recipe["quality"]
        self.scoring = bool(self.quality["dnsmos"] or self.quality["asr"] or self.quality["speaker"]
                            or self.quality["language"])
        self.runner.total = (bool(recipe["demo_corpus"]) + (3 + self.scoring) * len(self.corpora)
                             + (0 if recipe["kmeans"]["path"] else 1) + 3 + 1 + 2 + bool(recipe["compose"]["dialogue"])
                             + bool(recipe["compose"]["interleaved"]) + bool(recipe["dedup"])
                             + bool(recipe["compose"]["duplex"]))
        self._judge = None
        self.f = recipe["features"]
        # a codec (codecs.CODECS): extract writes its codes as the units; no cluster or quantize stage
        self.codec = self.f["kind"] in CODECS
        if self.codec and recipe["kmeans"]["path"]:
            raise RecipeError(f"kmeans.path: a {self.f['kind']} codec's codes are the units; leave the kmeans section out")
        if self.codec:
            self.runner.total -= len(self.corpora) + 1  # no quantize per corpus, no cluster
        # with a ray section, extract and score run on the cluster's actors, on features.device there (auto: cuda
        # where actors get GPUs); the driver's own work (quantize, compose's speech) on its GPU if it has one
        self.ray = recipe["ray"]
        self.device = resolve_device("auto" if self.ray and self.f["device"] != "cpu" else self.f["device"])
        if self.ray:  # joined now: Ray missing or a cluster that does not answer is one line before hours of shard
            from .units.engine_ray import connect

            connect(self.ray["address"])
        self.stamps: dict[str, str] = {}
        self._extractors: dict[str, object] = {}
        self.feature_settings = {k: self.f[k] for k in ("kind", "checkpoint", "layer", "float16")}
        if self.f["codebooks"] is not None:  # stamps without it stay as they were
            self.feature_settings["codebooks"] = self.f["codebooks"]
        if self.f["dtype"] != "float32":  # float32 stamps stay what they were
            self.feature_settings["dtype"] = self.f["dtype"]
        if self.f["checkpoint"] and Path(self.f["checkpoint"]).exists():  # a checkpoint file or folder replaced
            self.feature_settings["checkpoint_files"] = files_state(self.f["checkpoint"])  # redoes extraction
        # the run's own k-means by its absolute path, which the units' specs record (relocate rewrites it when the
        # workdir moves; resynth finds it from any folder)
        self.km_path = Path(recipe["kmeans"]["path"]) if recipe["kmeans"]["path"] else work.resolve() / "kmeans"
        self.composed = work / "composed"
        self.dataset = work / (recipe["output"]["dataset"] or "dataset")  # relative outputs follow the workdir
        self.report_dir = work / (recipe["output"]["report"] or "report")

    def extractor(self, device: str | None = None):
        """The recipe's extractor on ``device`` (the run's unless given), loaded once, when a stage first needs it
        (never when all are up to date)."""
        from .units.tokenizer import load_extractor

        device = device or self.device
        if device not in self._extractors:
            f = self.f
            self._extractors[device] = load_extractor(f["kind"], f["checkpoint"], f["layer"], device, dtype=f["dtype"],
                                                      codebooks=f["codebooks"])
        return self._extractors[device]

    def ray_options(self) -> dict:
        """extract_ray's and score_ray's cluster arguments, from the recipe's ray section."""
        r = self.ray
        return {"address": r["address"], "actors": r["actors"], "num_gpus_per_actor": r["num_gpus_per_actor"],
                "cpus_per_actor": r["cpus_per_actor"], "max_retries": r["max_retries"],
                "block_seconds": r["block_seconds"]}

    def tokenizer(self):
        """The recipe's speech tokenizer (tokenizer.py) for the stages that speak text: its codec, or its
        extractor and the k-means (the recipe's, or the one the cluster stage fitted)."""
        from .units.kmeans import SpeechEncoder, load_kmeans

        return self.extractor() if self.codec else SpeechEncoder(load_kmeans(self.km_path), self.extractor())

    def judge_options(self) -> dict:
        """``Judge.load``'s arguments but the device: the recipe's judges (``quality``: DNSMOS, ASR, speaker
        embeddings, language ID)."""
        q = self.quality
        return {"dnsmos": q["dnsmos"], "asr": q["asr"], "base_url": q["base_url"], "batch_size": q["batch_size"],
                "speaker": q["speaker"], "language": bool(q["language"]), "asr_dtype": q["asr_dtype"]}

    def judge(self):
        """The recipe's judges on the run's device, loaded once, when a stage first needs them."""
        from .judges.judge import Judge

        if self._judge is None:
            self._judge = Judge.load(**self.judge_options(), device=self.device)
        return self._judge

    def judge_settings(self) -> dict:
        """What the scores depend on, but the judges' model files (:meth:`model_folders`, the stages' inputs)."""
        q = self.quality
        settings = {k: q[k] for k in ("dnsmos", "asr", "base_url")}
        settings.update({k: q[k] for k in ("speaker", "language") if q[k]})  # only when on: older stamps stay valid
        return settings

    @staticmethod
    def files_of(*values) -> list[str]:
        """The state (:func:`io.files_state`) of the settings' values that name local files or folders (evaluation
        sets, instructions, conversations, template files, model folders), for a stage's inputs: one of them
        edited since redoes the stage. [] when none does (builtin sets, hub ids, model names), so stamps of such
        recipes stay as they were."""
        paths = [v for v in values if isinstance(v, str) and v and Path(v).exists()]
        return [files_state(*paths)] if paths else []

    def model_folders(self) -> list[str]:
        """The state of the judges' local model folders (an ASR folder, not a model name at ``base_url``; a speaker
        encoder's) when the recipe scores: the stages that score redo when one is replaced."""
        q = self.quality
        return self.files_of(None if q["base_url"] else q["asr"], q["speaker"]) if self.scoring else []

    def gates(self, synthesized: bool = False):
        from .judges.gates import Gates

        return Gates.of(self.quality, synthesized)

    def score_corpus(self, c: dict) -> None:
        from .curate.score import score, score_ray

        n, base = c["name"], self.work / c["name"]

        def scored():
            if self.ray:  # each actor loads the judges on its own device
                return score_ray(base / "manifest", base / "scores", self.judge_options(), device=self.f["device"],
                                 **self.ray_options())
            return score(base / "manifest", base / "scores", self.judge(), workers=self.f["workers"])

        if self.scoring:
            self.stamps[f"score:{n}"] = self.runner.stage(
                f"score {n}", base / "scores", self.judge_settings(), [self.stamps[f"shard:{n}"], *self.model_folders()],
                lambda: _brief(scored()))

    def scores_of(self, n: str) -> dict:
        """compose's arguments for corpus ``n``: its scores folder and the gates (none without a quality section)."""
        return {"scores": self.work / n / "scores", "gates": self.gates()} if self.scoring else {}

    def demo_corpus(self) -> None:
        from .sources.demo import make_demo_corpus

        if self.recipe["demo_corpus"]:
            demo = {"sentences": 300, "seed": 0, **self.recipe["demo_corpus"]}
            folder = self.work / "demo-corpus"
            self.stamps["demo"] = self.runner.stage("demo corpus", folder, demo, [], lambda: make_demo_corpus(
                folder, demo["sentences"], demo["seed"]))

    def root_setting(self, root: str) -> str:
        """A corpus root as the shard stage's stamp holds it: a URL as given; a folder inside the workdir (the demo
        corpus) relative to it, so that the workdir moved elsewhere is up to date (:func:`relocate`); else absolute."""
        from .sources.storage import is_url

        if is_url(root):
            return root
        path, work = Path(root).resolve(), self.work.resolve()
        return f"<workdir>/{path.relative_to(work).as_posix()}" if path.is_relative_to(work) else str(path)

    def shard_options(self, c: dict) -> dict:
        """A corpus's options for shard_corpus: with a `ray` section, raw recordings are cut by Ray tasks on the
        cluster (unless the corpus says `engine: local`)."""
        options = dict(c.get("options") or {})
        if self.ray and c["name"] == "audio" and options.get("engine") is None:
            options.update(engine="ray", ray_address=self.ray["address"])
        return options

    def shard_and_extract(self, c: dict) -> None:
        from .sources.shard import corpus_state, read_something, shard_corpus
        from .units.engine_ray import extract_ray
        from .units.extract import extract

        n, base, shard, f = c["name"], self.work / c["name"], self.recipe["shard"], self.f
        self.stamps[f"shard:{n}"] = self.runner.stage(
            f"shard {n}", base / "manifest", {"corpus": n, "root": self.root_setting(c["root"]), **shard,
                                              **{k: v for k, v in (c.get("options") or {}).items()
                                                 if k not in sections.RUN_ONLY_OPTIONS}},
            # the corpus as it is now: files added or written again since the last run shard it again
            [*([self.stamps.get("demo", "")] if n == "speechinstruct-demo" else []),
             corpus_state(n, c["root"], c.get("options")), *self.files_of((c.get("options") or {}).get("asr"))],
            lambda: _brief(read_something(shard_corpus(c["name"], c["root"], base / "manifest", sections.Shard(**shard),
                                                       **self.shard_options(c)), base / "manifest",
                                                          "the recipe's `splits` option")))
        self.score_corpus(c)
        target = base / ("units" if self.codec else "features")  # a codec's extract writes the units
        self.stamps[f"extract:{n}"] = self.runner.stage(
            f"extract {n} ({f['kind']})", target, self.feature_settings, [self.stamps[f"shard:{n}"]],
            # on Ray, the extractor goes to the actors from the CPU (they move it to features.device)
            lambda: extract_ray(base / "manifest", target, self.extractor("cpu"), sections.Features(**f),
                                **self.ray_options()) if self.ray
            else extract(base / "manifest", target, self.extractor(), sections.Features(**f)))
        if self.codec:
            self.stamps[f"units:{n}"] = self.stamps[f"extract:{n}"]

    def cluster_and_quantize(self) -> None:
        from .units.cluster import cluster
        from .units.kmeans import load_kmeans
        from .units.quantize import quantize

        km_cfg, work = self.recipe["kmeans"], self.work
        if self.codec:
            self.stamps["kmeans"] = ""
            return
        if km_cfg["path"]:
            self.stamps["kmeans"] = sha256_file(self.km_path / "centroids.npy" if self.km_path.is_dir() else self.km_path)
        else:
            fit = sections.KMeans(**km_cfg)
            first = self.names[0]
            self.stamps["kmeans"] = self.runner.stage(
                f"cluster (k={fit.k}, on {first})", self.km_path, fit.model_dump(exclude={"path"}),
                [self.stamps[f"extract:{first}"]], lambda: cluster(work / first / "features", self.km_path, fit))
        for n in self.names:
            self.stamps[f"units:{n}"] = self.runner.stage(
                f"quantize {n}", work / n / "units", {}, [self.stamps[f"extract:{n}"], self.stamps["kmeans"]],
                lambda n=n: quantize(work / n / "features", load_kmeans(self.km_path).to(self.device), work / n / "units"))

    def units_dir(self, n: str) -> Path:
        """The units folder compose reads for corpus ``n``: dedup's output when the recipe has a dedup section."""
        return self.work / n / ("dedup" if self.recipe["dedup"] else "units")

    def dedup(self) -> None:
        """Repeats and evaluation data out of every corpus's units, all corpora together (``recipe.dedup``); the
        stamps of the units compose reads become dedup's."""
        from .curate.dedup import dedup, eval_source

        cfg = self.recipe["dedup"]
        if not cfg:
            _remove_stage_folder(self.work / "dedup")
            for n in self.names:  # its outputs, when an earlier run's recipe had the stage (dedup.json says so)
                if (self.work / n / "dedup" / "dedup.json").is_file():
                    shutil.rmtree(self.work / n / "dedup")
            return
        scored = [self.stamps[f"score:{n}"] for n in self.names] if self.scoring else []
        stamp = self.runner.stage(
            "dedup", self.work / "dedup", cfg, [self.stamps[f"units:{n}"] for n in self.names] + scored
            + self.files_of(*(str(eval_source(e)[1]) for e in cfg["eval"])),
            lambda: _brief(dedup([self.work / n / "units" for n in self.names], [self.units_dir(n) for n in self.names],
                                 sections.Dedup(**cfg),
                                 scores=[self.work / n / "scores" if self.scoring else None for n in self.names])))
        for n in self.names:
            self.stamps[f"units:{n}"] = stamp
        self.stamps["dedup"] = stamp

    @functools.cached_property
    def eval_texts(self):
        """What composed instructions and dialogues are held to when the recipe has a dedup section: its ``eval``
        sets and every corpus's validation and test transcripts (None without one); read once, when a compose stage
        that needs them first runs."""
        from .curate.dedup import eval_texts

        cfg = self.recipe["dedup"]
        if not cfg:
            return None
        return eval_texts(cfg["eval"], [self.work / n / "units" for n in self.names], cfg["eval_ngram"])

    def compose(self) -> None:
        from .compose import templates
        from .compose.chain_of_modality import chain_of_modality
        from .compose.cross_modal import cross_modal
        from .compose.pretrain import pretrain
        from .sources.tts import make_tts

        recipe, work, composed = self.recipe, self.work, self.composed
        c_cfg = recipe["compose"]
        seed, cm = c_cfg["seed"], c_cfg["cross_modal"]
        cm_corpora = cm.get("corpora") or self.transcribed
        sets = {t: templates.load(recipe["templates"][t], t) for t in ("asr", "tts")}
        gated = {"quality": asdict(self.gates())} if self.scoring else {}  # stamps without quality stay as they were
        scored = lambda names: [self.stamps[f"score:{n}"] for n in names] if self.scoring else []  # noqa: E731
        self.stamps["cross_modal"] = self.runner.stage(
            "compose cross-modal", composed / "cross_modal",
            {"mode": cm["mode"], "asr_fraction": cm["asr_fraction"], "seed": seed, "corpora": cm_corpora,
             "templates": {t: sets[t]["version"] for t in sets}, **gated},
            [self.stamps[f"units:{n}"] for n in cm_corpora] + scored(cm_corpora)
            + self.files_of(recipe["templates"]["asr"], recipe["templates"]["tts"]),
            lambda: [cross_modal(self.units_dir(n), composed / "cross_modal", sets["asr"], sets["tts"],
                                 sections.CrossModal(**cm), seed=seed, part=n, **self.scores_of(n))
                     for n in cm_corpora])
        pt = c_cfg["pretrain"]
        pt_corpora = pt.get("corpora") or self.names
        self.stamps["pretrain"] = self.runner.stage(
            "compose pretrain", composed / "pretrain",
            {"dev_fraction": pt["dev_fraction"], "seed": seed, "corpora": pt_corpora, **gated},
            [self.stamps[f"units:{n}"] for n in pt_corpora] + scored(pt_corpora),
            lambda: [pretrain(self.units_dir(n), composed / "pretrain", sections.Pretrain(**pt), seed=seed, part=n,
                              **self.scores_of(n)) for n in pt_corpora])
        com = c_cfg["chain_of_modality"]
        llm = self._llm() if recipe["llm"] and (com["rewrite"] or com["tts"] == "openai") else None
        self.stamps["chain_of_modality"] = self.runner.stage(
            "compose chain-of-modality", composed / "chain_of_modality",
            {**com, "seed": seed, **({"voices": c_cfg["voices"]} if c_cfg["voices"] else {}), "llm": {k: v for k, v in (recipe["llm"] or {}).items() if k not in ("max_requests", "timeout")},
             **({"quality": {**self.judge_settings(), **asdict(self.gates(synthesized=True))}} if self.scoring else {})},
            [self.stamps["kmeans"], sha256_json(self.feature_settings), *([self.stamps["dedup"]] if "dedup" in self.stamps else []),
             *self.files_of(com["instructions"], com["tts_model"]), *self.model_folders()],
            lambda: _brief(chain_of_modality(
                com["instructions"], composed / "chain_of_modality", self.tokenizer(),
                make_tts(com["tts"], work / "cache" / "tts", llm=llm, model=com["tts_model"], voices=c_cfg["voices"]),
                sections.ChainOfModality(**com), llm=llm if com["rewrite"] else None, seed=seed,
                eval_texts=self.eval_texts,
                **({"judge": self.judge(), "gates": self.gates(synthesized=True)} if self.scoring else {}))))

        self.compose_dialogues(seed)
        self.compose_interleaved(seed, scored)
        self.compose_duplex(seed)

    def compose_duplex(self, seed: int) -> None:
        """Full-duplex conversations in moshi-finetune's layout, with a duplex config of both channels' units, when
        the recipe asks (``compose.duplex``); a folder left by an earlier run whose recipe did is removed."""
        cfg, composed = self.recipe["compose"]["duplex"], self.composed
        if not cfg:
            _remove_stage_folder(composed / "duplex")
            return
        from .compose.duplex import duplex
        from .sources.tts import make_tts

        voices = self.recipe["compose"]["voices"]
        self.stamps["duplex"] = self.runner.stage(
            "compose duplex", composed / "duplex",
            {**cfg, "seed": seed, **({"voices": voices} if voices else {}),
             **({"quality": {**self.judge_settings(), **asdict(self.gates(synthesized=True))}} if self.scoring else {})},
            [self.stamps["kmeans"], sha256_json(self.feature_settings), *self.files_of(cfg["conversations"]), *self.model_folders()],
            lambda: _brief(duplex(
                cfg["conversations"], composed / "duplex", make_tts(cfg["tts"], None, voices=voices),
                sections.Duplex(**cfg), seed=seed, tokenizer=self.tokenizer(),
                **({"judge": self.judge(), "gates": self.gates(synthesized=True)} if self.scoring else {}))))

    def compose_interleaved(self, seed: int, scored) -> None:
        """Interleaved text and speech from the corpora's units (their word timings), when the recipe asks."""
        from .compose.interleaved import interleaved

        cfg, composed = self.recipe["compose"]["interleaved"], self.composed
        if not cfg:
            _remove_stage_folder(composed / "interleaved")
            return
        names = cfg.get("corpora") or self.names
        self.stamps["interleaved"] = self.runner.stage(
            "compose interleaved", composed / "interleaved",
            {"min_words": cfg["min_words"], "max_words": cfg["max_words"], "seed": seed, "corpora": names,
             **({"quality": asdict(self.gates())} if self.scoring else {})},
            [self.stamps[f"units:{n}"] for n in names] + scored(names),
            lambda: [_brief(interleaved(self.units_dir(n), composed / "interleaved", sections.Interleaved(**cfg),
                                        seed=seed, part=n, **self.scores_of(n)))
                     for n in names])

    def compose_dialogues(self, seed: int) -> None:
        """Multi-turn dialogues, when the recipe asks for them (``compose.dialogue``); a folder left by an
        earlier run whose recipe did is removed, so that publish does not take it."""
        recipe, composed = self.recipe, self.composed
        dlg = recipe["compose"]["dialogue"]
        if not dlg:
            _remove_stage_folder(composed / "dialogue")
            return
        from .compose.dialogue import dialogue
        from .sources.tts import make_tts

        llm = self._llm() if recipe["llm"] and (dlg["rewrite"] or dlg["tts"] == "openai") else None
        self.stamps["dialogue"] = self.runner.stage(
            "compose dialogue", composed / "dialogue",
            {**dlg, "seed": seed, **({"voices": recipe["compose"]["voices"]} if recipe["compose"]["voices"] else {}), "llm": {k: v for k, v in (recipe["llm"] or {}).items() if k not in ("max_requests", "timeout")},
             **({"quality": {**self.judge_settings(), **asdict(self.gates(synthesized=True))}} if self.scoring else {})},
            [self.stamps["kmeans"], sha256_json(self.feature_settings), *([self.stamps["dedup"]] if "dedup" in self.stamps else []),
             *self.files_of(dlg["conversations"], dlg["tts_model"]), *self.model_folders()],
            lambda: _brief(dialogue(
                dlg["conversations"], composed / "dialogue", self.tokenizer(),
                make_tts(dlg["tts"], self.work / "cache" / "tts", llm=llm, model=dlg["tts_model"],
                         voices=recipe["compose"]["voices"]), sections.Dialogue(**dlg),
                llm=llm if dlg["rewrite"] else None, seed=seed, eval_texts=self.eval_texts,
                **({"judge": self.judge(), "gates": self.gates(synthesized=True)} if self.scoring else {}))))

    def _llm(self):
        from .llm import LLM

        cfg = self.recipe["llm"]
        return LLM(base_url=cfg["base_url"], model=cfg["model"], cache_dir=self.work / "cache" / "llm",
                   max_requests=cfg["max_requests"], max_tokens=cfg["max_tokens"], timeout=cfg["timeout"])

    def publish_and_validate(self):
        from .release.publish import publish
        from .release.validate import format_report, validate

        name, eval_splits = self.recipe["name"], bool(self.recipe["output"]["eval_splits"])
        inputs = [self.stamps["cross_modal"], self.stamps["pretrain"], self.stamps["chain_of_modality"],
                  *[self.stamps[k] for k in RECORD_KINDS if k in self.stamps and k not in ("cross_modal", "pretrain",
                                                                                           "chain_of_modality")]]
        self.stamps["publish"] = self.runner.stage(
            "publish", self.dataset, {"name": name, "eval_splits": eval_splits}, inputs,
            lambda: _brief(publish(self.composed, self.dataset, sections.Output(**self.recipe["output"]), name=name)))
        self.runner.index += 1
        started = time.perf_counter()
        verdict = validate(self.dataset)
        self.validated = {"stage": "validate", "seconds": round(time.perf_counter() - started, 2)}  # every run: no stamp
        log.info(f"[{self.runner.index}/{self.runner.total}] validate: {'PASS' if verdict.ok else 'FAIL'}")
        if not verdict.ok:
            log.error(format_report(verdict))
        return verdict

    def report(self, verdict) -> None:
        from .release.report import report

        setting = self.recipe["output"]["vocoder"]
        own = self.codec and setting == "auto"  # codec units are spoken by the codec itself, loaded when needed
        vocoder = None if own else _report_vocoder(setting, self.km_path, self.f["kind"])
        self.runner.stage(
            "report", self.report_dir, {"vocoder": f"{self.f['kind']}:{self.f['checkpoint']}" if own else
                                        vocoder.source if vocoder else None, "samples": 4,
                                        **({"quality": asdict(self.gates())} if self.scoring else {})},
            [self.stamps["publish"]] + [self.stamps[f"score:{n}"] for n in self.names if self.scoring],
            lambda: _brief(report(self.dataset, self.report_dir, units=self.work / self.names[0] / "units",
                                  vocoder=self.extractor() if own else vocoder,
                                  samples=4, work=self.work, stages=[*self.runner.log, self.validated], verdict=verdict,
                                  quality=self.quality if self.scoring else None)))

    def summary(self, verdict) -> dict:
        meta = json.loads((self.dataset / "speechinstruct.json").read_text())
        log = self.runner.log
        summary = {
            "dataset": str(self.dataset), "report": str(self.report_dir / "index.html"), "valid": verdict.ok,
            "hours": meta["hours"], "records": meta["counts"], "k": meta["k"],
            "stages_skipped": sum(1 for s in log if s.get("skipped")),
            "seconds": round(sum(s.get("seconds", 0) for s in log), 2),
            **({"inferred": self.recipe["inferred"]} if self.recipe.get("inferred") else {}),
        }
        numbers_file = self.report_dir / "report.json"
        numbers = json.loads(numbers_file.read_text()) if numbers_file.is_file() else {}
        if "resynthesis_mcd_db" in numbers:  # how close the report's resynthesised samples are to the originals
            summary["resynthesis"] = {"vocoder": numbers["vocoder"], "mcd_db": numbers["resynthesis_mcd_db"],
                                      "samples": numbers["samples"]}
        if "quality" in numbers:  # mean DNSMOS / WER per corpus and record kind
            summary["quality"] = numbers["quality"]
        write_json(self.work / "run-summary.json", {**summary, "stages": log, "validate": self.validated})
        return summary


def _brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("skipped_examples", "dropped_examples", "histogram")}
