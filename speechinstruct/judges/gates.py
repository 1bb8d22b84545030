"""The recipe's ``quality`` thresholds as keep-or-drop decisions with a reason (:class:`Gates`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gates:
    """The recipe's ``quality`` thresholds; None = no gate. ``reason(scores)`` says why an utterance fails."""

    min_dnsmos: float | None = None
    max_wer: float | None = None
    max_cer: float | None = None
    min_speaker_similarity: float | None = None  # synthesized speech: each turn's voice against its reference
    languages: tuple[str, ...] | None = None     # the languages kept (transcript, and the audio when heard)

    @classmethod
    def of(cls, quality: dict, synthesized: bool = False) -> "Gates":
        """The recipe's ``quality`` thresholds for corpus utterances, or (``synthesized``) for the speech compose
        synthesises: its ``synthesized`` section when there is one (a threshold left out there is no gate),
        else the corpus's."""
        source = quality.get("synthesized") or quality if synthesized else quality
        languages = source.get("languages")
        return cls(source.get("min_dnsmos"), source.get("max_wer"), source.get("max_cer"),
                   source.get("min_speaker_similarity"), tuple(languages) if languages else None)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_dnsmos, self.max_wer, self.max_cer, self.min_speaker_similarity,
                                           self.languages))

    def reason(self, scores: dict | None) -> str | None:
        if not self.active:
            return None
        if scores is None:
            return "not scored"
        if self.languages:
            for column, name in (("text_language", "transcript"), ("asr_language", "audio")):
                found = scores.get(column)
                if found is not None and found not in self.languages:
                    return f"{name} in {found}, not {'/'.join(self.languages)}"
        checks = (("dnsmos_ovrl", self.min_dnsmos, "DNSMOS OVRL", "below"), ("wer", self.max_wer, "WER", "above"),
                  ("cer", self.max_cer, "CER", "above"),
                  ("speaker_similarity", self.min_speaker_similarity, "speaker similarity", "below"))
        for column, limit, name, side in checks:
            if limit is None:
                continue
            value = scores.get(column)
            if value is None or value != value:  # NaN: not measured (it would pass every comparison)
                return f"no {name}"
            if (value < limit) if side == "below" else (value > limit):
                return f"{name} {side} {limit:g} ({value:.3f})"  # 1.996 is not shown as 2.00
        return None
