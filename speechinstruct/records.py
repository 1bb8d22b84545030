"""The record definitions, read from ``schemas/*.json``: the one source for JSON validation and Arrow types.

Each property of a schema carries ``x-arrow``, the Arrow type of its column; nullable columns are those
whose JSON type admits ``null``.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pyarrow as pa

from .kinds import RECORD_KINDS

KINDS = ("manifest", "units", *RECORD_KINDS, "scores")  # the stage files' kinds, and every record kind

_ARROW = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}


def _arrow_type(name: str) -> pa.DataType:
    """``int32``, ``list<T>``, ``struct<a:T,b:T>`` (fields of primitive types)."""
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(_arrow_type(name[5:-1]))
    if name.startswith("struct<") and name.endswith(">"):
        return pa.struct([(field, _ARROW[kind]) for field, kind in (f.split(":") for f in name[7:-1].split(","))])
    return _ARROW[name]


@functools.cache
def json_schema(kind: str) -> dict:
    if kind not in KINDS:
        raise KeyError(f"unknown record kind {kind!r}; known: {', '.join(KINDS)}")
    checkout = Path(__file__).resolve().parent.parent / "schemas" / f"{kind}.json"
    if checkout.is_file():  # a source checkout or an editable install
        return json.loads(checkout.read_text())
    return json.loads(resources.files("speechinstruct.schemas").joinpath(f"{kind}.json").read_text())


@functools.cache
def arrow_schema(kind: str) -> pa.Schema:
    schema = json_schema(kind)
    fields = []
    for name, prop in schema["properties"].items():
        types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        fields.append(pa.field(name, _arrow_type(prop["x-arrow"]), nullable="null" in types))
    return pa.schema(fields, metadata={"speechinstruct.kind": kind})


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json_schema(kind))


@functools.cache
def _fast_check(kind: str):
    """The kind's schema compiled to Python by fastjsonschema (our schemas use only keywords that draft 7 and
    2020-12 read alike): 24x jsonschema on conforming cross-modal records (2-core machine); jsonschema, the reference, then
    explains any record it refuses."""
    import fastjsonschema

    schema = {k: v for k, v in json_schema(kind).items() if k != "$schema"}
    return fastjsonschema.compile(schema)


def record_errors(kind: str, record: dict) -> list[str]:
    """Schema violations of one record, as readable strings (empty when it conforms)."""
    import fastjsonschema

    try:
        _fast_check(kind)(record)
        return []
    except fastjsonschema.JsonSchemaException:
        pass  # jsonschema says what is wrong (and is the judge)
    out = []
    for err in _validator(kind).iter_errors(record):
        where = ".".join(str(p) for p in err.absolute_path) or "<record>"
        out.append(f"{where}: {err.message}")
    return out


@functools.cache
def _columns_check(kind: str, columns: tuple[str, ...]):
    import fastjsonschema

    schema = json_schema(kind)
    return fastjsonschema.compile({"type": "object", "required": [c for c in schema["required"] if c in columns],
                                   "properties": {c: schema["properties"][c] for c in columns}})


def columns_problem(kind: str, row: dict, columns: tuple[str, ...]) -> str | None:
    """What the ``kind`` schema refuses in the ``columns`` of ``row`` (a stage that reads only those: a row another
    tool wrote, or a hand edit), as one short message, or None. NaN passes a schema's bounds: the caller checks."""
    import fastjsonschema

    try:
        _columns_check(kind, tuple(columns))(row)
    except fastjsonschema.JsonSchemaException as e:
        return e.message.replace("data.", "", 1)
    return None


def unit_rules(kind: str, r: dict, k: int | None) -> list[tuple[str, str]]:
    """(rule, message) for what a record that passed its schema breaks of the unit rules (``validate``'s
    unit-range, units-match and durations): unit ids outside [0, K) (with ``k``), a unit string that is not
    its units', durations that do not pair with the units. compose checks the units rows it reads by them too."""
    from .speechgpt import to_text

    errors = []
    for column in ("units", "instruction_units", "response_units"):
        if k is not None and column in r:
            bad = [u for u in r[column] if not 0 <= u < k]
            if bad:
                errors.append(("unit-range", f"{column} has ids outside [0, {k}): {bad[:5]}"))
    if kind == "pretrain" and r["text"] != to_text(r["units"]):
        errors.append(("units-match", "text is not the unit string of units"))
    if kind == "units":
        if r["unit_text"] != to_text(r["units"]):
            errors.append(("units-match", "unit_text is not the unit string of units"))
        if len(r["durations"]) != len(r["units"]) or sum(r["durations"]) != r["n_frames"]:
            errors.append(("durations", "durations do not pair with units or do not sum to n_frames"))
        if r["n_frames"] > r["duration"] * 1000 + 10:
            errors.append(("durations", f"{r['n_frames']} frames for {r['duration']} s is not a plausible frame rate"))
    return errors


def content_hash(record: dict) -> str:
    """sha256 of a record's content: every field but ``content_hash`` itself and ``pipeline_version`` (so a
    new release that writes the same record gives the same hash). Compose writes it; validate checks it."""
    from .io import sha256_json

    return sha256_json({k: v for k, v in record.items() if k not in ("content_hash", "pipeline_version")})


def to_table(kind: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to an Arrow table of the kind's schema; extra keys are an error, missing ones too."""
    schema = arrow_schema(kind)
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"{kind} record {row.get('id')!r} has columns not in schemas/{kind}.json: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.table(columns, schema=schema)
