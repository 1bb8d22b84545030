"""LibriLight: ``{subset}/{speaker}/{book}/{file}.flac`` with ``{file}.json`` beside it holding the
voice-activity spans (``voice_activity``: [[start, end], ...] seconds). No transcripts. LibriLight has no
dev or test part (``small``/``medium``/``large`` are sizes; its evaluation sets come from LibriSpeech): every
row is ``train``, with the size folder as ``corpus_split``.

Long files are cut into utterances of at most ``max_seconds`` by grouping consecutive voice-activity
spans; a cut falls inside a span only when that span alone is longer than ``max_seconds``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

from ...io import files_under
from ...progress import progress
from .base import Item, Skip, probe, relpath


def segment(spans: list[tuple[float, float]], max_seconds: float) -> list[tuple[float, float]]:
    """Group sorted voice-activity spans into (start, end) windows of at most ``max_seconds``."""
    windows: list[tuple[float, float]] = []
    current: tuple[float, float] | None = None
    for start, end in spans:
        if end <= start:
            continue
        if end - start > max_seconds:  # one span too long: close the window, cut the span evenly
            if current:
                windows.append(current)
                current = None
            pieces = math.ceil((end - start) / max_seconds)
            step = (end - start) / pieces
            windows.extend((start + i * step, start + (i + 1) * step) for i in range(pieces))
            continue
        if current and end - current[0] <= max_seconds:
            current = (current[0], end)
        else:
            if current:
                windows.append(current)
            current = (start, end)
    if current:
        windows.append(current)
    return windows


def read(
    root: str | Path, max_seconds: float = 30.0, license: str | None = None
) -> Iterator[Item]:
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    root = Path(root)
    flacs = sorted(path for name, path in files_under(root) if name.endswith(".flac"))
    if not flacs:
        raise FileNotFoundError(f"{root}: no .flac files: not a LibriLight folder")
    for flac in progress(flacs, desc="librilight files", unit="file"):
        rel = relpath(flac, root)
        meta_path = flac.with_suffix(".json")
        if not meta_path.is_file():
            yield Skip(rel, "missing voice-activity json", str(meta_path.name))
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            spans = sorted((float(a), float(b)) for a, b in meta["voice_activity"])
        except (ValueError, KeyError, TypeError) as e:
            yield Skip(relpath(meta_path, root), "malformed voice-activity json", f"{type(e).__name__}: {e}")
            continue
        except RecursionError:
            yield Skip(relpath(meta_path, root), "malformed voice-activity json", "nested too deeply")
            continue
        probed = probe(flac, root)
        if isinstance(probed, Skip):
            yield probed
            continue
        sr, seconds = probed
        spans = [(max(0.0, a), min(b, seconds)) for a, b in spans]
        parts = Path(rel).parts
        speaker = str(meta.get("speaker") or (parts[-3] if len(parts) >= 3 else "unknown"))
        stem = str(Path(rel).with_suffix(""))
        # a window shorter than the manifest's 0.1 ms precision would be a row of 0.0 s
        windows = [(start, end) for start, end in segment(spans, max_seconds) if round(end - start, 4) > 0]
        if not windows:  # said, not lost: no span of its json lies inside the audio with any length
            yield Skip(rel, "no voice activity", f"{meta_path.name} lists no span inside the audio ({seconds:.2f} s)")
            continue
        for i, (start, end) in enumerate(windows):
            yield {
                "id": f"librilight/{stem}/{i:05d}",
                "path": rel,
                "offset": round(start, 4),
                "duration": round(end - start, 4),
                "sample_rate": sr,
                "text": None,
                "speaker": speaker,
                "corpus": "librilight",
                "license": license,
                "split": "train",
                "corpus_split": parts[0] if len(parts) > 1 else root.resolve().name,
            }
