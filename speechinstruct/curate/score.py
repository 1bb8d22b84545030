"""``speechinstruct score IN OUT``: how good each utterance's speech is, as columns, by the judges of
``speechinstruct.judges`` (DNSMOS, an ASR round trip, speaker similarity, language ID).

Input: a ``shard`` output (``manifest-NNNNN.parquet``) or a units folder (``units-NNNNN.parquet``). Output per
input shard: ``scores-NNNNN.parquet`` (``schemas/scores.json``) and ``errors-NNNNN.jsonl`` (utterances that could
not be scored, and why); ``score.json`` records the judges (models and their hashes), ``summary.json`` the
distribution of every score. A shard is done when its scores file exists (written atomically) and none of its
errors may pass (audio that storage failed to give for a while); a rerun skips it, and does the others again.

Two engines share the loop that writes the files (:func:`score_shards`): the local one (:func:`score`) decodes
with threads and judges here; ``--engine ray`` (:func:`score_ray`) has judge actors on the nodes of a Ray cluster
do it, on the blocks ``extract --engine ray`` cuts (``units.engine_ray``).
"""

from __future__ import annotations

import collections
import json
import os
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


TEXT_COLUMNS = ("text", "speaker")  # what the judges read of a row besides its audio
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
    from ..threads import decode_workers

    devices = [str(getattr(j, "device", "cpu")) for j in (judge.dnsmos, judge.asr, judge.speaker) if j is not None]
    workers = workers or decode_workers(next((d for d in devices if d != "cpu"), "cpu"))
    clips_at_a_time = clips_at_a_time or max(16, 4 * getattr(judge.asr, "batch_size", 0))

    def results_for(path: Path, rows: Iterable[dict], root: Path) -> Iterator[tuple[dict, dict | str]]:
        return judged(rows, root, judge, workers, clips_at_a_time)

    return score_shards(source, out, judge.spec, results_for, root, num_shards, shard_index,
                        judge.speaker.dim if judge.speaker is not None else None, lambda: halved_counts(judge))


def judged(rows: Iterable[dict], root: Path, judge: Judge, workers: int, clips_at_a_time: int
           ) -> Iterator[tuple[dict, dict | str]]:
    """(row, its scores or the reason it has none) for each row, in order: the audio decoded by ``workers``
    threads, handed to the judges ``clips_at_a_time`` clips at a time."""
    from ..sources.decoding import decode_rows

    for chunk in _chunks(decode_rows(rows, root, workers), clips_at_a_time):
        yield from zip((row for row, _ in chunk), judge_chunk(judge, chunk))


def judge_chunk(judge: Judge, chunk: list[tuple[dict, np.ndarray | str]]) -> list[dict | str]:
    """The judges' verdict on each (row, samples | the reason it has none) of ``chunk``, in one call."""
    good = [(row, wav) for row, wav in chunk if not isinstance(wav, str)]
    results = iter(judge.scores([w for _, w in good], [r.get("text") for r, _ in good],
                                [r.get("speaker") for r, _ in good]) if good else [])
    return [wav if isinstance(wav, str) else next(results) for _, wav in chunk]


def halved_counts(judge: Judge) -> dict:
    """``{"batches_halved": n}``: batches the judges halved for memory so far; ``{}`` when none."""
    n = sum(getattr(j, "counts", {}).get("batches_halved", 0) for j in (judge.dnsmos, judge.asr) if j is not None)
    return {"batches_halved": n} if n else {}


def to_do(files: list[Path], out: Path, num_shards: int, shard_index: int) -> tuple[list[Path], list[Path]]:
    """(the shards of ``files`` this worker owns, those of them still to score): a shard is done when its scores
    file, made from the shard as it is now, is there and none of its errors may pass on a rerun."""
    mine = select_shards(files, num_shards, shard_index)
    return mine, [p for p in mine if not (finished(out / f"scores-{shard_suffix(p)}.parquet", p)
                                          and not transient_errors(out / f"errors-{shard_suffix(p)}.jsonl"))]


def score_shards(source: str | Path, out: str | Path, spec: dict, results_for, root: str | Path | None,
                 num_shards: int, shard_index: int, speaker_dim: int | None, counts=dict,
                 pending: list[Path] | None = None, repeats: dict[str, dict[str, str]] | None = None) -> dict:
    """The loop both engines share: for each shard of ``source`` this worker owns and has not finished (or of
    ``pending``, when the engine has chosen them), ``results_for(shard, rows, root)`` yields (row, scores | reason)
    in order, written as that shard's scores and errors (and speaker embeddings, ``speaker_dim`` wide).
    ``spec``: the judges', recorded in score.json; ``counts()``: the engine's keys of the summary; ``repeats``:
    :func:`repeated_elsewhere` of the shards, when the engine has read it (else read here, once, when needed)."""
    from ..progress import progress
    from ..sources.decoding import audio_columns, check_root, error_record

    source, out = Path(source), Path(out)
    files, kind = input_files(source)
    root = check_root(Path(root) if root else audio_root(source, kind), source)
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, {**spec, "source": str(source.resolve()), "root": str(root.resolve())}, "score.json")
    schema = records.arrow_schema("scores")
    done = skipped = 0
    started = time.perf_counter()
    mine, todo = (to_do(files, out, num_shards, shard_index) if pending is None
                  else (select_shards(files, num_shards, shard_index), pending))
    for path in mine:
        suffix = shard_suffix(path)
        target = out / f"scores-{suffix}.parquet"
        if path not in todo:
            skipped += 1
            continue
        remove_stale_temps(out, f".*-{suffix}.*.tmp-*")
        rows = iter_rows(path, columns=audio_columns(path, TEXT_COLUMNS))
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
            for row, result in results_for(path, rows, root):
                if isinstance(result, str):
                    errors.append(error_record(row, result))
                else:
                    sink.add({"id": row["id"], "duration": row["duration"], **{c: result.get(c) for c in SCORE_COLUMNS}})
                    if "embedding" in result:
                        embeddings.append(result["embedding"])
                bar.update(1)
            bar.close()
            write_text(out / f"errors-{suffix}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
            if speaker_dim is not None:  # before the scores file appears: a complete shard has its embeddings
                write_embeddings(out / f"embeddings-{suffix}.npy", embeddings, speaker_dim)
        done += 1
    summary = {"shards_done": done, "shards_skipped": skipped, "seconds": round(time.perf_counter() - started, 3),
               **counts(), **summarise(out)}
    write_json(out / "summary.json", summary)
    check_finished(out, [shard_suffix(p) for p in mine], summary)
    return summary


# ------------------------------------------------------------------------------------- the Ray engine
class JudgeActor:
    """The judges on one node of a Ray cluster (``score --engine ray``): decoded blocks in, scores out. Each
    actor loads them itself, on its own device, from the options ``Judge.load`` takes."""

    def __init__(self, options: dict, device: str, threads: int, clips_at_a_time: int | None, cwd: str):
        import torch

        from ..sources.storage import fetch_copy_of
        from ..units.engine_ray import node_name

        if os.path.isdir(cwd):  # the driver's working folder, where it is on this node: relative paths as given there
            os.chdir(cwd)
        for name in ("asr", "speaker", "references"):  # given as a URL: the driver's copy, made here too
            if options.get(name):
                fetch_copy_of(options[name])
        torch.set_num_threads(max(1, threads))
        self.judge = Judge.load(**options, device=device, threads=threads)
        self.clips = clips_at_a_time or max(16, 4 * getattr(self.judge.asr, "batch_size", 0))
        self.node, self.halved = node_name(), 0

    def spec(self) -> tuple[str, dict, int | None]:
        """(this node, the judges' spec, the speaker embeddings' width or None)."""
        return self.node, self.judge.spec, self.judge.speaker.dim if self.judge.speaker is not None else None

    def run(self, decoded: list[tuple[str, np.ndarray | str]], texts: list[dict]) -> tuple[str, list, dict]:
        """(this node, (id, scores | reason) per utterance, {batches halved for memory since the last block})."""
        results = []
        for chunk in _chunks(list(zip(texts, decoded)), self.clips):
            verdicts = judge_chunk(self.judge, [(row, wav) for row, (_, wav) in chunk])
            results += [(uid, verdict) for (_, (uid, _)), verdict in zip(chunk, verdicts)]
        now = halved_counts(self.judge).get("batches_halved", 0)
        counts, self.halved = {"batches_halved": now - self.halved}, now
        return self.node, results, counts


def same_judges(specs: list[tuple[str, dict, int | None]]) -> tuple[dict, int | None]:
    """The judges' spec and speaker embedding width all actors reported ((node, spec, width) each), or one line
    naming two nodes whose judges differ (another version of a library or model on one of them)."""
    from ..units.engine_ray import RayJobError

    (node, spec, width), *others = specs
    for other, theirs, _ in others:
        if theirs != spec:
            changed = sorted(k for k in set(spec) | set(theirs) if spec.get(k) != theirs.get(k))
            raise RayJobError(f"ray engine: the judges on {other} are not those on {node} ({', '.join(changed)}: "
                              f"{ {k: theirs.get(k) for k in changed} } against { {k: spec.get(k) for k in changed} }); "
                              "install the same versions and models on every node")
    return spec, width


def score_ray(source: str | Path, out: str | Path, options: dict, root: str | Path | None = None,
              num_shards: int = 1, shard_index: int = 0, device: str = "auto", actors: int = 2,
              num_gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, address: str | None = None,
              block_seconds: float | None = None, depth: int = 2, max_retries: int = 3,
              clips_at_a_time: int | None = None) -> dict:
    """``score`` (same files) on a Ray cluster, as ``extract --engine ray`` runs: the driver cuts the shards still
    to do into blocks of about ``block_seconds`` of audio (600 unless given), a decode task per block (any node) reads it, and
    ``actors`` judge actors spread over the nodes score it, each with the judges ``options`` name (the arguments
    of :meth:`Judge.load` but ``device``) loaded on ``device`` (``auto``: cuda when actors get GPUs). So the
    ASR model and the speaker references, like the corpus, must be readable at the same path on every node (or
    the ASR a hub id in each node's cache); relative paths are taken from the driver's working folder where a
    node has it. Every actor's judges must be the same (their spec), else one line."""
    from ..sources.decoding import check_root
    from ..devices import actor_device
    from ..units.engine_ray import (RayJobError, _Window, actor_pool, blocks, check_pool, connect, decode_block,
                                    reason_of)

    from ..llm import check_endpoint

    check_pool(actors, cpus_per_actor, num_gpus_per_actor)
    check_endpoint(options.get("base_url"), "--base-url")  # here: a URL's credentials never go through Ray
    device = actor_device(device, num_gpus_per_actor)
    source, out = Path(source), Path(out)
    files, kind = input_files(source)
    root = check_root(Path(root) if root else audio_root(source, kind), source)
    _, pending = to_do(files, out, num_shards, shard_index)
    ray = connect(address)
    # one actor, for the judges' spec, when every shard is done: a rerun with other judges is still refused
    with actor_pool(ray, JudgeActor, (options, device, max(1, int(cpus_per_actor)), clips_at_a_time, os.getcwd()),
                    actors if pending else 1, cpus_per_actor, num_gpus_per_actor, max_retries) as pool:
        try:
            specs = ray.get([actor.spec.remote() for actor in pool])
        except ray.exceptions.RayError as e:
            raise RayJobError(f"ray engine: the judges could not be loaded on an actor: {reason_of(e, whole=True)}") from None
        spec, speaker_dim = same_judges(specs)
        decode = ray.remote(decode_block).options(num_cpus=1, max_retries=max_retries)
        repeats = repeated_elsewhere(files) if pending else {}  # the blocks and the loop that writes them both need it
        todo = blocks(pending, block_seconds or 600.0, repeats, extra=TEXT_COLUMNS)
        where = str(root.absolute())  # a decode task's working folder is not the driver's
        window = _Window(ray, todo, pool, lambda actor, block: actor.run.remote(
            decode.remote(block.rows, where), [{c: r.get(c) for c in TEXT_COLUMNS} for r in block.rows]), depth, max_retries)

        def results_for(path: Path, rows: Iterable[dict], root: Path):
            return window.results_for(path.name, list(rows))

        def counts() -> dict:
            return {**({"batches_halved": window.halved} if window.halved else {}), "engine": "ray",
                    "actors": len(pool) if pending else 0, "nodes": dict(sorted(window.nodes.items()))}

        return score_shards(source, out, spec, results_for, root, num_shards, shard_index, speaker_dim, counts,
                            pending, repeats)


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
