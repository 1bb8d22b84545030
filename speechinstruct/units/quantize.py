"""``speechinstruct quantize``: feature files + k-means → units per utterance, joined to the manifest.

Each output row is the manifest row plus ``units`` (repeats merged), ``durations`` (frames per merged
unit), ``n_frames`` and ``unit_text`` (``<sosp><12><7>…<eosp>``). One ``units-NNNNN.parquet`` per feature
shard, written atomically; ``stats.json`` holds the unit-usage histogram and units per second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import records
from ..io import parquet_rows, read_table, write_json
from ..progress import progress
from ..shardfiles import (check_spec, feature_dim, feature_files, finished, iter_features, made_from, manifest_shard_of,
                          read_spec, select_shards, shard_output, unit_files, units_spec)
from ..speechgpt import to_text
from .kmeans import KMeans, SpeechEncoder


class UnitWriter:
    """Writes one shard's unit rows to a Parquet file as they come, a row group (``io.ROWS_AT_A_TIME`` rows)
    at a time, on a temporary name renamed into place when the ``with`` block ends (deleted if it fails)::

        with UnitWriter(encoder, path) as writer:
            writer.add(manifest_row, features)
    """

    def __init__(self, encoder: SpeechEncoder, path: Path, metadata: dict[bytes, bytes] | None = None):
        self.encoder, self.path, self.metadata = encoder, Path(path), metadata

    def __enter__(self) -> "UnitWriter":
        self._context = parquet_rows(self.path, records.arrow_schema("units"), lambda rows: records.to_table("units", rows),
                                     metadata=self.metadata)
        self._sink = self._context.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._context.__exit__(*exc)

    def add(self, manifest_row: dict, value: np.ndarray) -> None:
        """``value``: one utterance's (frames, dim) features, or its unit labels (1-D) already assigned."""
        encoded = self.encoder.merge(value) if value.ndim == 1 else self.encoder.quantize(value)
        self._sink.add({**manifest_row, "units": encoded.units.tolist(), "durations": encoded.durations.tolist(),
                        "n_frames": encoded.n_frames, "unit_text": to_text(encoded.units)})


def quantize(features: str | Path, kmeans: KMeans, out: str | Path, num_shards: int = 1, shard_index: int = 0) -> dict:
    features, out = Path(features), Path(out)
    spec = read_spec(features / "features.json", "; extract again")
    if spec.get("dim") != kmeans.dim:
        raise ValueError(f"{kmeans.source}: k-means is {kmeans.dim}-dim but {features} holds {spec.get('dim')}-dim features")
    manifest = Path(spec["manifest"])
    if not manifest.exists():  # its rows are joined to the units: said before any output
        raise FileNotFoundError(f"{features / 'features.json'}: the manifest these features came from, {manifest}, is "
                                "not there (moved or deleted?); quantize joins its rows to the units")
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, units_spec(spec, kmeans), "units.json")
    done = skipped = 0
    for path in select_shards(feature_files(features), num_shards, shard_index):
        target = shard_output(out, path, fused=True)
        manifest_shard = manifest_shard_of(manifest, path)
        if finished(target, path, manifest_shard):
            skipped += 1
            continue
        if feature_dim(path) != kmeans.dim:  # a file of another extractor: named, before its shard is begun
            raise ValueError(f"{path}: {feature_dim(path)}-dim frames, but the k-means {kmeans.source} is {kmeans.dim}-dim "
                             "(features and k-means come from different extractors or layers)")
        rows = {r["id"]: r for r in read_table(manifest_shard).to_pylist()}
        # memory: the shard's manifest rows, one utterance's features and one row group of unit rows
        seen: set[str] = set()
        with UnitWriter(SpeechEncoder(kmeans), target, made_from(path, manifest_shard)) as writer:
            for uid, f in progress(iter_features(path), total=len(rows), desc=f"quantize {path.name}", unit="utt"):
                _check_utterance(path, uid, f, rows, seen, manifest_shard)
                seen.add(uid)
                writer.add(rows[uid], f)
        done += 1
    return {"shards_done": done, "shards_skipped": skipped, **unit_stats(out, kmeans.k)}


def _check_utterance(path: Path, uid, frames: np.ndarray, rows: dict, seen: set, manifest_shard: Path) -> None:
    """One line naming the feature file and the utterance when it cannot become a units row (a file another tool
    wrote, or spliced by hand), before anything of its shard is written."""
    if not isinstance(uid, str):
        raise ValueError(f"{path}: an utterance without an id; extract it again")
    problem = ("is not in its manifest shard " + str(manifest_shard) if uid not in rows else
               "appears twice" if uid in seen else
               "has no frames" if not len(frames) else
               "frames hold NaN or infinite values" if not np.isfinite(frames).all() else None)  # FAISS: -1, no unit
    if problem:
        raise ValueError(f"{path}: {uid}: {problem}; extract it again")


def unit_stats(folder: str | Path, k: int) -> dict:
    """Unit usage histogram and units per second before/after merging, over all unit files; saved as
    ``stats.json`` beside them."""
    histogram = np.zeros(k, dtype=np.int64)
    frames = merged = 0
    seconds = 0.0
    utterances = 0
    for path in unit_files(folder):
        table = read_table(path, columns=["units", "n_frames", "duration"])
        flat = table.column("units").combine_chunks().flatten().to_numpy()
        histogram += np.bincount(flat, minlength=k)[:k]
        merged += flat.size
        frames += int(np.sum(table.column("n_frames").to_numpy()))
        seconds += float(np.sum(table.column("duration").to_numpy()))
        utterances += table.num_rows
    stats = {
        "utterances": utterances,
        "k": k,
        "units_used": int((histogram > 0).sum()),
        "frames_per_second": round(frames / seconds, 3) if seconds else 0.0,
        "units_per_second": round(merged / seconds, 3) if seconds else 0.0,
        "histogram": histogram.tolist(),
    }
    write_json(Path(folder) / "stats.json", stats)
    return {k_: v for k_, v in stats.items() if k_ != "histogram"}
