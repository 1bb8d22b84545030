"""All judges together on clips in memory (:class:`Judge`): DNSMOS, ASR, speaker similarity and language ID, as
the ``score`` stage runs them on a corpus and compose on the speech its TTS synthesises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..audio import AudioError
from ..memory import attempt, even_alone
from .asr import BadAnswer, a_clip, error_rates, load_asr
from .dnsmos import DNSMOS


def language_of(text: str | None) -> str | None:
    """The language of a text by langid (its model ships inside the package: no download), ISO 639-1, of the text
    in lower case; None for text with no letters."""
    import langid

    if not text or not any(c.isalpha() for c in text):
        return None
    return langid.classify(text.lower())[0]  # LibriSpeech's upper-case transcripts read as Amharic otherwise


class Judge:
    """DNSMOS, ASR, speaker embeddings and language ID on clips in memory: ``scores(wavs, texts, who)`` → per clip
    a dict of score columns (``embedding``: the speaker embedding, for the side file), or the reason it could not
    be scored. ``references``: speaker (or voice) → reference embedding, against which ``who[i]``'s clip is
    compared. compose uses it on the speech its TTS synthesises."""

    def __init__(self, dnsmos: DNSMOS | None = None, asr=None, speaker=None, references: dict | None = None,
                 languages: bool = False):
        if dnsmos is None and asr is None and speaker is None and not languages:
            raise ValueError("nothing to score with: give --dnsmos, --asr MODEL, --speaker or --language")
        self.dnsmos, self.asr, self.speaker, self.languages = dnsmos, asr, speaker, languages
        self.references = dict(references or {})

    @classmethod
    def load(cls, dnsmos: bool = False, asr: str | None = None, base_url: str | None = None, device: str = "cpu",
             batch_size: int | None = None, speaker: str | None = None, references: str | Path | None = None,
             language: bool = False, asr_dtype: str = "auto", threads: int | None = None) -> "Judge":
        """The judges a command's options or a recipe's ``quality`` name, loaded: the DNSMOS models, an ASR model (or
        a model at ``base_url``; ``asr_dtype``: its weights'), a speaker encoder (``references``: a folder of SPEAKER.wav
        to compare with). ``threads``: DNSMOS's on the CPU (default: every usable CPU)."""
        from .speakers import load_speaker_encoder

        judge_dnsmos = DNSMOS(threads=threads, device=device) if dnsmos else None
        judge_asr = (load_asr(asr, base_url=base_url, device=device, batch_size=batch_size, dtype=asr_dtype)
                     if asr else None)
        encoder = load_speaker_encoder(speaker, device) if speaker else None
        return cls(judge_dnsmos, judge_asr, encoder, reference_embeddings(references, encoder) if references else None,
                   languages=language)

    @property
    def spec(self) -> dict:
        spec = {"dnsmos": self.dnsmos.spec if self.dnsmos else None, "asr": self.asr.spec if self.asr else None}
        if self.speaker is not None:  # judges added later: their keys only when used, so older stamps stay valid
            spec["speaker"] = {**self.speaker.spec, "references": sorted(self.references)}
        if self.languages:
            from importlib.metadata import version

            spec["languages"] = {"langid": version("langid")}
        return spec

    def scores(self, wavs: list[np.ndarray], texts: list[str | None], who: list[str | None] | None = None) -> list[dict | str]:
        out: list[dict | str] = [{} for _ in wavs]
        failed: dict[int, str] = {}  # clip → why it has no scores (a clip one judge could not hold even alone)
        if self.speaker is not None:
            for i, wav in enumerate(wavs):
                embedding, said = attempt(lambda: self.speaker.embed(wav))
                if said is not None:
                    failed[i] = even_alone(a_clip(wav), said)
                    continue
                out[i]["embedding"] = embedding
                reference = self.references.get(who[i]) if who else None
                if reference is not None:
                    out[i]["speaker_similarity"] = float(np.dot(embedding, reference))
        if self.languages:
            for i, text in enumerate(texts):
                out[i]["text_language"] = language_of(text)
        if self.dnsmos is not None:
            for i, s in enumerate(self.dnsmos.score(wavs)):
                out[i].update(s)
        if self.asr is not None:
            for i, (hyp, ref) in enumerate(zip(self.asr.transcribe(wavs), texts)):
                if isinstance(hyp, BadAnswer):
                    out[i] = str(hyp)
                    continue
                out[i]["asr_text"] = hyp
                if self.languages:
                    heard = getattr(self.asr, "languages", {}).get(i)  # a Whisper model's own language token
                    out[i]["asr_language"] = heard or language_of(hyp)
                if ref and ref.strip():
                    rates = error_rates(ref, hyp, self.asr.normalise)
                    if isinstance(rates, str):
                        out[i] = rates
                        continue
                    out[i]["wer"], out[i]["cer"] = rates
        return [failed.get(i, scores) for i, scores in enumerate(out)]


def reference_embeddings(folder: str | Path, encoder) -> dict[str, np.ndarray]:
    """speaker id → the embedding of ``folder/SPEAKER.wav`` (any audio file libsndfile reads, named by its
    speaker id), for ``score --speaker-references``."""
    from .. import audio

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of reference recordings (one per speaker: SPEAKER.wav)")
    out = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            out[path.stem] = encoder.embed(audio.load(path))
        except AudioError as e:
            raise ValueError(f"{path}: a reference recording that cannot be read ({e})") from None
    return out
