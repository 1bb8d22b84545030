"""``speechinstruct score IN OUT``: how good each utterance's speech is, as columns, by the judges of
``speechinstruct.judges`` (DNSMOS, an ASR round trip, speaker similarity, language ID).

Input: a ``shard`` output (``manifest-NNNNN.parquet``) or a units folder (``units-NNNNN.parquet``). Output per
input shard: ``scores-NNNNN.parquet`` (``schemas/scores.json``) and ``errors-NNNNN.jsonl`` (utterances that could
not be scored, and why); ``score.json`` records the judges (models and their hashes), ``summary.json`` the
distribution of every score. A shard is done when its scores file exists (written atomically) and none of its
errors may pass (audio that storage failed to give for a while); a rerun skips it, and does the others again.
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .. import records
from ..io import iter_rows, parquet_rows, read_table, remove_stale_temps, write_json, write_text
from ..judges.asr import TRANSIENT_STATUS
from ..judges.judge import Judge
from ..shardfiles import (check_finished, check_kind, check_spec, finished, made_from, repeat_reason, repeated_elsewhere,
                          select_shards, shard_suffix)


SCORE_COLUMNS = ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808", "asr_text", "wer", "cer",
                 "speaker_similarity", "text_language", "asr_language")


def _leave_out(rows, earlier: dict[str, str], errors: list[dict]):
    """``rows`` without those whose ids ``earlier`` names, each of which goes to ``errors`` with its reason."""
    from ..sources.decoding import error_record

    for row in rows:
        if row["id"] in earlier:
            errors.append(error_record(row, repeat_reason(earlier[row["id"]])))
        else:
            yield row


def input_files(folder: str | Path) -> tuple[list[Path], str]:
    """The shard files of a manifest or units folder (or one such file), and which kind they are."""
    folder = Path(folder)
    for pattern, kind in (("manifest-*.parquet", "manifest"), ("units-*.parquet", "units")):
        made_by = "shard" if kind == "manifest" else "quantize"
        if folder.is_file() and folder.match(pattern):
            return [check_kind(folder, kind, made_by)], kind
        files = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if files:
            return [check_kind(f, kind, made_by) for f in files], kind
    raise FileNotFoundError(f"{folder}: no manifest-*.parquet or units-*.parquet files: score reads a `shard` "
                            "output or a units folder")


def audio_root(folder: Path, kind: str) -> Path:
    """The corpus root of a manifest folder (summary.json) or a units folder (units.json, as extract wrote it)."""
    from ..shardfiles import corpus_root, read_units_spec

    if kind == "manifest":
        return corpus_root(folder)
    root = (read_units_spec(folder) or {}).get("root")
    if isinstance(root, str):
        return Path(root)
    raise FileNotFoundError(f"{(folder if folder.is_dir() else folder.parent) / 'units.json'}: no corpus root recorded; "
                            "pass --root")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score(source: str | Path, out: str | Path, judge: Judge, root: str | Path | None = None, num_shards: int = 1,
          shard_index: int = 0, workers: int | None = None, clips_at_a_time: int | None = None) -> dict:
    """Score every utterance of the shards this worker owns (see the module docstring); returns the summary.
    ``workers``: audio decoding threads (default: every usable CPU when a judge runs on a GPU, else 2).
    ``clips_at_a_time``: decoded clips handed to the judges per call (default: 16, or four ASR batches when that
    is more, so that a batch is never cut short by the chunk and the ASR's length sort has clips to group)."""
    from ..progress import progress
    from ..sources.decoding import AUDIO_COLUMNS, check_root, decode_rows, error_record
    from ..threads import decode_workers

    devices = [str(getattr(j, "device", "cpu")) for j in (judge.dnsmos, judge.asr, judge.speaker) if j is not None]
    workers = workers or decode_workers(next((d for d in devices if d != "cpu"), "cpu"))

    source, out = Path(source), Path(out)
    clips_at_a_time = clips_at_a_time or max(16, 4 * getattr(judge.asr, "batch_size", 0))
    files, kind = input_files(source)
    root = check_root(Path(root) if root else audio_root(source, kind), source)
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, {**judge.spec, "source": str(source.resolve()), "root": str(root.resolve())}, "score.json")
    schema = records.arrow_schema("scores")
    done = skipped = 0
    started = time.perf_counter()
    mine = select_shards(files, num_shards, shard_index)
    repeats = None
    for path in mine:
        suffix = shard_suffix(path)
        target = out / f"scores-{suffix}.parquet"
        if finished(target, path) and not transient_errors(out / f"errors-{suffix}.jsonl"):
            skipped += 1
            continue
        remove_stale_temps(out, f".*-{suffix}.*.tmp-*")
        present = _columns(path)
        rows = iter_rows(path, columns=[c for c in (*AUDIO_COLUMNS, "text", "speaker") if c in present])
        total = _num_rows(path)
        errors: list[dict] = []
        if repeats is None:  # ids an earlier shard holds (a shard copied beside itself): skips, as extract makes them
            repeats = repeated_elsewhere(files)
        if earlier := repeats.get(path.name):
            rows = _leave_out(rows, earlier, errors)
            total -= len(earlier)  # the progress bar counts the rows scored
        embeddings: list[np.ndarray] = []  # row for row with the scores file (score --speaker)
        bar = progress(total=total, desc=f"score {path.name}", unit="utt")
        with parquet_rows(target, schema, lambda rs: records.to_table("scores", rs), metadata=made_from(path)) as sink:
            for chunk in _chunks(decode_rows(rows, root, workers), clips_at_a_time):
                good = [(row, wav) for row, wav in chunk if not isinstance(wav, str)]
                errors += [error_record(row, wav) for row, wav in chunk if isinstance(wav, str)]
                results = judge.scores([w for _, w in good], [r.get("text") for r, _ in good],
                                       [r.get("speaker") for r, _ in good]) if good else []
                for (row, _), result in zip(good, results):
                    if isinstance(result, str):
                        errors.append(error_record(row, result))
                    else:
                        sink.add({"id": row["id"], "duration": row["duration"], **{c: result.get(c) for c in SCORE_COLUMNS}})
                        if "embedding" in result:
                            embeddings.append(result["embedding"])
                bar.update(len(chunk))
            bar.close()
            write_text(out / f"errors-{suffix}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
            if judge.speaker is not None:  # before the scores file appears: a complete shard has its embeddings
                write_embeddings(out / f"embeddings-{suffix}.npy", embeddings, judge.speaker.dim)
        done += 1
    halved = sum(getattr(j, "counts", {}).get("batches_halved", 0) for j in (judge.dnsmos, judge.asr) if j is not None)
    summary = {"shards_done": done, "shards_skipped": skipped, "seconds": round(time.perf_counter() - started, 3),
               **({"batches_halved": halved} if halved else {}), **summarise(out)}
    write_json(out / "summary.json", summary)
    check_finished(out, [shard_suffix(p) for p in mine], summary)
    return summary


def transient_errors(path: Path) -> int:
    """How many errors of an errors file record a passing server failure (HTTP 408/409/429/5xx), as versions before
    0.3 wrote them: such a shard is scored again on a rerun."""
    if not path.is_file():
        return 0
    statuses = "|".join(map(str, TRANSIENT_STATUS))
    pattern = re.compile(rf"answered HTTP (?:{statuses})\b")
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line))


def write_embeddings(path: Path, embeddings: list[np.ndarray], dim: int) -> None:
    """(rows, dim) float16 speaker embeddings, row i the scores file's row i, written atomically."""
    from ..io import atomic_path

    array = np.asarray(embeddings, dtype=np.float16).reshape(len(embeddings), dim)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def read_embeddings(folder: str | Path, suffix: str) -> tuple[list[str], np.ndarray] | None:
    """(ids, embeddings) of one shard of a ``score --speaker`` output, or None when it has none."""
    path = Path(folder) / f"embeddings-{suffix}.npy"
    if not path.is_file():
        return None
    ids = read_table(Path(folder) / f"scores-{suffix}.parquet", columns=["id"]).column("id").to_pylist()
    return ids, np.load(path, allow_pickle=False).astype(np.float32)


def _columns(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    from ..io import naming

    with naming(path):
        return set(pq.read_schema(path).names)


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


HISTOGRAM_BINS = {"dnsmos_ovrl": np.linspace(1, 5, 17), "dnsmos_sig": np.linspace(1, 5, 17),
                  "dnsmos_bak": np.linspace(1, 5, 17), "dnsmos_p808": np.linspace(1, 5, 17),
                  "wer": np.linspace(0, 1, 11), "cer": np.linspace(0, 1, 11)}


def summarise(folder: str | Path) -> dict:
    """Counts, mean, percentiles and a histogram of every score over all scores files of a folder, and the
    skip reasons of the errors files."""
    from ..sources.decoding import reason_key

    folder = Path(folder)
    tables = [read_table(p) for p in sorted(folder.glob("scores-*.parquet"))]
    reasons: collections.Counter[str] = collections.Counter()
    for p in sorted(folder.glob("errors-*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                reasons[reason_key(json.loads(line))] += 1
    summary: dict = {"utterances": sum(t.num_rows for t in tables), "skipped": sum(reasons.values()),
                     "skip_reasons": dict(reasons.most_common()), "scores": {}}
    for column in ("text_language", "asr_language"):  # utterances per language measured (score --language)
        found = collections.Counter(v for t in tables if column in t.column_names for v in t.column(column).to_pylist() if v)
        if found:
            summary[column] = dict(found.most_common())
    for column, bins in HISTOGRAM_BINS.items():
        values = np.concatenate([t.column(column).to_numpy(zero_copy_only=False) for t in tables]) if tables else np.zeros(0)
        values = values[~np.isnan(values.astype(np.float64))] if values.size else values
        if not values.size:
            continue
        values = values.astype(np.float64)
        counts, edges = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)
        summary["scores"][column] = {
            "count": int(values.size), "mean": round(float(values.mean()), 4),
            **{f"p{q}": round(float(np.percentile(values, q)), 4) for q in (5, 50, 95)},
            "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}}
    return summary


def read_scores(folder: str | Path, suffix: str) -> dict[str, dict]:
    """id → score columns of one shard (``scores-{suffix}.parquet``)."""
    path = Path(folder) / f"scores-{suffix}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: run `speechinstruct score` on this shard first")
    table = read_table(path)
    return {row["id"]: {c: row.get(c) for c in SCORE_COLUMNS} for row in table.to_pylist()}  # older files lack some
