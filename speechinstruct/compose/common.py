"""What every composer shares: a record finished and checked (:func:`finish`), the settings an output folder was
made with (:func:`claim_folder`), the split files records are written to (validation and test audio never becomes
a training record), the quality gate over a units folder's scores (:func:`gated_units`), the chunk writer of the
kinds made from text (:func:`write_chunks`), and the seeded draw that makes every choice independent of processing
order.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from .. import __version__, records
from ..io import iter_rows, parquet_rows, read_json, write_json, write_parquet
from ..progress import progress
from ..shardfiles import (check_spec, duplicate_ids, finished, folder_k, made_from, repeat_reason, repeated_elsewhere,
                          select_shards, shard_suffix, unit_files)
from ..sources.corpora.base import SPLITS
from ..speechgpt import record_problems


def _draw(seed: int, *parts: str) -> int:
    """A deterministic 64-bit draw from the seed and the given strings."""
    return int.from_bytes(hashlib.sha256("\0".join([str(seed), *parts]).encode()).digest()[:8], "big")


QUALITY_COLUMNS = ("dnsmos_ovrl", "wer", "cer")  # the scores a record carries (null when not scored)


class RecordRefused(ValueError):
    """A record that must not be written: a text holds markup or a control character (after every change made to
    it: markdown stripped, an LLM's rewrite), or an id no UTF-8 file can hold. The composer drops and counts it."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(message for _, message in problems))
        rule, message = problems[0]
        column = message.split(" holds ")[0].split(" turn ")[0]
        self.key = f"dropped: {rule.replace('-', ' ')} in {column}"


def finish(record: dict) -> dict:
    """Add the prompt/completion pair (records in SpeechGPT's text form, not the chat form of ``messages``: TRL would
    read a record with both as either, by the hash seed), the score columns left unset (null), pipeline version
    and content hash (over every other field). Every record of every kind passes here: one that holds markup or a
    control character in a text field is refused (:class:`RecordRefused`), whatever made it so."""
    problems = record_problems(record)
    if problems:
        raise RecordRefused(problems)
    for column in QUALITY_COLUMNS:
        record.setdefault(column, None)
    if "plain_text" in record and "messages" not in record:
        record["prompt"], record["completion"] = record["prefix"], record["plain_text"]
    record["pipeline_version"] = __version__
    record["content_hash"] = records.content_hash(record)
    return record


def _records_file(path: Path, kind: str, source: Path):
    """Records of ``kind`` made from units shard ``source`` streamed into ``path`` (one row group in memory at a
    time), which records what ``source`` was (:func:`shardfiles.made_from`)."""
    return parquet_rows(path, records.arrow_schema(kind), functools.partial(records.to_table, kind), metadata=made_from(source))


def _split_files(out: Path, part: str | None, source: Path) -> dict[str, Path]:
    """The record files of units shard ``source`` in ``out``, one per split: ``{split}-{part-}{suffix}.parquet``."""
    named = f"{part + '-' if part else ''}{shard_suffix(source)}"
    return {s: out / f"{s}-{named}.parquet" for s in SPLITS}


def _unit_shards(units_dir: Path, num_shards: int = 1, shard_index: int = 0):
    """(suffix, path) of the units shards this worker owns (``--num-shards/--shard-index``)."""

    for path in select_shards(unit_files(units_dir), num_shards, shard_index):
        yield shard_suffix(path), path


class QualityGate:
    """The scores of a units folder's utterances (a ``score`` output, shard by shard) and the gates they must
    pass. ``check(suffix, id)`` → (score columns for the record, reason to drop or None). Without a scores
    folder every utterance passes with null scores. Memory: one shard's scores at a time."""

    def __init__(self, scores: str | Path | None = None, gates=None):
        self.folder, self.gates = (Path(scores) if scores else None), gates
        self._suffix, self._table = None, {}

    def check(self, suffix: str, uid: str) -> tuple[dict, str | None]:
        if self.folder is None:
            return {}, None
        if suffix != self._suffix:
            from ..curate.score import read_scores

            self._suffix, self._table = suffix, read_scores(self.folder, suffix)
        found = self._table.get(uid)
        columns = {c: found[c] for c in QUALITY_COLUMNS} if found else {}
        reason = self.gates.reason(found) if self.gates is not None else None
        if reason == "not scored":
            reason = f"not scored (see {self.folder / f'errors-{suffix}.jsonl'})"
        return columns, reason


def _quality_drop(counts, dropped, uid: str, reason: str) -> None:
    counts["dropped: quality: " + reason.split(" (")[0]] += 1
    dropped.append({"where": uid, "reason": f"quality: {reason}"})  # the counted key, then the score


def claim_folder(out: Path, part: str | None, spec: dict, own: str) -> None:
    """Before any record: ``spec`` (the kind, its inputs and every setting a record depends on) into
    ``out/compose{-part}.json``, or one line when ``out`` holds records of ``part`` made with other settings (a
    rerun with another mode, seed, template set or gate would have taken them for done and counted them as new),
    or files named as this composer's (``own``, a regular expression) that no compose wrote. A folder an earlier
    version composed (its summary there, no spec file) is taken as this spec's."""
    name, summary = (f"{stem}{'-' + part if part else ''}.json" for stem in ("compose", "summary"))
    check_spec(out, spec, name, own, legacy=(out / summary).is_file())


def scores_entry(scores) -> dict:
    """What a compose summary says of the scores folder its gates read: the folder, and the utterances per transcript
    language measured there (``score --language``), which the card lists (publish) even where that folder is gone."""
    if not scores:
        return {}
    folder = Path(scores).resolve()
    measured = read_json(folder / "summary.json").get("text_language") if (folder / "summary.json").is_file() else None
    return {"scores": str(folder), **({"text_language": measured} if measured else {})}


def unit_spec(kind: str, units_dir: Path, quality: "QualityGate", **settings) -> dict:
    """What a composer of units records (``kind``) is made from, for :func:`claim_folder`."""
    gates = quality.gates if quality.folder is not None else None
    return {"kind": kind, "units": str(units_dir.resolve()),
            "scores": str(quality.folder.resolve()) if quality.folder is not None else None,
            "gates": dataclasses.asdict(gates) if dataclasses.is_dataclass(gates) else None, **settings}


@contextlib.contextmanager
def split_records(out: Path, part: str | None, source: Path, kind: str):
    """Record sinks of ``kind`` for units shard ``source``, one file per split (``{split}-{part-}{suffix}.parquet``),
    all written when the block ends, so that together they mark the shard done; None when they already are (and
    were made from ``source`` as it is now, :func:`shardfiles.finished`)."""
    targets = _split_files(out, part, source)
    if all(finished(t, source) for t in targets.values()):
        yield None
        return
    with contextlib.ExitStack() as files:
        yield {s: files.enter_context(_records_file(t, kind, source)) for s, t in targets.items()}


def check_complete(out: Path) -> None:
    """One line when a folder of units records lacks the split files of a units shard its spec's units folder holds
    (a job-array task not finished, or failed), or holds some made from a units shard as it was before it was
    written again (:func:`shardfiles.finished`): publishing it would ship part of the records, or the records of
    rows dropped since. Not checked: a folder an earlier version composed (no spec file), one whose units folder
    is gone, and the kinds composed from texts."""
    missing, units_of = [], None
    for spec_file in sorted(out.glob("compose*.json")):
        units = read_json(spec_file, dict, "; compose again").get("units")
        if not isinstance(units, str) or not Path(units).is_dir():
            continue
        part = spec_file.stem.partition("-")[2] or None  # compose-NAME.json: the records of corpus NAME
        for path in unit_files(units):
            targets = _split_files(out, part, path).values()
            gone = [t for t in targets if not t.exists()]
            if not gone:
                for target in targets:
                    finished(target, path)  # one line when made from the shard as it was before
            elif not missing:
                units_of = units
            missing += gone
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{missing[0]}: missing{more}: {out.name}/ holds records of part of {units_of}, which compose "
                         "makes shard by shard (a job-array task not finished, or failed?); run the compose tasks that "
                         "are missing, then publish")


def gated_units(units_dir: Path, out: Path, part: str | None, kind: str, quality: QualityGate, counts, dropped: list,
                num_shards: int = 1, shard_index: int = 0, settings: dict | None = None):
    """(split sinks, units row, its score columns) for every row of the units shards this worker owns that
    passes ``quality``, shard after shard (:func:`split_records`; a shard already written is skipped); a row
    that fails is counted in ``counts`` and ``dropped``. ``settings``: what else the records depend on (the
    folder's spec, :func:`claim_folder`)."""
    own = rf"({'|'.join(SPLITS)})-{re.escape(part + '-') if part else ''}[^-]+\.parquet"
    claim_folder(out, part, unit_spec(kind, units_dir, quality, **(settings or {})), own)
    k = folder_k(units_dir)
    repeats = None
    for suffix, path in _unit_shards(units_dir, num_shards, shard_index):
        with split_records(out, part, path, kind) as sinks:
            if sinks is None:
                counts["shards skipped (done)"] += 1
                continue
            if repeats is None:  # ids an earlier units file holds (files copied or merged by hand): once, when needed
                repeats = repeated_elsewhere(unit_files(units_dir))
            earlier, twice, seen = repeats.get(path.name, {}), duplicate_ids([path]), set()  # seen: of twice only
            for number, u in enumerate(progress(iter_rows(path), desc=f"{kind} {path.name}", unit="utt")):
                problem = units_row_problem(u, k)
                if problem:  # another tool's row, or a hand edit
                    counts[f"dropped: not a units row ({problem.split(':')[0]})"] += 1
                    dropped.append({"where": f"{path.name} row {number}", "reason": f"not a units row: {problem}"})
                    continue
                if u["id"] in earlier or u["id"] in seen:  # composed once, from the row that has it first
                    counts["dropped: id repeated"] += 1
                    dropped.append({"where": f"{path.name} row {number}", "id": u["id"],
                                    "reason": repeat_reason(earlier.get(u["id"]))})
                    continue
                if u["id"] in twice:
                    seen.add(u["id"])
                judged, reason = quality.check(suffix, u["id"])
                if reason:
                    _quality_drop(counts, dropped, u["id"], reason)
                    continue
                yield sinks, u, judged


def units_row_problem(u: dict, k: int | None) -> str | None:
    """Why a units row cannot be composed, as ``rule: message`` (the schema's, or validate's unit rules:
    :func:`records.unit_rules`), or None."""
    schema = records.record_errors("units", u)
    if schema:
        return f"schema: {schema[0]}"
    rules = records.unit_rules("units", u, k)
    return f"{rules[0][0]}: {rules[0][1]}" if rules else None


def split_counts(out: Path, part: str | None = None) -> dict[str, int]:
    """Records per split in a compose folder's ``{split}-*.parquet`` files (``part``'s only, when given)."""
    return {split: sum(pq.read_metadata(f).num_rows for f in out.glob(f"{split}-{part + '-' if part else ''}*.parquet"))
            for split in SPLITS}


def write_chunks(items: list[dict], out: Path, kind: str, chunk_size: int, counts: collections.Counter,
                 dropped: list[dict], make, count, settings: dict) -> None:
    """Records of ``kind`` made from ``items`` (``make(item)``: a list of records, or (count key, reason) when
    the item is dropped), ``chunk_size`` items to a ``train-NNNNN.parquet`` file with a sidecar of its counts
    (``count(record)`` names a record's) and drops; a rerun skips the chunks already written, when they were made
    with the same ``settings`` (:func:`claim_folder`). ``counts`` and ``dropped`` gain every chunk's, done now or
    before."""
    claim_folder(out, None, {"kind": kind, "chunk_size": chunk_size, **settings}, r"train-\d{5}(\.summary\.json|\.parquet)")
    for start in range(0, len(items), chunk_size):
        chunk = start // chunk_size
        target = out / f"train-{chunk:05d}.parquet"
        if target.exists():
            continue
        rows, chunk_counts, chunk_dropped = [], collections.Counter(), []
        for item in progress(items[start : start + chunk_size], desc=f"{kind} {target.name}", unit="item"):
            made = make(item)
            if isinstance(made, tuple):
                chunk_counts[made[0]] += 1
                chunk_dropped.append({"where": item["where"], "id": item["id"], "reason": made[1]})
                continue
            rows += made
            chunk_counts.update(count(r) for r in made)
        write_json(out / f"train-{chunk:05d}.summary.json", {"counts": chunk_counts, "dropped": chunk_dropped})
        write_parquet(target, records.to_table(kind, rows))
    for sidecar in sorted(out.glob("train-*.summary.json")):
        part = json.loads(sidecar.read_text())
        counts.update(part["counts"])
        dropped.extend(part["dropped"])
