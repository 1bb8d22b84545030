"""Raw recordings (corpus name ``audio``): any folder of audio files of any length that libsndfile reads, such as
podcasts, audiobooks or broadcasts, untranscribed. Speech is found by silero-vad (:mod:`speechinstruct.vad`), each
file streamed in blocks; speech spans closer than 2 s are joined into utterances of at most ``max_seconds`` (a
longer group is cut at its longest pause), as LibriLight's cuts are. Every row is ``train``, with no transcript:
such rows feed stage-1 ``pretrain`` records. A license is required: we will not guess one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .base import Item, Skip, probe, relpath

# the container suffixes libsndfile reads (soundfile.available_formats(), as file names spell them)
SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".snd", ".w64", ".caf", ".rf64")


def read(root: str | Path, max_seconds: float = 30.0, license: str | None = None, quiet: bool = False) -> Iterator[Item]:
    from ..audio import AudioError
    from ..vad import SileroVAD, utterances

    if not license:
        raise ValueError(f"{root}: shard audio needs --license: the license of these recordings (we will not guess one)")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no audio files ({', '.join(SUFFIXES)})")
    vad = SileroVAD()
    for path in tqdm(files, desc="audio files (VAD)", unit="file", disable=quiet):
        rel = relpath(path, root)
        probed = probe(path, root)
        if isinstance(probed, Skip):
            yield probed
            continue
        sr, _ = probed
        try:
            spans, seconds = vad.spans(path)
        except AudioError as e:
            yield Skip(rel, "unreadable audio", str(e))
            continue
        cuts = utterances(spans, max_seconds)
        if not cuts:
            yield Skip(rel, "no speech found", f"{seconds:.1f} s, silero-vad found no speech")
            continue
        stem = str(Path(rel).with_suffix(""))
        for i, (start, end) in enumerate(cuts):
            yield {
                "id": f"audio/{stem}/{i:05d}",
                "path": rel,
                "offset": round(start, 4),
                "duration": round(min(end, seconds) - start, 4),
                "sample_rate": sr,
                "text": None,
                "speaker": "unknown",
                "corpus": "audio",
                "license": license,
                "split": "train",
                "corpus_split": "train",
            }
