"""``speechinstruct extract``: manifest shards → one feature file per shard (or, fused with ``--kmeans``,
one units file per shard without storing features).

Streaming: rows are decoded a few at a time by a small thread pool (soundfile and soxr release the GIL),
grouped into batches of about ``batch_seconds`` of audio (sorted by length inside a group to limit
padding), run through the extractor and written out in manifest order. Memory is bounded by one group.

Output per manifest shard ``manifest-NNNNN.parquet``:
  ``features-NNNNN.arrow``: Arrow IPC file, columns ``id`` and ``features`` (list of fixed-size lists:
  frames × dim), readable zero-copy with a memory map; ``errors-NNNNN.jsonl``: utterances skipped, why.
``features.json`` records the extractor (kind, layer, checkpoint hash, dim, frame rate) and the manifest.
A shard is complete when its output file exists (written atomically) and none of its errors may pass (audio
that storage failed to give for a while: ``"may_pass": true``); a rerun skips complete shards and does the others
again, and a run that leaves such errors ends with one line saying so (exit 2).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from .. import audio, devices, recipe as settings
from ..io import atomic_path, read_table, remove_stale_temps, write_text
from ..memory import OutOfMemory, halving
from ..progress import progress
from ..threads import decode_workers
from ..shardfiles import (check_finished, check_spec, corpus_root, feature_schema, features_array, finished,
                          made_from, manifest_files, output_spec, repeat_reason, repeated_elsewhere, select_shards, shard_output, shard_suffix)
from ..sources.decoding import AUDIO_COLUMNS, bounded_map, check_root, decode_row, decode_rows, error_record, reason_key  # noqa: F401 (extract's API too)
from .features import Extractor
from .kmeans import SpeechEncoder
from .quantize import UnitWriter
from .tokenizer import dense_and_kmeans, is_tokenizer

log = logging.getLogger(__name__)


def makes_units(extractor, kmeans) -> bool:
    """Whether extract writes units (with k-means, or a tokenizer such as a codec) rather than features."""
    return kmeans is not None or is_tokenizer(extractor)


def compute(extractor: Extractor, decoded: Iterable, batch_seconds: float,
            counts: collections.Counter | None = None, kmeans=None) -> Iterator[tuple[dict, np.ndarray | str]]:
    """(row, features) per decoded row, in input order; batches of about ``batch_seconds`` of audio; with
    ``kmeans`` (on the model's GPU: :func:`assigns_on_device`) each row's unit labels instead, assigned where the
    frames are made (``labels_batch``), so that the frames never travel to the host. A batch that
    runs out of memory is halved (``counts["batches_halved"]``), and the batches after it are no larger than the
    largest part of it that fitted, so that running out of memory costs one failed try, not one per batch
    (``counts["fitted_seconds"]``: that size, for a caller that runs compute again, as the Ray engine's actors)."""
    group: list[tuple[dict, np.ndarray | str]] = []
    budget = batch_seconds * audio.sample_rate_of(extractor)

    def run(group):
        nonlocal budget
        good = sorted((i for i, (_, w) in enumerate(group) if not isinstance(w, str)), key=lambda i: group[i][1].size)
        results: dict[int, np.ndarray | str] = {i: w for i, (_, w) in enumerate(group) if isinstance(w, str)}
        batch: list[int] = []
        for i in good + [None]:
            if i is not None and (not batch or (len(batch) + 1) * group[i][1].size <= budget):
                batch.append(i)
                continue
            if batch:
                done, fitted = _run_batch(extractor, [group[j][1] for j in batch], batch, counts, kmeans)
                results.update(done)
                if fitted is not None and fitted < budget:
                    budget = fitted
                    if counts is not None:
                        counts["fitted_seconds"] = budget / audio.sample_rate_of(extractor)
                    log.info(f"out of memory: batches of at most {budget / audio.sample_rate_of(extractor):.0f} s "
                             "of (padded) audio from here on")
            batch = [i] if i is not None else []
        if counts is not None and hasattr(extractor, "flops"):  # the model's useful FLOPs: the summary's MFU
            counts["model_flops"] += sum(extractor.flops(group[i][1].size) for i in good if not isinstance(results[i], str))
        return [(row, results[i]) for i, (row, _) in enumerate(group)]

    size = 0
    for row, wav in decoded:
        group.append((row, wav))
        size += 0 if isinstance(wav, str) else wav.size
        if size >= 4 * budget:
            yield from run(group)
            group, size = [], 0
    if group:
        yield from run(group)


def _run_batch(extractor: Extractor, wavs: list[np.ndarray], index: list[int],
               counts: collections.Counter | None = None, kmeans=None) -> tuple[dict[int, np.ndarray | str], int | None]:
    """Features of one batch; halved while it runs out of memory; an utterance that fails (or does not fit even
    alone) is isolated and gets its reason, the others their features. Second: when the batch was halved, the
    padded size (samples x utterances) of the largest part that ran, else None."""
    rate = audio.sample_rate_of(extractor)
    halved: collections.Counter[str] = collections.Counter()
    ran: list[int] = []

    run = extractor.features_batch if kmeans is None else (lambda items: extractor.labels_batch(items, kmeans))

    def batch(items):
        return halving(run, items, halved, lambda w: f"an utterance of {w.size / rate:.1f} s",
                       ran, size=lambda part: len(part) * max(w.size for w in part))

    out: dict[int, np.ndarray | str] = {}
    try:
        out = dict(zip(index, batch(wavs)))
    except (audio.AudioError, ValueError, RuntimeError, OutOfMemory):
        for i, wav in zip(index, wavs):  # isolate the utterance that failed
            try:
                out[i] = batch([wav])[0]
            except (audio.AudioError, ValueError, RuntimeError, OutOfMemory) as e:
                out[i] = f"feature extraction failed: {e}"
    for i, value in out.items():  # a model that overflowed (fp16/bf16): no features, no units from it
        if not isinstance(value, str) and not (np.isfinite(value).all() if value.dtype.kind == "f" else (value >= 0).all()):
            out[i] = "the model's frames hold NaN or infinite values (it overflowed in low precision?)"
    if counts is not None:
        counts.update(halved)
    return out, (max(ran) if halved and ran else None)


def assigns_on_device(extractor, kmeans) -> bool:
    """Whether the fused units path assigns ``kmeans``'s labels where ``extractor`` makes its frames: a k-means
    moved off the CPU (``KMeans.to``) and a model that can (an SSL encoder's ``labels_batch``)."""
    return kmeans is not None and kmeans.device != "cpu" and hasattr(extractor, "labels_batch")


# ---------------------------------------------------------------------------------------------- the job
def extract(
    manifest: str | Path,
    out: str | Path,
    extractor: Extractor,
    cfg: settings.Features | None = None,
    root: str | Path | None = None,
    kmeans=None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> dict:
    """Extract features (or units: with ``kmeans``, or when ``extractor`` is a speech tokenizer, tokenizer.py) for
    every manifest shard this worker owns. ``cfg``: the recipe's ``features`` section (its ``batch_seconds``,
    ``float16`` and ``workers``; the extractor was built from the rest), its defaults when None."""
    cfg = cfg or settings.Features()
    extractor, kmeans = dense_and_kmeans(extractor, kmeans)  # a k-means tokenizer's frames are computed in batches
    batch_seconds, float16, device = cfg.batch_seconds, cfg.float16, getattr(extractor, "device", "cpu")
    workers = cfg.workers or decode_workers(device)
    peak = devices.peak_tflops(device)  # before any work: a bad SPEECHINSTRUCT_PEAK_TFLOPS is one line now
    counts: collections.Counter[str] = collections.Counter()

    on_device = kmeans if assigns_on_device(extractor, kmeans) else None

    def results_for(shard: Path, rows: list[dict], root: Path):
        decoded = decode_rows(rows, root, workers, audio.sample_rate_of(extractor))
        return compute(extractor, decoded, batch_seconds, counts, on_device)

    stats = run_shards(manifest, out, extractor, results_for, root=root, kmeans=kmeans, float16=float16,
                       num_shards=num_shards, shard_index=shard_index)
    if counts["batches_halved"]:  # batches that ran out of memory and were run in halves
        stats["batches_halved"] = counts["batches_halved"]
    stats.update(devices.utilisation(counts["model_flops"], stats["seconds"], [peak]))
    return stats


def run_shards(manifest, out, extractor, results_for: Callable, root=None, kmeans=None, float16: bool = False,
               num_shards: int = 1, shard_index: int = 0, repeats: dict[str, dict[str, str]] | None = None,
               pending: list[Path] | None = None) -> dict:
    """The driver loop both engines share: for each manifest shard this worker owns and has not finished (or of
    ``pending``, when the engine has chosen them: the Ray engine's blocks are cut from those), ``results_for(shard,
    rows, root)`` yields (row, features | labels | error) in manifest order, and ``write_shard`` writes them.
    ``extractor`` gives the spec and dimensions. A row whose id an earlier shard holds (``repeats``:
    :func:`repeated_elsewhere` of every manifest shard, read here when None) is a skip, never given to
    ``results_for``."""
    manifest, out = Path(manifest), Path(out)
    if kmeans is not None and getattr(extractor, "dim", None) and kmeans.dim != extractor.dim:  # before any audio
        raise ValueError(f"{kmeans.source}: k-means is {kmeans.dim}-dim but {extractor.spec['features']} makes "
                         f"{extractor.dim}-dim features (features and k-means come from different extractors or layers)")
    every = manifest_files(manifest)
    shards = select_shards(every, num_shards, shard_index)
    root = check_root(Path(root) if root else corpus_root(manifest), manifest)
    out.mkdir(parents=True, exist_ok=True)
    fused = makes_units(extractor, kmeans)
    vocabulary = extractor.vocabulary() if is_tokenizer(extractor) else None  # k-means: from the k-means
    check_spec(out, output_spec(extractor.spec, float16, manifest, root, kmeans, vocabulary),
               "units.json" if fused else "features.json")
    stats = {"shards_done": 0, "shards_skipped": 0, "utterances": 0, "errors": 0, "audio_hours": 0.0}
    reasons: collections.Counter[str] = collections.Counter()  # the errors of the shards done now, by reason
    started = time.perf_counter()
    for shard in shards:
        target = shard_output(out, shard, fused=fused)
        if (finished(target, shard) if pending is None else shard not in pending):
            stats["shards_skipped"] += 1
            continue
        remove_stale_temps(out, f".*-{shard_suffix(shard)}.*.tmp-*")  # a killed run's half-written files of this shard
        rows = read_table(shard).to_pylist()
        if repeats is None:  # once, and only when a shard is to be done
            repeats = repeated_elsewhere(every)
        earlier = repeats.get(shard.name, {})
        results = results_for(shard, [r for r in rows if r["id"] not in earlier], root)
        if earlier:
            results = _with_repeats(rows, results, earlier)
        shard_stats = write_shard(results, target, len(rows), extractor.dim, extractor.frame_rate, float16, kmeans,
                                  units=fused, source=shard)
        stats["shards_done"] += 1
        for key in ("utterances", "errors", "audio_hours"):
            stats[key] += shard_stats[key]
        reasons.update(shard_stats["skip_reasons"])
    stats["seconds"] = round(time.perf_counter() - started, 3)
    stats["audio_hours"] = round(stats["audio_hours"], 4)
    if reasons:
        stats["skip_reasons"] = dict(reasons.most_common())
    check_finished(out, [shard_suffix(s) for s in shards], stats)
    return stats


def _with_repeats(rows: list[dict], results: Iterator, earlier: dict[str, str]) -> Iterator:
    """``results`` (of the rows whose ids are not in ``earlier``) with a skip for each row that is, in manifest order."""
    for row in rows:
        if row["id"] in earlier:
            yield row, repeat_reason(earlier[row["id"]])
        else:
            yield next(results)


def write_shard(results: Iterable, target: Path, total: int, dim: int, frame_rate: float, float16: bool,
                kmeans=None, units: bool | None = None, source: Path | None = None) -> dict:
    """Write one shard from ``(manifest row, value)`` pairs in manifest order, where value is a (frames,
    dim) feature array, a 1-D array of unit labels (already assigned), or an error string. ``units``: write
    units (default: when there is a k-means); without k-means (a codec's units) repeats are kept. Errors go to
    ``errors-NNNNN.jsonl`` first; the shard's output file is renamed into place last, recording the manifest shard
    ``source`` it was made from (:func:`shardfiles.made_from`)."""
    units = kmeans is not None if units is None else units
    made = made_from(source) if source is not None else None

    errors: list[dict] = []
    counts = {"utterances": 0, "errors": 0, "audio_hours": 0.0, "skip_reasons": collections.Counter()}
    bar = progress(results, total=total, desc=f"{'units' if units else 'features'} {target.name}",
                   unit="utt")

    seen: set[str] = set()  # a hand-merged manifest may list an id twice: its repeat is a skip, not a second row
    reasons: collections.Counter[str] = counts["skip_reasons"]

    def good(pairs):
        for row, value in pairs:
            if not isinstance(value, str) and row["id"] in seen:
                value = repeat_reason()
            if isinstance(value, str):
                errors.append(error_record(row, value))
                reasons[reason_key(errors[-1])] += 1
                continue
            seen.add(row["id"])
            counts["utterances"] += 1
            counts["audio_hours"] += row["duration"] / 3600
            yield row, value

    def write_errors():  # before the shard's output appears, so a complete shard always has its errors
        write_text(target.parent / f"errors-{shard_suffix(target)}.jsonl", "".join(json.dumps(e) + "\n" for e in errors))

    if units:
        with UnitWriter(SpeechEncoder(kmeans, deduplicate=kmeans is not None), target, made) as writer:
            for row, value in good(bar):
                writer.add(row, value)
            write_errors()
    else:
        schema = feature_schema(dim, float16).with_metadata(made)
        with atomic_path(target) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as ipc:
            ids, feats = [], []

            def flush():
                if ids:
                    ipc.write_batch(pa.record_batch([pa.array(ids, pa.string()), features_array(feats, dim, float16)], schema=schema))
                    ids.clear(), feats.clear()

            for row, value in good(bar):
                ids.append(row["id"])
                feats.append(value)
                if len(ids) >= 256:
                    flush()
            flush()
            write_errors()
    counts["errors"] = len(errors)
    return counts
