"""``speechinstruct compose interleaved``: text and speech interleaved at word boundaries, SpiritLM's way.

Each utterance with a word alignment (the units row's ``words``: ``alignments.py``) becomes one sequence that
switches between its words as text and the same words as units::

    [TEXT]the old sailor[SPEECH]<12><7><93>…[TEXT]to the red house[SPEECH]<5>…

with SpiritLM's markers ``[TEXT]`` and ``[SPEECH]`` (its units are ``[Hu12]``; ours stay ``<12>``, the unit
tokens every other record uses). The spans are drawn from the seed and the utterance id: the first modality,
then runs of ``min_words``–``max_words`` words, so there is always at least one switch. A speech span holds the
frames from its first word's start to its last word's end at the tokenizer's frame rate (frame ``f`` is
``round(seconds × frame rate)``; an alignment may end up to 50 ms after the last frame), repeats merged again for k-means units (codec frames kept whole, every
codebook). Text spans use the transcript's words when the alignment holds as many words as it, else the
alignment's own. Records keep the split of their audio, in ``{split}-*.parquet`` files as ``pretrain``'s.
"""

from __future__ import annotations

import collections
import random
from pathlib import Path

import numpy as np

from .. import recipe as settings
from ..io import write_json
from ..recipe import default
from ..shardfiles import folder_vocabulary, unit_files
from ..sources.corpora.base import SPLITS, split_name
from ..units.kmeans import dedup
from .common import QualityGate, RecordRefused, _draw, finish, gated_units, split_counts

TEXT, SPEECH = "[TEXT]", "[SPEECH]"
SLACK_SECONDS = 0.05  # how far an alignment may end after the last frame


def interleaved_text(modalities: list[str], texts: list[str], units: list[list[int]]) -> str:
    """The sequence of segments: ``[TEXT]words`` or ``[SPEECH]<u><u>…``."""
    return "".join(f"{TEXT}{text}" if modality == "text" else SPEECH + "".join(f"<{u}>" for u in segment)
                   for modality, text, segment in zip(modalities, texts, units))


def spans(n_words: int, rng: random.Random, min_words: int, max_words: int) -> list[tuple[str, int, int]]:
    """(modality, first word, end word) runs over ``n_words`` words, alternating, at least two."""
    modality = rng.choice(("text", "speech"))
    out, i = [], 0
    while i < n_words:
        j = min(n_words, i + rng.randint(min_words, max_words))
        if i == 0:
            j = min(j, n_words - 1)  # leave at least one word for a second span
        out.append((modality, i, j))
        modality = "speech" if modality == "text" else "text"
        i = j
    return out


def _labels(words: list[dict], transcript: list[str]) -> list[str]:
    """Each aligned entry's text: the transcript's own words when the entries hold as many words as it (an entry
    may hold several: espeak-ng's "for the"), else the alignment's."""
    sizes = [len(w["word"].split()) for w in words]
    if sum(sizes) != len(transcript):
        return [w["word"] for w in words]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [" ".join(transcript[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def _record(u: dict, frame_rate: float, codebooks: int, merge: bool, seed: int, min_words: int,
            max_words: int) -> dict | str:
    """The interleaved record of one units row, or why it has none."""
    words = u.get("words")
    if not words:
        return "no word alignment"
    if len(words) < 2:
        return "fewer than two words"
    frames = np.repeat(np.asarray(u["units"]), np.asarray(u["durations"])) if merge else np.asarray(u["units"])
    frames = frames.reshape(-1, codebooks)
    # the last frames of an utterance end up to one analysis window before its audio does (MFCC: 25 ms)
    if round(words[-1]["end"] * frame_rate) > len(frames) + max(2, round(SLACK_SECONDS * frame_rate)):
        return "alignment ends after the units"
    labels = _labels(words, (u.get("text") or "").split())
    modalities, texts, units = [], [], []
    for modality, i, j in spans(len(words), random.Random(_draw(seed, "interleave", u["id"])), min_words, max_words):
        start, end = round(words[i]["start"] * frame_rate), round(words[j - 1]["end"] * frame_rate)
        segment = frames[start:end].ravel()
        if modality == "speech":
            if not segment.size:
                return "a speech span shorter than one frame"
            segment = dedup(segment)[0] if merge else segment
        modalities.append(modality)
        texts.append(" ".join(labels[i:j]))
        units.append(segment.tolist() if modality == "speech" else [])
    try:
        return finish({"id": f"interleaved/{u['id']}", "text": interleaved_text(modalities, texts, units),
                       "modalities": modalities, "segment_texts": texts, "segment_units": units, "words": len(words),
                       "source_id": u["id"], "corpus": u["corpus"], "license": u["license"]})
    except RecordRefused as e:  # a transcript or alignment label that holds [SPEECH], <7>, a NUL …
        return f"{e.key.removeprefix('dropped: ').replace('segment_texts', 'the words')} ({e})"


def interleaved(units_dir: str | Path, out: str | Path, cfg: settings.Interleaved | None = None,
                seed: int = default(settings.Compose, "seed"), part: str | None = None, num_shards: int = 1,
                shard_index: int = 0, scores: str | Path | None = None, gates=None) -> dict:
    """Interleaved records from a units folder whose rows have word alignments (see the module docstring;
    ``cfg``: the recipe's ``compose.interleaved``, its defaults when None). ``scores``, ``gates``: as for
    ``compose.pretrain`` (an utterance that fails the gates makes no record)."""
    cfg = cfg or settings.Interleaved()
    min_words, max_words = cfg.min_words, cfg.max_words
    if not 1 <= min_words <= max_words:
        raise ValueError(f"min_words {min_words} and max_words {max_words}: need 1 <= min_words <= max_words")
    units_dir, out = Path(units_dir), Path(out)
    vocabulary = folder_vocabulary(units_dir)
    if vocabulary is None or not vocabulary.frame_rate:
        unit_files(units_dir)  # no units there at all: that is the line, rather than what their units.json lacks
        raise ValueError(f"{units_dir}: its units.json records no frame rate: extract or quantize it again")
    merge = vocabulary.tokenizer == "kmeans"  # k-means units had their repeats merged; codec units did not
    codebooks = vocabulary.codebooks or 1
    counts: collections.Counter[str] = collections.Counter()
    dropped: list[dict] = []
    for sinks, u, judged in gated_units(units_dir, out, part, "interleaved", QualityGate(scores, gates), counts, dropped,
                                        num_shards, shard_index, {"min_words": min_words, "max_words": max_words, "seed": seed}):
        made = _record(u, vocabulary.frame_rate, codebooks, merge, seed, min_words, max_words)
        if isinstance(made, str):
            counts[f"skipped: {made.split(' (')[0]}"] += 1
            if len(dropped) < 200:
                dropped.append({"where": u["id"], "reason": made})
            continue
        sinks[split_name(u["split"])].add(finish({**made, **judged}) if judged else made)
    counts.update(split_counts(out, part))
    summary = {**{s: counts[s] for s in SPLITS},
               **{k: v for k, v in sorted(counts.items()) if k.startswith(("skipped", "dropped"))},
               "units": str(units_dir.resolve()), "dropped_examples": dropped}
    write_json(out / f"summary{'-' + part if part else ''}.json", summary)
    return summary


def record_errors(r: dict, k: int | None) -> list[tuple[str, str]]:
    """An interleaved record's segments alternate, speech segments (only) hold units, and its text is theirs."""
    modalities, texts, segments = r["modalities"], r["segment_texts"], r["segment_units"]
    if not len(modalities) == len(texts) == len(segments):
        return [("segments", f"{len(modalities)} modalities, {len(texts)} texts, {len(segments)} unit lists")]
    errors = []
    if any(a == b for a, b in zip(modalities, modalities[1:])):
        errors.append(("segments", "two segments of one modality follow each other"))
    if any(bool(units) != (modality == "speech") for modality, units in zip(modalities, segments)):
        errors.append(("segments", "a speech segment without units or a text segment with units"))
    bad = [u for units in segments for u in units if k is not None and not 0 <= u < k]
    if bad:
        errors.append(("unit-range", f"segment_units has ids outside [0, {k}): {bad[:5]}"))
    if not errors and r["text"] != interleaved_text(modalities, texts, segments):
        errors.append(("shape", "text is not the sequence its segments make"))
    return errors
