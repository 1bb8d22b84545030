"""Reading the audio of a manifest row, wherever it lies: a file (a span of it), a member of a WebDataset tar (its
bytes, at their offset), or a cell of a Hugging Face dataset file (Parquet row groups or an Arrow stream, read as
encoded bytes). Every stage that decodes audio (extract, score, dedup, align, the report, the Ray engine's
decode tasks) reads it here; the corpus readers only record where it lies.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import io
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import audio
from ..io import naming, safe_join
from . import storage


def bounded_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most ``ahead`` results waiting."""
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# the manifest columns decode_row reads: the Ray engine ships only these to its decode tasks
AUDIO_COLUMNS = ("id", "path", "offset", "duration", "row", "audio_column", "tar_offset", "tar_size", "channel")


def audio_columns(path: str | Path, extra: Iterable[str] = ()) -> list[str]:
    """The columns of :data:`AUDIO_COLUMNS` and ``extra`` that the Parquet file ``path`` has: a manifest or units
    file written before a column existed (``row``, ``audio_column``, ``channel``) lacks it, and decode_row reads
    such a row as before."""
    with naming(path):
        present = set(pq.read_schema(path).names)
    return [c for c in (*AUDIO_COLUMNS, *extra) if c in present]


def row_problem(row: dict) -> str | None:
    """Why a manifest row cannot say where its audio is (a row another tool wrote, or a hand edit: a null path or
    duration, a negative, NaN or infinite time, an empty id), or None when it can."""
    from .. import records

    problem = records.columns_problem("manifest", row, AUDIO_COLUMNS)
    if problem:
        return f"not a manifest row ({problem})"
    bad = [c for c in ("offset", "duration") if not math.isfinite(row[c])]  # NaN passes the schema's bounds
    if bad:
        return f"not a manifest row ({' and '.join(bad)} not a finite number)"
    return "not a manifest row (a NUL character in its path)" if "\x00" in row["path"] else None


def seconds(row: dict) -> float:
    """A row's duration, or 0 for a row :func:`row_problem` refuses: the Ray engine cuts blocks by it."""
    return 0.0 if row_problem(row) else row["duration"]


def check_root(root: Path, source: Path) -> Path:
    """``root`` when it is a folder: the corpus root the rows' audio paths are relative to (recorded in ``source``'s
    summary.json or units.json, or given with ``--root``). Gone (a storage mount missing, a corpus moved), every row
    would be a skip and every shard written empty, as done: one line instead, before any output."""
    if not Path(root).is_dir() and not storage.in_a_copy(root):  # a bucket's copy is fetched file by file as rows read it
        raise FileNotFoundError(f"{root}: the corpus root is not there (the audio of {source}); mount or restore it, "
                                "or pass --root where the audio is now")
    return Path(root)


class MayPass(str):
    """The reason a row's audio could not be read when reading it again may work (storage that failed for a
    while: :func:`storage.may_pass`): its shard is written, and done again by the stage's rerun."""


def error_record(row: dict, reason: str) -> dict:
    """The line of a stage's ``errors-NNNNN.jsonl`` for a row it could not use; ``may_pass`` when a rerun may."""
    return {"id": row["id"], "path": row["path"], "reason": reason, **({"may_pass": True} if isinstance(reason, MayPass) else {})}


def reason_key(error: dict) -> str:
    """What an error counts as: its reason without the file it names (``…/a.flac: unreadable audio (…)``) and without
    the detail in brackets, which may quote a server's answer (``{"text": ["a", "b"]}``)."""
    reason, name = str(error.get("reason", "")), Path(str(error.get("path") or "")).name
    if name and f"{name}: " in reason:
        reason = reason.rsplit(f"{name}: ", 1)[1]
    return reason.split(" (")[0].strip() or "unknown"


def decode_row(row: dict, root: str | Path, sample_rate: int = audio.TARGET_SR) -> np.ndarray | str:
    """The samples of one manifest row at ``sample_rate`` (16 kHz, or a codec's own rate: resampled once, from
    the file's rate), or the reason its audio cannot be used (a :class:`MayPass` when it may be read later). A
    row with a ``row`` number has its audio inside a dataset file (Hugging Face Parquet/Arrow), as encoded bytes;
    one with a ``tar_offset``, inside a tar. A row with a ``channel`` is that channel of its file alone."""
    problem = row_problem(row)
    if problem:
        return problem
    try:
        path = safe_join(root, row["path"], follow_links=True)  # its links were judged when the corpus was sharded
        if not path.exists():  # a copy of a bucket that another machine made: fetched here, once
            storage.fetch_copy(path)
        if row.get("tar_offset") is not None:  # a member of a WebDataset tar: its bytes, read in place
            with open(path, "rb") as f:
                f.seek(row["tar_offset"])
                data = f.read(row["tar_size"])
            if len(data) != row["tar_size"]:
                raise audio.AudioError(f"{row['path']}: {row['tar_size']} bytes at {row['tar_offset']} are not in the tar")
            return audio.load(io.BytesIO(data), row["offset"], row["duration"], target_sr=sample_rate,
                              name=f"{row['path']} at byte {row['tar_offset']}", channel=row.get("channel"))
        if row.get("row") is None:
            return _load_file(path, row, sample_rate)
        data = audio_bytes(path, row["audio_column"], row["row"])
        return audio.load(io.BytesIO(data), row["offset"], row["duration"], target_sr=sample_rate,
                          name=f"{row['path']} row {row['row']}", channel=row.get("channel"))
    except (audio.AudioError, ValueError, OSError, KeyError) as e:
        if not storage.may_pass(e):
            return str(e)
        return MayPass(e if row["path"] in str(e) else f"{row['path']}: {e}")  # a read's OSError names no file


def _load_file(path: Path, row: dict, sample_rate: int) -> np.ndarray:
    """A file's window, read by libsndfile, which says only "System error" or reads short when the storage
    fails: on failure the file's bytes are read here, so that an OS error that may pass (an I/O error of a
    network mount) is raised as itself; when they read well now, the window is decoded once more."""
    try:
        return audio.load(path, row["offset"], row["duration"], target_sr=sample_rate, channel=row.get("channel"))
    except audio.AudioError as failed:
        try:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except OSError as e:
            if storage.may_pass(e):
                raise
            raise failed from None
        return audio.load(path, row["offset"], row["duration"], target_sr=sample_rate, channel=row.get("channel"))


def decode_rows(rows: list[dict], root: Path, workers: int = 2,
                sample_rate: int = audio.TARGET_SR) -> Iterator[tuple[dict, np.ndarray | str]]:
    """(row, samples at ``sample_rate``) per row, or (row, reason) when the audio cannot be used."""
    return bounded_map(lambda row: (row, decode_row(row, root, sample_rate)), rows, workers=workers, ahead=4 * workers + 4)


def encoded_audio(value) -> bytes | None:
    """The encoded audio of one cell: an ``Audio`` struct's ``bytes``, or a plain ``binary`` column's value."""
    if isinstance(value, dict):
        return value.get("bytes") or None
    return value if isinstance(value, (bytes, bytearray)) and value else None


def audio_bytes(path: str | Path, column: str, row: int) -> bytes:
    """The encoded audio of ``row`` in a dataset file's ``column`` (a ``struct<bytes, path>`` or ``binary``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        group, index = _locate(str(path), row)
        table = _row_group(str(path), column, group)
    else:
        table, index = _arrow_table(str(path)), row
    if index >= table.num_rows:
        raise ValueError(f"{path}: no row {row} (the file has fewer rows: re-run shard)")
    data = encoded_audio(table.column(column)[index].as_py())
    if not data:
        raise ValueError(f"{path}: row {row} has no audio bytes in column {column!r}")
    return data


@functools.lru_cache(maxsize=16)
def _row_group_starts(path: str) -> tuple[int, ...]:
    meta = pq.ParquetFile(path).metadata
    starts, total = [], 0
    for i in range(meta.num_row_groups):
        starts.append(total)
        total += meta.row_group(i).num_rows
    return tuple(starts + [total])


def _locate(path: str, row: int) -> tuple[int, int]:
    import bisect

    starts = _row_group_starts(path)
    if not 0 <= row < starts[-1]:
        raise ValueError(f"{path}: no row {row} (the file has {starts[-1]} rows: re-run shard)")
    group = bisect.bisect_right(starts, row) - 1
    return group, row - starts[group]


@functools.lru_cache(maxsize=2)  # manifest rows come in file order: one row group is read once, not per row
def _row_group(path: str, column: str, group: int) -> pa.Table:
    return pq.ParquetFile(path).read_row_group(group, columns=[column])


@functools.lru_cache(maxsize=4)
def _arrow_table(path: str) -> pa.Table:
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()  # memory-mapped: pages are read as rows are used
