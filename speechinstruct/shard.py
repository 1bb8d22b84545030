"""``speechinstruct shard``: a corpus in its native layout → Parquet manifest shards + a JSON summary.

Rows are cut into shards of about ``shard_hours`` of audio each (``manifest-00000.parquet`` …), every
shard written atomically; a rerun rewrites the same names and removes shards a previous, larger run left.
Every row carries the ``split`` (train, dev, test) the corpus gives it; ``splits`` keeps only some.
"""

from __future__ import annotations

import collections
from pathlib import Path

from . import records
from .corpora import Skip, audio_roots, languages, parse_splits, readers, root_problem
from .io import write_json, write_parquet

MAX_LISTED_SKIPS = 1000


def shard_corpus(
    corpus: str,
    root: str | Path,
    out: str | Path,
    shard_hours: float = 10.0,
    splits: str | list[str] | None = None,
    quiet: bool = False,
    **reader_options,
) -> dict:
    """Read ``root`` with the ``corpus`` reader, write manifest shards to ``out``; return the summary.
    ``splits`` (e.g. ``"train,dev"``) keeps only rows of those splits; the others are counted as left out."""
    all_readers = readers()
    if corpus not in all_readers:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {', '.join(all_readers)}")
    if shard_hours <= 0:
        raise ValueError(f"shard_hours must be positive, got {shard_hours}")
    keep = parse_splits(splits)
    root, out = Path(root), Path(out)
    problem = root_problem(corpus, root)
    if problem:
        raise FileNotFoundError(f"{root}: corpus root {problem}")
    audio_root = root
    if corpus in audio_roots():  # manifests that name audio files anywhere: paths relative to their folder
        audio_root = audio_roots()[corpus](root, **reader_options)
        reader_options["audio_root"] = str(audio_root)
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    written: list[str] = []
    seen_ids: set[str] = set()
    skipped: collections.Counter[str] = collections.Counter()
    skip_list: list[dict] = []
    by_split: dict[str, dict] = {}
    left_out: collections.Counter[str] = collections.Counter()
    seconds_total = 0.0
    shard_seconds = 0.0
    n_rows = 0

    def flush():
        nonlocal rows, shard_seconds
        if rows:
            name = f"manifest-{len(written):05d}.parquet"
            write_parquet(out / name, records.to_table("manifest", rows))
            written.append(name)
            rows, shard_seconds = [], 0.0

    for item in all_readers[corpus](root, quiet=quiet, **reader_options):
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            if len(skip_list) < MAX_LISTED_SKIPS:
                skip_list.append(item.as_dict())
            continue
        if item["id"] in seen_ids:
            skipped["duplicate id"] += 1
            if len(skip_list) < MAX_LISTED_SKIPS:
                skip_list.append(Skip(item["path"], "duplicate id", item["id"]).as_dict())
            continue
        seen_ids.add(item["id"])
        if keep is not None and item["split"] not in keep:
            left_out[item["split"]] += 1
            continue
        part = by_split.setdefault(item["split"], {"utterances": 0, "hours": 0.0, "corpus_splits": collections.Counter()})
        part["utterances"] += 1
        part["hours"] += item["duration"] / 3600
        part["corpus_splits"][item["corpus_split"]] += 1
        rows.append(item)
        n_rows += 1
        seconds_total += item["duration"]
        shard_seconds += item["duration"]
        if shard_seconds >= shard_hours * 3600:
            flush()
    flush()

    for stale in sorted(out.glob("manifest-*.parquet")):
        if stale.name not in written:
            stale.unlink()
    summary = {
        "corpus": corpus,
        "root": str(audio_root.resolve()),
        **({"source": str(root.resolve())} if audio_root != root else {}),
        "options": {"shard_hours": shard_hours, "splits": list(keep) if keep else None, **reader_options},
        "shards": written,
        "utterances": n_rows,
        "hours": round(seconds_total / 3600, 4),
        "splits": {name: {"utterances": v["utterances"], "hours": round(v["hours"], 4),
                          "corpus_splits": dict(sorted(v["corpus_splits"].items()))}
                   for name, v in sorted(by_split.items())},
        **({"languages": languages()[corpus](root)} if corpus in languages() else {}),
        "left_out_by_split": dict(sorted(left_out.items())),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": skip_list,
    }
    write_json(out / "summary.json", summary)
    return summary


