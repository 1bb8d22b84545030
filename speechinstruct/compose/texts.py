"""The text the spoken kinds start from: instruction–response pairs and conversations from JSONL, Parquet, a
saved or hub dataset or the built-in samples, each with where it came from; repeats and evaluation texts out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..io import parse_json_object


def read_pairs(source: str | Path, instruction_column: str = "instruction", response_column: str = "response",
               id_column: str | None = "id", split: str = "train") -> Iterator[dict | tuple[str, str]]:
    """Pairs ``{id, instruction, response}`` from the shipped sample (``builtin``), a JSONL file, a
    Parquet file, a saved HF dataset folder or an HF dataset name; malformed lines come as
    (where, reason)."""
    for where, fallback_id, obj in read_objects(source, "instructions_sample.jsonl", split):
        if isinstance(obj, str):
            yield (where, obj)
        else:
            yield from _pair(obj, where, instruction_column, response_column, id_column, fallback_id)


def read_objects(source: str | Path, builtin: str, split: str = "train") -> Iterator[tuple[str, str, dict | str]]:
    """(where, fallback id, object or the reason it is not one) for each line of a JSONL file or row of a
    Parquet file, saved HF dataset folder or HF dataset name; ``builtin`` names the shipped sample used for
    the source ``builtin``."""
    from importlib import resources

    if str(source) == "builtin":
        source = resources.files("speechinstruct.data").joinpath(builtin)
    path = Path(str(source))
    if path.suffix in (".jsonl", ".json") and path.is_file():
        name = path.name
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, "", f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                    continue
                if not line.strip():
                    continue
                obj = parse_json_object(line)
                if isinstance(obj, str):
                    yield where, "", obj
                    continue
                yield where, f"{path.stem}-{lineno}", obj
        return
    import datasets

    if path.is_dir() and (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.suffix == ".parquet" and path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.exists():
        ds = datasets.load_dataset(str(path), split=split)
    else:  # a hub id: needs internet
        ds = datasets.load_dataset(str(source), split=split)
    for i, obj in enumerate(ds):
        yield f"{path.name}[{i}]", f"{path.name}-{i}", obj


def _pair(obj: dict, where: str, icol: str, rcol: str, idcol: str | None, fallback_id: str):
    missing = [c for c in (icol, rcol) if c not in obj]
    if missing:
        yield (where, f"missing columns {missing}")
        return
    instruction, response = obj[icol], obj[rcol]
    if not isinstance(instruction, str) or not isinstance(response, str):
        yield (where, "instruction and response must be strings")
        return
    yield {"id": str(obj.get(idcol) or fallback_id) if idcol else fallback_id, "instruction": instruction,
           "response": response, "where": where}


def unique_pairs(source, instruction_column: str, response_column: str, id_column: str | None,
                 max_pairs: int | None) -> tuple[list[dict], list[dict]]:
    """The usable pairs of ``source`` (at most ``max_pairs``) and what was dropped (:func:`unique_items`)."""
    return unique_items(read_pairs(source, instruction_column, response_column, id_column), max_pairs)


def decontaminated(items: list[dict], dropped: list[dict], eval_texts, fields) -> tuple[list[dict], list[dict]]:
    """``items`` without those whose text (``fields``: keys of text, or of lists of (question, answer) exchanges)
    shares an n-gram with an evaluation text (``dedup.EvalTexts``; None: all kept), which go to ``dropped``."""
    if eval_texts is None:
        return items, dropped
    kept, dropped = [], list(dropped)
    for item in items:
        texts = [t for f in fields for t in ([item[f]] if isinstance(item[f], str) else [x for pair in item[f] for x in pair])]
        found = next((m for m in map(eval_texts.match, texts) if m), None)
        if found:
            dropped.append({"where": item["where"], "id": item["id"],
                            "reason": f"evaluation text ({found[1]}: {found[0][:60]!r})"})
        else:
            kept.append(item)
    return kept, dropped


def unique_items(items, limit: int | None) -> tuple[list[dict], list[dict]]:
    """The usable items (at most ``limit``) of a reader that yields items or (where, reason), and what was
    dropped, with where and why: what the reader refused, and a later item with an id seen before (ids name
    records)."""
    kept, dropped, first_seen = [], [], {}
    for item in items:
        if isinstance(item, dict) and item["id"] in first_seen:
            item = (item["where"], f"duplicate id ({item['id']!r}, first at {first_seen[item['id']]})")
        if isinstance(item, tuple):
            dropped.append({"where": item[0], "reason": item[1]})
            continue
        first_seen[item["id"]] = item["where"]
        kept.append(item)
        if limit and len(kept) >= limit:
            break
    return kept, dropped
