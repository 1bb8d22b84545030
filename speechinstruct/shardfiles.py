"""The files in each stage's folder, in one place: how they are named, listed and split among the tasks
of a job array, what the folder's spec file (``features.json``, ``units.json``) records, and the format of
feature files.

- ``shard``: ``manifest-NNNNN.parquet`` (one *manifest shard* each) + ``summary.json`` (the corpus root).
- ``extract``: ``features-NNNNN.arrow`` per manifest shard (Arrow IPC: ``id`` + frames × dim), or with
  ``--kmeans`` ``units-NNNNN.parquet``; ``errors-NNNNN.jsonl``; ``features.json`` / ``units.json``.
- ``quantize``: ``units-NNNNN.parquet`` per feature file; ``units.json``, ``stats.json``.
The ``NNNNN`` suffix carries through every stage, so the output of manifest shard 3 is always ``…-00003``.
A *job-array part* (``--num-shards N --shard-index I``) is every N-th file from the I-th: :func:`select_shards`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from .io import naming, read_json, write_json
from .kinds import RECORD_KINDS


# ------------------------------------------------------------------------------------------ listing files
def _listed(folder: str | Path, pattern: str, made_by: str, kind: str | None = None) -> list[Path]:
    """The files of one stage in a folder, in shard order (``folder`` may also be one such file); with ``kind``,
    each checked to hold that record kind's columns (:func:`check_kind`)."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"{folder}: no {pattern} files (run `speechinstruct {made_by}` first)")
    return [check_kind(f, kind, made_by) for f in files] if kind else files


def check_kind(path: Path, kind: str, made_by: str) -> Path:
    """``path`` when its schema holds every column a ``kind`` record requires (``schemas/KIND.json``), else one line
    naming the file and what it lacks (a foreign file, or one a hand edit cut short of columns). Reads its footer."""
    import pyarrow.parquet as pq

    from . import records

    with naming(path):
        names = set(pq.read_schema(path).names)
    missing = [c for c in records.json_schema(kind)["required"] if c not in names]
    if missing:
        raise ValueError(f"{path}: not a {kind} file (no {', '.join(missing)} column{'s' * (len(missing) > 1)}); "
                         f"`speechinstruct {made_by}` writes them")
    return path


def manifest_files(folder: str | Path) -> list[Path]:
    return _listed(folder, "manifest-*.parquet", "shard", "manifest")


def feature_files(folder: str | Path) -> list[Path]:
    """The feature shards of a folder (or one shard), each checked to be made from its manifest shard as it is now
    (:func:`made_from_the_manifest`): a shard of rows the corpus no longer holds as they were is one line, never
    sampled or quantized."""
    return made_from_the_manifest(folder, _listed(folder, "features-*.arrow", "extract"), "features.json")


def unit_files(folder: str | Path) -> list[Path]:
    """The units shards of a folder (or one shard), each checked as :func:`feature_files` does, where its record
    names its manifest shard (quantize's and extract's do; dedup's name the units shard they were made from)."""
    return made_from_the_manifest(folder, _listed(folder, "units-*.parquet", "quantize", "units"), "units.json",
                                  named_only=True)


def made_from_the_manifest(folder: str | Path, files: list[Path], spec_name: str, named_only: bool = False) -> list[Path]:
    """``files``, when the folder's spec file (``features.json``, ``units.json``) names a manifest that is there,
    each checked to be made from its manifest shard as it is now (:func:`check_made_from`): one line for a shard
    of a manifest shard written again since, or gone (the corpus sharded again into fewer shards), which every
    stage reading the folder would otherwise take for its own."""
    spec_file = Path(folder) / spec_name
    spec = read_spec(spec_file, "; run the stage that wrote it again") if spec_file.is_file() else {}
    manifest = spec.get("manifest")
    if manifest is not None and Path(manifest).exists():
        for path in files:
            check_made_from(path, [manifest_shard_of(Path(manifest), path)], named_only)
    return files


def manifest_shard_of(manifest: Path, output: Path) -> Path:
    """The manifest shard an output shard of the same number (``features-00003.arrow``) was made from; the manifest
    itself when it is one file."""
    return manifest / f"manifest-{shard_suffix(output)}.parquet" if manifest.is_dir() else manifest


def duplicate_ids(files: list[Path]) -> set[str]:
    """The ids that occur more than once across ``files``, counted in Arrow (a column of ids, not Python strings).
    Only text ids are compared: a file whose ids are numbers, lists or nulls (written by another tool) breaks the
    schema, which says so record by record."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = []
    for f in files:
        with naming(f):
            schema = pq.read_schema(f)
            if "id" in schema.names and (pa.types.is_string(kind := schema.field("id").type) or pa.types.is_large_string(kind)):
                columns.extend(c.cast(pa.string()) for c in pq.read_table(f, columns=["id"]).column("id").chunks)
    if not columns:
        return set()
    counts = pc.value_counts(pa.chunked_array(columns, type=pa.string()))
    return set(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).drop_null().to_pylist())


def repeat_reason(first: str | None = None) -> str:
    """Why a row is skipped whose id an earlier row holds (extract, score and compose say it alike): ``first``, the
    file that holds the id first (:func:`repeated_elsewhere`), or None for an earlier row of the row's own file."""
    return f"id repeated: {first} has it first" if first else "id repeated in this shard (an earlier row has it)"


def repeated_elsewhere(files: list[Path]) -> dict[str, dict[str, str]]:
    """For each file (by name) the ids an earlier file of ``files`` already holds, each with the name of the first
    file that holds it: a shard copied beside itself, or shard folders merged by hand. Reads only the id columns
    and keeps a 64-bit hash of each id (Python's own); the ids whose hashes repeat are read again and compared
    whole, so that a collision is never taken for a repeat."""
    import pyarrow.parquet as pq

    def ids(f: Path) -> pa.Array:
        with naming(f):
            column = pq.read_table(f, columns=["id"]).column("id").combine_chunks()
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise ValueError(f"{f}: its id column holds {column.type}, not text: not a file this stage reads")
        return column.cast(pa.string()).drop_null().unique()

    if len(files) < 2:
        return {}
    hashes = [np.fromiter(map(hash, ids(f).to_pylist()), np.int64) for f in files]
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    suspects = values[counts > 1]
    first: dict[str, str] = {}
    out: dict[str, dict[str, str]] = {}
    for f, hashed in zip(files, hashes):
        inside = np.isin(hashed, suspects)
        if not inside.any():
            continue
        for uid in ids(f).filter(pa.array(inside)).to_pylist():
            if uid in first:
                out.setdefault(f.name, {})[uid] = first[uid]
            else:
                first[uid] = f.name
    return out


def corpus_root(folder: str | Path) -> Path:
    """The corpus root recorded in a shard folder's summary.json."""
    folder = Path(folder)
    summary = (folder if folder.is_dir() else folder.parent) / "summary.json"
    try:
        root = json.loads(summary.read_text())["root"]
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as e:
        why = {KeyError: "no 'root' in it", TypeError: "not a JSON object", RecursionError: "nested too deeply"}
        raise FileNotFoundError(f"{summary}: cannot read the corpus root ({why.get(type(e), e)}); pass --root") from None
    if not isinstance(root, str):
        raise FileNotFoundError(f"{summary}: cannot read the corpus root ('root' is {json.dumps(root)[:80]}, not a "
                                "path); pass --root")
    return Path(root)


def shard_suffix(path: Path) -> str:
    """``manifest-00003.parquet`` → ``00003``."""
    return path.stem.rsplit("-", 1)[-1]


def shard_output(out: Path, manifest_shard: Path, fused: bool) -> Path:
    suffix = shard_suffix(manifest_shard)
    return out / (f"units-{suffix}.parquet" if fused else f"features-{suffix}.arrow")


def finished(target: Path, *inputs: Path) -> bool:
    """Whether a shard's output ``target`` (``features-NNNNN.arrow``, ``scores-NNNNN.parquet``…) is there and none of
    its errors (``errors-NNNNN.jsonl`` beside it) may pass: a shard written while storage failed is done again.
    ``inputs``: the input shards it is made from, checked as :func:`check_made_from` does."""
    if not target.exists():
        return False
    check_made_from(target, inputs)
    return not errors_that_may_pass(target.parent / f"errors-{shard_suffix(target)}.jsonl")


# ---------------------------------------------------------------------------- what a shard was made from
# Every output shard keeps, in its own file's metadata (the Parquet footer's key-value metadata, the Arrow IPC
# schema's), what its input shards were when it was made: each one's size and the digest of its last 64 KiB,
# where Parquet and Arrow files keep their footers (row counts, offsets, column statistics). An input written
# again since (a corpus sharded anew with other --shard-hours, units deduplicated again) makes the output another
# run's: taken for done, it held other rows than its input holds now. A copy of an input is the same input.
MADE_FROM = b"speechinstruct:made_from"
_TAIL = 1 << 16


def fingerprint(path: Path) -> str:
    """``SIZE:DIGEST``: a file's size and the sha256 of its last 64 KiB (the footer of a Parquet or Arrow file);
    read once while the file's inode, size and times stay (compose checks one units shard for each of its split
    files; every stage writes a file anew under a new inode, by renaming)."""
    stat = os.stat(path)
    return _fingerprint(str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=4096)
def _fingerprint(path: str, size: int, *stat: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL))
        return f"{size}:{hashlib.sha256(f.read()).hexdigest()[:32]}"


def made_from(*inputs: Path) -> dict[bytes, bytes]:
    """The metadata an output shard made from ``inputs`` carries (:func:`check_made_from` reads it)."""
    return {MADE_FROM: json.dumps({p.name: fingerprint(p) for p in inputs}, sort_keys=True).encode()}


def check_made_from(target: Path, inputs: tuple[Path, ...] | list[Path], named_only: bool = False) -> None:
    """One line when output shard ``target`` was made from input shards other than ``inputs`` as they are now
    (written again since, or gone); nothing for a file an earlier version wrote (it kept no such metadata).
    ``named_only``: an input its record does not name is not checked (rather than one line)."""
    if not inputs:
        return
    with naming(target):
        if target.suffix == ".arrow":
            metadata = _feature_reader(target).schema.metadata
        else:
            import pyarrow.parquet as pq

            metadata = pq.read_schema(target).metadata
    if not metadata or MADE_FROM not in metadata:
        return
    try:
        recorded = json.loads(metadata[MADE_FROM])
    except (ValueError, RecursionError):  # edited by hand
        recorded = None
    for path in inputs:
        if named_only and isinstance(recorded, dict) and path.name not in recorded:
            continue
        if not isinstance(recorded, dict) or path.name not in recorded:
            raise ValueError(f"{target}: its record of the shards it was made from does not name {path.name}: not this "
                             f"stage's output for it; use a new folder")
        if not path.is_file():
            raise ValueError(f"{target}: made from {path.name}, which is not there now ({path.parent} was written "
                             f"again?); {target.parent} holds output of other inputs: use a new folder")
        if recorded[path.name] != fingerprint(path):
            raise ValueError(f"{target}: made from {path.name} as it was before it was written again (sharded, "
                             f"extracted or deduplicated anew?); {target.parent} holds output of other inputs: use a "
                             f"new folder (or, if only this shard's input changed, remove {target.name})")


def errors_that_may_pass(path: Path) -> list[dict]:
    """The errors of an errors file that may pass (``"may_pass": true``: reading the audio may work later)."""
    if not path.is_file():
        return []
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            error = json.loads(line) if line.strip() else {}
        except ValueError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e}); an errors file is written whole by its stage") from None
        if isinstance(error, dict) and error.get("may_pass") is True:
            found.append(error)
    return found


class Unfinished(OSError):
    """A stage went through every shard, but some utterances failed for reasons that may pass (storage that failed
    for a while): its rerun does those shards again. ``summary``: the stage's summary, which the command line
    still prints."""

    summary: dict | None = None


def check_finished(out: Path, suffixes: list[str], summary: dict | None = None) -> None:
    """One line (:class:`Unfinished`, carrying the stage's ``summary``) when shards of ``out`` hold errors that may
    pass, naming how many and the first; nothing when every shard is finished."""
    check_read(out, {s: [e["reason"] for e in errors_that_may_pass(out / f"errors-{s}.jsonl")] for s in suffixes},
               summary)


def check_read(out: Path, passing: dict[str, list[str]], summary: dict | None = None) -> None:
    """One line (:class:`Unfinished`, carrying the stage's ``summary``) when any shard's list of ``passing`` reasons
    (utterances storage failed to give for a while) is not empty: how many, in how many shards, and the first."""
    found = {shard: reasons for shard, reasons in passing.items() if reasons}
    if found:
        count = sum(map(len, found.values()))
        unfinished = Unfinished(f"{out}: {count} utterance{'s' * (count > 1)} in {len(found)} shard"
                                f"{'s' * (len(found) > 1)} could not be read for a reason that may pass (first: "
                                f"{next(iter(found.values()))[0]}); the rest is written: run it again when the storage "
                                "is back, and it does those shards again")
        unfinished.summary = summary
        raise unfinished


def select_shards(files: list[Path], num_shards: int = 1, shard_index: int = 0) -> list[Path]:
    """The manifest shards this worker owns: every ``num_shards``-th, starting at ``shard_index``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return files[shard_index::num_shards]


# ------------------------------------------------------------------------------------ the unit vocabulary
@dataclass(frozen=True)
class Vocabulary:
    """What the speech units are: which tokenizer made them and how many unit tokens there are. Written by
    extract and quantize (``units.json``) and publish (``speechinstruct.json``); read by validate (the unit
    range), train (the tokens it adds), chat and the report. K of SpeechGPT's k-means units is ``size``.

    ``tokenizer``: ``kmeans`` (features clustered by k-means). ``codebooks`` × ``codebook_size`` = ``size``
    (one codebook for k-means). ``frame_rate``: frames per second before repeats are merged. ``features``:
    the features clustered (``mfcc``, ``hubert``). ``sha256``: the k-means file's hash."""

    tokenizer: str
    size: int
    codebooks: int = 1
    codebook_size: int | None = None
    frame_rate: float | None = None
    sample_rate: int | None = None
    features: str | None = None
    sha256: str | None = None

    def __post_init__(self):
        if self.codebook_size is None:
            object.__setattr__(self, "codebook_size", self.size // max(self.codebooks, 1))

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, value, where: str) -> "Vocabulary":
        """The record as written by :meth:`to_json`; one line naming ``where`` when it is not."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(value, dict) or not {"tokenizer", "size"} <= set(value) or not set(value) <= fields:
            raise ValueError(f"{where}: 'vocabulary' must be an object with tokenizer and size (and only "
                             f"{', '.join(sorted(fields))}), got {value!r}")
        for key in ("size", "codebooks", "codebook_size"):
            n = value.get(key, 1)
            if not _positive(n, int):
                raise ValueError(f"{where}: vocabulary {key} must be a positive integer, got {n!r}")
        for key, kind in (("frame_rate", (int, float)), ("sample_rate", int)):
            if value.get(key) is not None and not _positive(value[key], kind):
                raise ValueError(f"{where}: vocabulary {key} must be a positive number, got {value[key]!r}")
        for key in ("tokenizer", "features", "sha256"):
            if value.get(key) is not None and not isinstance(value[key], str):
                raise ValueError(f"{where}: vocabulary {key} must be text, got {value[key]!r}")
        vocabulary = cls(**value)
        if vocabulary.codebooks * vocabulary.codebook_size != vocabulary.size:
            raise ValueError(f"{where}: vocabulary size {vocabulary.size} is not codebooks {vocabulary.codebooks} "
                             f"x codebook_size {vocabulary.codebook_size}")
        return vocabulary


def kmeans_vocabulary(extractor_spec: dict, k: int, sha256: str | None = None) -> Vocabulary:
    """The vocabulary of units made by clustering ``extractor_spec``'s features with a k-means of ``k``
    centroids (its file's ``sha256``)."""
    from .audio import TARGET_SR

    return Vocabulary("kmeans", int(k), frame_rate=extractor_spec.get("frame_rate"), sample_rate=TARGET_SR,
                      features=extractor_spec.get("features"), sha256=sha256)


# ---------------------------------------------------------------------------------- folder spec files
def kmeans_spec(kmeans) -> dict:
    return {"source": kmeans.source, "k": kmeans.k, **{k: v for k, v in kmeans.meta.items() if k == "sha256"}}


def output_spec(extractor_spec: dict, float16: bool, manifest: Path, root: Path, kmeans=None,
                vocabulary: Vocabulary | None = None) -> dict:
    """What an extract output folder was made from (written as features.json or units.json): with ``kmeans``
    or a codec's ``vocabulary``, a units folder."""
    spec = {**extractor_spec, "float16": float16, "manifest": str(Path(manifest).resolve()), "root": str(Path(root).resolve())}
    if kmeans is not None:
        spec = units_spec(spec, kmeans)
    elif vocabulary is not None:
        spec["vocabulary"] = vocabulary.to_json()
    return spec


def units_spec(features_spec: dict, kmeans) -> dict:
    """``units.json`` of units made from features of ``features_spec`` (a ``features.json``) with ``kmeans``."""
    return {**features_spec, "kmeans": kmeans_spec(kmeans),
            "vocabulary": kmeans_vocabulary(features_spec, kmeans.k, kmeans.meta.get("sha256")).to_json()}


# Keys a spec file records that follow from the others: a folder written before they existed is not "made with
# other settings" for lacking them (they are added to its spec file).
DERIVED_KEYS = ("vocabulary",)


def check_spec(out: Path, spec: dict, name: str = "features.json", shards: str = r"[^.].*-\d{5}\..*",
               legacy: bool = False) -> None:
    """Write ``spec`` to ``out/name``, or refuse when the folder already holds output of another spec, or shard files
    (names matching ``shards``: ``features-00000.arrow``, ``errors-00000.jsonl``…) without ``name``, which every
    stage writes before them: another tool's, or copied in, they would have been taken for finished shards of this
    run. ``legacy``: ``out`` holds what an earlier version of the stage wrote before it kept ``name``: its shards
    are taken as this spec's."""
    meta = out / name
    if not meta.is_file() and legacy:
        write_json(meta, spec)
        return
    if not meta.is_file() and out.is_dir():
        stray = sorted(p for p in out.iterdir() if p.is_file() and re.fullmatch(shards, p.name))
        if stray:
            raise ValueError(f"{stray[0]}: already there, but {out} has no {name}, which this stage writes before any "
                             "shard: not its output (it would be taken for a finished shard); use a new folder")
    if meta.is_file():
        old = read_json(meta, dict, f"; {out} is not this stage's output as it left it: use a new folder")
        new = json.loads(json.dumps(spec))
        if any(k in new and k not in old for k in DERIVED_KEYS):
            if old == {k: v for k, v in new.items() if k in old}:
                write_json(meta, spec)
                return
        if old != new:
            diff = {k: (old.get(k), spec.get(k)) for k in set(old) | set(spec) if old.get(k) != spec.get(k)}
            raise ValueError(f"{meta}: {out} holds output made with other settings {diff}; use a new folder")
    else:
        write_json(meta, spec)


# ------------------------------------------------------------------------- a published dataset's metadata
# The keys of ``speechinstruct.json`` (publish writes it) that other stages read, and the JSON type of each.
DATASET_META_TYPES = {"name": str, "pipeline_version": str, "counts": dict, "hours": dict, "sources": list,
                      "by_kind": dict, "voices": dict, "extractor": dict, "kmeans": dict, "templates": dict,
                      "languages": list, "vocabulary": dict, "dedup": dict, "languages_measured": dict}
DATASET_META_REQUIRED = ("name", "pipeline_version", "counts", "hours", "sources", "extractor")


def read_dataset_meta(folder: str | Path) -> dict:
    """``speechinstruct.json`` of a published dataset, checked: a JSON object whose keys have the types publish
    writes (``k`` an integer or null, ``counts`` {config: {split: count}}); one line naming the file and the
    key otherwise (an edited or damaged file), never an AttributeError later."""
    path = Path(folder) / "speechinstruct.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: not a dataset written by `speechinstruct publish`")
    meta = read_json(path, dict, "; publish the dataset again")
    for key, kind in DATASET_META_TYPES.items():
        if key not in meta and key in DATASET_META_REQUIRED:
            raise ValueError(f"{path}: no {key!r}: not as publish writes it; publish the dataset again")
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{path}: {key!r} must be a JSON {'object' if kind is dict else kind.__name__}, "
                             f"got {type(meta[key]).__name__}; publish the dataset again")
    k = meta.get("k")
    if k is not None and not _positive(k, int):
        raise ValueError(f"{path}: 'k' must be a positive integer, got {k!r}; publish the dataset again")
    if "vocabulary" in meta and Vocabulary.from_json(meta["vocabulary"], str(path)).size != k:
        raise ValueError(f"{path}: 'k' is {k!r} but the vocabulary has {meta['vocabulary']['size']} units; "
                         "publish the dataset again")
    for config, splits in (meta.get("counts") or {}).items():
        if not isinstance(splits, dict) or not all(isinstance(n, int) for n in splits.values()):
            raise ValueError(f"{path}: counts[{config!r}] must map splits to record counts; publish the dataset again")
    for config, kinds in (meta.get("by_kind") or {}).items():
        if not isinstance(kinds, dict) or not all(isinstance(n, int) for n in kinds.values()):
            raise ValueError(f"{path}: by_kind[{config!r}] must map kinds to record counts; publish the dataset again")
    if not all(_number(h, (int, float)) and h >= 0 for h in meta["hours"].values()):
        raise ValueError(f"{path}: hours must map corpora to hours (numbers); publish the dataset again")
    for i, source in enumerate(meta.get("sources") or []):
        if (not isinstance(source, dict) or not isinstance(source.get("records", {}), dict)
                or not all(isinstance(source.get(key), str) for key in ("corpus", "license"))):
            raise ValueError(f"{path}: sources[{i}] must be an object with corpus, license and records")
    return meta


def read_units_spec(folder: str | Path) -> dict | None:
    """``units.json`` of a units folder (quantize's or extract --kmeans's output; ``folder`` may be one of its
    files), or None when there is none; one line naming the file when it is not a JSON object."""
    folder = Path(folder)
    path = (folder if folder.is_dir() else folder.parent) / "units.json"
    if not path.is_file():
        return None
    return read_spec(path, "; extract or quantize into a new folder")


def read_spec(path: Path, hint: str) -> dict:
    """An extract or quantize output's spec file (``features.json``, ``units.json``): a JSON object whose corpus root
    (its rows' paths are relative to it) and manifest (it was made from), where given, are paths; one line naming
    the file otherwise (``hint``: what to do about it)."""
    spec = read_json(path, dict, hint)
    for key in ("root", "manifest"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ValueError(f"{path}: {key!r} must be a path (text), got {json.dumps(spec[key])[:80]}{hint}")
    for key, kind, what in (("dim", int, "a positive integer"), ("frame_rate", (int, float), "a positive number")):
        if spec.get(key) is not None and not _positive(spec[key], kind):
            raise ValueError(f"{path}: {key!r} must be {what}, got {json.dumps(spec[key])[:80]}{hint}")
    return spec


def _number(value, kind) -> bool:
    """Whether ``value`` is a finite number of ``kind``: JSON's true is not 1, nor NaN, nor an int of 400 digits
    (no float holds it: ``math.isfinite`` raises)."""
    if not isinstance(value, kind) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _positive(value, kind) -> bool:
    return _number(value, kind) and value > 0


def composed_units_dirs(folder: str | Path, missing_ok: bool = True) -> list[Path]:
    """The units folders a compose folder's records were made from, as its cross-modal, pretrain and interleaved summaries
    name them (those that still exist), in order, each once. ``missing_ok`` False: one line for a folder named that
    is not there (moved or deleted), whose vocabulary and hours publish would otherwise leave out."""
    dirs: list[Path] = []
    for config in [name for name, kind in RECORD_KINDS.items() if kind.from_units]:
        for summary in sorted((Path(folder) / config).glob("summary*.json")):
            units = read_json(summary, dict, "; compose again").get("units")
            if isinstance(units, str) and units and not Path(units).is_dir() and not missing_ok:
                raise FileNotFoundError(f"{summary}: its records were made from {units}, which is not there (moved or "
                                        "deleted?); publish reads their unit vocabulary and hours there: restore it, or "
                                        "compose again from where it is now")
            if units and Path(units).is_dir() and Path(units) not in dirs:
                dirs.append(Path(units))
    return dirs


def composed_speech_specs(folder: str | Path) -> list[tuple[Path, dict]]:
    """(summary, {extractor, kmeans, vocabulary}) of a compose folder's synthesized speech: the chain-of-modality
    and dialogue summaries record what tokenized it."""
    found = []
    for config in ("chain_of_modality", "dialogue"):
        summary = Path(folder) / config / "summary.json"
        if summary.is_file():
            spec = read_json(summary, dict, "; compose again")
            if isinstance(spec.get("vocabulary"), dict):
                found.append((summary, spec))
    return found


def _spec_vocabulary(spec: dict, where: str) -> Vocabulary | None:
    """The vocabulary a units.json records; for folders written before it did, the one its k-means says."""
    if "vocabulary" in spec:
        return Vocabulary.from_json(spec["vocabulary"], where)
    k = spec.get("kmeans").get("k") if isinstance(spec.get("kmeans"), dict) else None
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return None
    return kmeans_vocabulary(spec, k, spec["kmeans"].get("sha256"))


def folder_vocabulary(folder: str | Path) -> Vocabulary | None:
    """The unit vocabulary of a published dataset (``speechinstruct.json``) or a units folder (``units.json``),
    or None when the folder records none. Folders written before the vocabulary record existed give the one
    their K says."""
    folder = Path(folder)
    if (folder / "speechinstruct.json").is_file():
        meta = read_dataset_meta(folder)
        where = str(folder / "speechinstruct.json")
        if "vocabulary" in meta:
            return Vocabulary.from_json(meta["vocabulary"], where)
        return _spec_vocabulary({"kmeans": {"k": meta.get("k"), **(meta.get("kmeans") or {})},
                                 "frame_rate": (meta.get("extractor") or {}).get("frame_rate"),
                                 "features": (meta.get("extractor") or {}).get("features")}, where)
    spec = read_units_spec(folder)
    return None if spec is None else _spec_vocabulary(spec, str(folder / "units.json"))


def folder_k(folder: str | Path) -> int | None:
    """K (the vocabulary's size) of the units in a published dataset or a units folder, or None."""
    vocabulary = folder_vocabulary(folder)
    return vocabulary.size if vocabulary is not None else None


# ---------------------------------------------------------------------------------- feature file format

def feature_schema(dim: int, float16: bool) -> pa.Schema:
    value = pa.float16() if float16 else pa.float32()
    return pa.schema([("id", pa.string()), ("features", pa.list_(pa.list_(value, dim)))])


def features_array(feats: list[np.ndarray], dim: int, float16: bool) -> pa.Array:
    dtype = np.float16 if float16 else np.float32
    flat = np.concatenate([f.astype(dtype, copy=False).ravel() for f in feats]) if feats else np.zeros(0, dtype)
    frames = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    offsets = np.concatenate([[0], np.cumsum([f.shape[0] for f in feats])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), frames)


def _feature_reader(path: str | Path) -> pa.ipc.RecordBatchFileReader:
    """A feature file opened from a memory map, its schema checked: ``features``, a list of fixed-size frames."""
    with naming(path):
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    index = reader.schema.get_field_index("features")
    kind = reader.schema.field(index).type if index >= 0 else None
    if kind is None or not (pa.types.is_list(kind) and pa.types.is_fixed_size_list(kind.value_type)):
        raise ValueError(f"{path}: not a feature file (no 'features' column of frames: {reader.schema.names}); "
                         "rerun the stage that wrote it")
    return reader


def frame_blocks(path: str | Path) -> Iterator[tuple[pa.RecordBatch, np.ndarray, np.ndarray]]:
    """One feature file record batch by record batch, from a memory map: the batch, its utterances' frame offsets
    into the frames, and its frames (total, dim) as stored (float32 or float16), nothing read before it is used."""
    reader = _feature_reader(path)
    for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        col = batch.column(batch.schema.get_field_index("features"))
        offsets = col.offsets.to_numpy()
        flat = col.values.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.value_type.list_size)
        yield batch, offsets - offsets[0], flat[offsets[0] : offsets[-1]]


def feature_dim(path: str | Path) -> int:
    """The frame dimension of one feature file, from its schema (no frame is read)."""
    return _feature_reader(path).schema.field("features").type.value_type.list_size


def iter_features(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(id, (frames, dim) float32) per utterance of one feature file, record batch by record batch from a
    memory map: memory holds one utterance's float32 copy at most (none for float32 files), whatever the
    shard's size."""
    for batch, offsets, flat in frame_blocks(path):
        for i, uid in enumerate(batch.column(batch.schema.get_field_index("id")).to_pylist()):
            yield uid, flat[offsets[i] : offsets[i + 1]].astype(np.float32, copy=False)


def read_features(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """Ids and (frames, dim) float32 arrays of one feature file (all in memory: for tests and small files)."""
    pairs = list(iter_features(path))
    return [uid for uid, _ in pairs], [f for _, f in pairs]
