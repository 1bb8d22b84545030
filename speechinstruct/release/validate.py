"""``speechinstruct validate``: check every record of a published dataset (or of any output folder or
Parquet file of this project) against ``schemas/`` and SpeechInstruct's rules.

Rules, each with a name that appears in the report:
  schema        types, required fields, enums and patterns of ``schemas/{kind}.json``
  unit-range    every unit id in [0, K)
  unit-markers  ``<sosp>``/``<eosp>`` balanced and not nested in ``plain_text``
  shape         ``plain_text`` has the shape of its task/format
  units-match   the unit strings in ``plain_text``/``text``/``unit_text`` equal the ``units`` columns
  text-match    the texts in ``plain_text`` equal the ``text``/``instruction``/``response`` columns
  empty-text    no blank texts
  durations     (units) durations sum to ``n_frames``; utterance duration sane
  content-hash  ``content_hash`` equals the hash of the record's content
  prompt-completion  ``prompt``/``completion`` equal ``prefix``/``plain_text``
  markup        no text field (transcript, instruction, response, a dialogue's turns, an interleaved record's
                segments) holds record markup such as ``<eoa> [Human]:`` or ``<sosp><5><eosp>``: it would plant
                fake turns or units
  control-character  no text field holds a control character (a NUL stops a TTS engine mid-text) and no field
                a lone surrogate
  duplicate-id  ids unique within a config
"""

from __future__ import annotations

import collections
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from .. import records
from ..io import iter_rows, naming
from ..kinds import RECORD_KINDS
from ..shardfiles import duplicate_ids, folder_k
from ..speechgpt import record_problems

CONTENT_KINDS = tuple(RECORD_KINDS)


@dataclass
class Report:
    records: dict = field(default_factory=dict)  # config → records checked
    failed: dict = field(default_factory=dict)   # config → records with at least one error
    by_rule: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)
    k: int | None = None

    @property
    def ok(self) -> bool:
        return not self.by_rule

    def as_dict(self) -> dict:
        return {"ok": self.ok, "k": self.k, "records": self.records, "failed_records": self.failed,
                "errors_by_rule": dict(sorted(self.by_rule.items())), "errors": self.examples}



def check_record(kind: str, r: dict, k: int | None) -> list[tuple[str, str]]:
    """(rule, message) for every rule the record breaks."""
    errors = [("schema", e) for e in records.record_errors(kind, r)]
    if errors:
        return errors  # later rules assume the schema holds
    errors += records.unit_rules(kind, r, k)
    for column in ("text", "transcript", "instruction", "response", "prefix"):
        if column in r and isinstance(r[column], str) and column != "prefix" and not r[column].strip():
            errors.append(("empty-text", f"{column} is blank"))
    if "content_hash" in r:
        if r["content_hash"] != records.content_hash(r):
            errors.append(("content-hash", "content_hash does not match the record's content"))
    errors += record_problems(r)  # markup and control characters: the check compose makes before writing
    if any(rule in ("markup", "control-character") for rule, _ in errors):
        return errors  # the kind's rules (its text's shape) would only repeat it
    rule = kind_rule(kind)
    if rule is not None:  # what a kind's schema cannot say of it
        errors += rule(r, k)
    return errors


@functools.cache
def kind_rule(kind: str):
    """A record kind's own rule (``record_errors(record, k)`` in its module, ``compose/{kind}.py``), or None."""
    if kind not in RECORD_KINDS:
        return None
    return getattr(importlib.import_module(f"speechinstruct.compose.{kind}"), "record_errors", None)





def _targets(path: Path) -> list[tuple[str, str, list[Path]]]:
    """(config, kind, files) to check."""
    if path.is_file():
        with naming(path):
            kind = (pq.read_schema(path).metadata or {}).get(b"speechinstruct.kind", b"").decode()
        if kind not in records.KINDS:
            raise ValueError(f"{path}: not a speechinstruct Parquet file (no speechinstruct.kind in its schema)")
        return [(path.name, kind, [path])]
    out = []
    data = path / "data" if (path / "data").is_dir() else path
    for kind in CONTENT_KINDS:
        files = sorted((data / kind).glob("*.parquet"))
        if files:
            out.append((kind, kind, files))
    for pattern, kind in (("units-*.parquet", "units"), ("manifest-*.parquet", "manifest")):
        files = sorted(path.glob(pattern))
        if files:
            out.append((kind, kind, files))
    if not out:
        raise FileNotFoundError(f"{path}: nothing to validate (no data/{{config}}/*.parquet, units-*, manifest-*)")
    return out


def validate(path: str | Path, k: int | None = None, max_examples: int = 50) -> Report:
    path = Path(path)
    report = Report(k=k if k is not None else folder_k(path))
    for config, kind, files in _targets(path):
        check_files(report, config, kind, files, path, max_examples)
    return report


def check_files(report: Report, config: str, kind: str, files: list[Path], base: Path, max_examples: int = 50) -> None:
    """Check every record of ``files`` (one config, ids unique across them) into ``report``; files are named
    relative to ``base``. ``publish`` calls this on what it is about to publish."""
    repeated, seen = duplicate_ids(files), {}  # seen: of the repeated ids only, where each was first (memory does not grow with files)
    report.records[config] = report.failed[config] = 0
    for f in files:
        rel = f.relative_to(base) if f != base and base in f.parents else f.name
        for i, rec in enumerate(iter_rows(f)):  # a record batch in memory at a time
            report.records[config] += 1
            errors = check_record(kind, rec, report.k)
            if isinstance(key := rec.get("id"), str) and key in repeated:  # another type is the schema's error
                if key in seen:
                    errors.append(("duplicate-id", f"id appears more than once (first in {seen[key]})"))
                else:
                    seen[key] = f"{rel} row {i}"
            if errors:
                report.failed[config] += 1
            for rule, message in errors:
                report.by_rule[rule] += 1
                if len(report.examples) < max_examples:
                    report.examples.append({"file": str(rel), "row": i,
                                            "id": key if key is None or isinstance(key, str) else repr(key),
                                            "rule": rule, "message": message})


def format_report(report: Report) -> str:
    lines = [f"K = {report.k if report.k is not None else 'unknown (unit-range not checked; pass --k)'}"]
    for config, n in report.records.items():
        lines.append(f"{config:>20}: {n} records, {report.failed[config]} failing")
    if report.ok:
        lines.append("PASS: every record satisfies every rule")
    else:
        lines.append("FAIL: " + ", ".join(f"{rule} ×{n}" for rule, n in sorted(report.by_rule.items())))
        for e in report.examples:
            lines.append(f"  {e['file']} row {e['row']} ({e['id']}): [{e['rule']}] {e['message']}")
    return "\n".join(lines)
