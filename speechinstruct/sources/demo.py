"""The embedded demo corpus: a few hundred sentences spoken by espeak-ng in several voices, written in
LibriSpeech's layout (``train/{speaker}/{chapter}/{speaker}-{chapter}-{utt}.flac`` + ``.trans.txt``),
so the whole pipeline runs with nothing from outside. Beside each recording, a TextGrid of its words timed by
espeak-ng's own word events (as the Montreal Forced Aligner would write it). Sentences are drawn from small word lists with a
seed; each voice is one speaker. It is its own corpus kind, ``speechinstruct-demo`` (``corpora/demo.py``),
never LibriSpeech."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from .. import audio
from ..io import atomic_path, write_text
from ..progress import progress
from .alignments import write_textgrid
from .tts import ESPEAK_RATES, ESPEAK_VOICES, EspeakTTS

SUBJECTS = ["the old sailor", "a young girl", "my neighbour", "the tired doctor", "our teacher", "the little dog",
            "a quiet farmer", "the king", "her brother", "the clever fox", "a travelling painter", "the baker"]
VERBS = ["walked to", "looked at", "remembered", "painted", "carried", "found", "cleaned", "visited", "watched",
         "opened", "described", "followed"]
OBJECTS = ["the red house", "a wooden boat", "the long river", "an empty garden", "the bright morning sky",
           "a basket of apples", "the narrow bridge", "the village market", "a heavy letter", "the silver moon",
           "the winter forest", "a small blue book"]
TAILS = ["before the rain began", "in the middle of the night", "with great care", "after a long journey",
         "without saying a word", "while the bells were ringing", "on a cold afternoon", "for the very first time",
         "as the sun went down", "near the end of summer", "", ""]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s = " ".join(filter(None, [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(TAILS)]))
        if s not in seen:
            seen.add(s)
            out.append(s.upper())
    return out


def make_demo_corpus(out: str | Path, n_sentences: int = 300, seed: int = 0) -> dict:
    """Write the demo corpus to ``out`` (skipped when its transcripts are already complete)."""
    out = Path(out)
    tts = EspeakTTS()
    texts = sentences(n_sentences, seed)
    speakers = [(1000 + i, voice) for i, voice in enumerate(ESPEAK_VOICES)]
    by_chapter: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for i, text in enumerate(texts):
        speaker, voice = speakers[i % len(speakers)]
        chapter = 1 + (i // len(speakers)) // 20
        by_chapter.setdefault((speaker, chapter), []).append((voice, text))
    seconds = 0.0
    bar = progress(total=len(texts), desc="demo corpus (espeak-ng)", unit="utt")
    for (speaker, chapter), items in sorted(by_chapter.items()):
        folder = out / "train" / str(speaker) / str(chapter)
        trans = folder / f"{speaker}-{chapter}.trans.txt"
        lines = []
        for j, (voice, text) in enumerate(items):
            utt = f"{speaker}-{chapter}-{j:04d}"
            flac = folder / f"{utt}.flac"
            rate = ESPEAK_RATES[(j + chapter) % len(ESPEAK_RATES)]
            if not trans.is_file():
                wav, sr, words = tts.synthesize_words(text.lower(), voice, rate)
                wav = audio.resample(wav, sr)
                folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(flac) as tmp:
                    sf.write(tmp, np.clip(wav, -1, 1), audio.TARGET_SR, format="FLAC")
                # when espeak-ng spoke each word, as the Montreal Forced Aligner would write it beside the audio
                write_textgrid(flac.with_suffix(".TextGrid"), words, wav.size / audio.TARGET_SR)
            seconds += sf.info(str(flac)).duration
            lines.append(f"{utt} {text}")
            bar.update(1)
        if not trans.is_file():  # written last: a chapter with transcripts is complete
            write_text(trans, "\n".join(lines) + "\n")
    bar.close()
    return {"root": str(out), "utterances": len(texts), "speakers": len(speakers), "hours": round(seconds / 3600, 4)}
