"""``speechinstruct compose cross-modal``: for every utterance with a transcript, an ASR and/or a TTS record
(``[Human]: {instruction} This is input: {input}<eoh> [SpeechGPT]: {output}<eoa>``), in the split of its audio.

Every record carries provenance (source id, corpus, license, pipeline version, content hash). Choices (task,
template) are drawn from a hash of seed and source id, so a record does not depend on processing order, sharding
or reruns. Output is written per input shard, atomically; a rerun skips finished shards.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from .. import recipe as settings
from ..io import sha256_json, write_json
from ..recipe import default
from ..sources.corpora.base import SPLITS, split_name
from ..speechgpt import DEFAULT_PREFIX, cross_modal_text, find_markup, shape_errors, text_problem, to_text
from . import templates as templates_mod
from .common import QualityGate, RecordRefused, _draw, finish, gated_units, scores_entry


def cross_modal(units_dir: str | Path, out: str | Path, asr_templates: dict | None = None,
                tts_templates: dict | None = None, cfg: settings.CrossModal | None = None, prefix: str = DEFAULT_PREFIX,
                seed: int = default(settings.Compose, "seed"), part: str | None = None, num_shards: int = 1,
                shard_index: int = 0, scores: str | Path | None = None, gates=None) -> dict:
    """ASR/TTS records for every transcribed utterance. ``cfg`` (the recipe's ``compose.cross_modal``, its defaults
    when None): ``mode`` both (one of each), random (one, ASR with probability ``asr_fraction``), asr, or tts.
    ``part`` names the files (``train-{part}-NNNNN``) so that several corpora can share one output folder.
    ``scores``: a ``score`` output of these utterances; their columns go into the records, and ``gates``
    (``judges.gates.Gates``) drop those that fail."""
    cfg = cfg or settings.CrossModal()
    mode, asr_fraction = cfg.mode, cfg.asr_fraction
    sets = {"asr": asr_templates or templates_mod.builtin("asr"), "tts": tts_templates or templates_mod.builtin("tts")}
    for task, data in sets.items():
        templates_mod.check_markup(data, f"{task} templates {data['version']}")
    out = Path(out)
    counts: collections.Counter[str] = collections.Counter()
    dropped: list[dict] = []
    quality = QualityGate(scores, gates)
    made_with = {"mode": mode, "asr_fraction": asr_fraction, "prefix": sha256_json(prefix), "seed": seed,
                 "templates": {task: sha256_json(data["templates"]) for task, data in sets.items()}}
    for sinks, u, judged in gated_units(Path(units_dir), out, part, "cross_modal", quality, counts, dropped,
                                        num_shards, shard_index, made_with):
        text = (u.get("text") or "").strip()
        if not text:
            counts["no transcript"] += 1
            continue
        problem = text_problem(text)
        if problem:
            rule = problem[0].replace("-", " ")
            counts[f"dropped: {rule} in transcript"] += 1
            dropped.append({"where": u["id"], "reason": f"{rule} in transcript ({problem[1]})"})
            continue
        for task in _tasks(mode, asr_fraction, seed, u["id"]):
            items = sets[task]["templates"]
            template = items[_draw(seed, "template", task, u["id"]) % len(items)]
            try:
                record = finish({
                    "id": f"{task}/{u['id']}", "prefix": prefix,
                    "plain_text": cross_modal_text(task, template["text"], text, u["unit_text"]),
                    "task": task, "units": u["units"], "transcript": text, "template_id": template["id"],
                    "source_id": u["id"], "corpus": u["corpus"], "license": u["license"], **judged,
                })
            except RecordRefused as e:
                counts[e.key] += 1
                dropped.append({"where": u["id"], "reason": f"{e.key.removeprefix('dropped: ')} ({e})"})
                continue
            sinks[split_name(u["split"])].add(record)
    by_split = _count_written(out, part, counts)
    summary = {"records": counts["asr"] + counts["tts"], **dict(sorted(counts.items())), "splits": dict(by_split),
               "templates": {t: sets[t]["version"] for t in sets}, "units": str(Path(units_dir).resolve()),
               **scores_entry(scores),
               "dropped_examples": dropped[:200]}
    write_json(out / f"summary{'-' + part if part else ''}.json", summary)
    return summary


def _tasks(mode: str, asr_fraction: float, seed: int, uid: str) -> list[str]:
    """The records an utterance makes: both, one drawn (ASR with probability ``asr_fraction``), or the one named."""
    if mode == "both":
        return ["asr", "tts"]
    if mode == "random":
        return ["asr" if _draw(seed, "task", uid) / 2**64 < asr_fraction else "tts"]
    return [mode]


def _count_written(out: Path, part: str | None, counts: collections.Counter) -> collections.Counter:
    """Records per split in the files of ``part`` (all shards, not just this run's), and per task into ``counts``;
    counted in Arrow, not as Python lists."""
    by_split: collections.Counter[str] = collections.Counter()
    for split in SPLITS:
        for f in sorted(out.glob(f"{split}-{part + '-' if part else ''}*.parquet")):
            tasks = pq.read_table(f, columns=["task"]).column("task")
            by_split[split] += len(tasks)
            for pair in pa.compute.value_counts(tasks).to_pylist():
                counts[pair["values"]] += pair["counts"]
    return by_split


def record_errors(r: dict, k: int | None) -> list[tuple[str, str]]:
    """A cross-modal record's plain_text has its task's shape and holds its instruction, units and transcript."""
    errors, m = shape_errors(r, r["task"])
    if m is None:
        return errors
    text = r["plain_text"]
    mark = find_markup(m.group("instruction"))
    if mark:
        errors.append(("markup", f"the instruction holds record markup {mark!r}"))
    if m.group("units") != to_text(r["units"]):
        errors.append(("units-match", "units in plain_text differ from the units column"))
    if m.group("text") != r["transcript"]:
        errors.append(("text-match", "text in plain_text differs from the transcript column"))
    elif text != cross_modal_text(r["task"], m.group("instruction"), r["transcript"], to_text(r["units"])):
        errors.append(("shape", "plain_text does not match its columns"))
    return errors
