"""An ASR round trip (:func:`load_asr`): a transformers ASR model (Whisper, wav2vec2/Parakeet CTC, Moonshine) or an
OpenAI-compatible ``/audio/transcriptions`` server transcribes a clip; both sides are normalised with Whisper's
English normaliser (:func:`normaliser`) and compared with jiwer (:func:`error_rates`: WER and CER).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import json
import re
from pathlib import Path

import numpy as np

from ..audio import TARGET_SR
from ..checkpoints import load_pretrained
from ..io import read_json, sha256_file
from ..memory import attempt, even_alone
from . import ScoreError


def normaliser(spelling: dict | None = None):
    """Whisper's English text normaliser as transformers ships it (``EnglishTextNormalizer``): lower case,
    punctuation, numbers, contractions, "mr" → "mister"; ``spelling``: its British → American mapping, the
    ``normalizer.json`` of a Whisper checkpoint, when one is at hand (transformers itself ships none)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(spelling or {})


def spelling_mapping(path: Path) -> dict[str, str]:
    """A Whisper checkpoint's ``normalizer.json``: British → American spellings, every key and value a word."""
    mapping = read_json(path, hint=": a Whisper normalizer.json maps words to words")
    bad = next(((k, v) for k, v in mapping.items() if not isinstance(v, str)), None)
    if bad:
        raise ScoreError(f"{path}: {bad[0]!r} maps to {bad[1]!r}, not a word: a Whisper normalizer.json maps words to words")
    return mapping


def error_rates(reference: str, hypothesis: str, normalise) -> tuple[float, float] | str:
    """(WER, CER) of ``hypothesis`` against ``reference``, both normalised, with jiwer; or the reason there is
    none (a reference with no words left after normalisation)."""
    import jiwer

    ref, hyp = normalise(reference).strip(), normalise(hypothesis).strip()
    if not ref:
        return "no words in the transcript after normalisation"
    if not hyp:
        return 1.0, 1.0
    return float(jiwer.wer(ref, hyp)), float(jiwer.cer(ref, hyp))


DTYPES = ("auto", "float32", "bfloat16", "float16")  # ASR weights and compute; auto: bfloat16 on a GPU, else float32


def default_batch_size(device: str) -> int:
    """Clips per forward pass when none is given: 8 on the CPU, where a larger batch only pads more; 64 on a GPU
    (the GPU benchmark's size), halved where it does not fit (``memory.batches``)."""
    import torch

    return 8 if torch.device(device).type == "cpu" else 64


class TransformersASR:
    """A transformers ASR model from a folder (or a hub id, with internet): sequence-to-sequence (Whisper,
    Moonshine) or CTC (wav2vec2, HuBERT, Parakeet CTC: one forward pass and an argmax, the fast path).
    ``transcribe(wavs)`` → texts, ``batch_size`` clips per forward pass (the clips of a batch are padded to the
    longest, with an attention mask; None: :func:`default_batch_size`). ``dtype``: the weights' (``auto``: bfloat16
    on a GPU, float32 on the CPU)."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int | None = None, max_new_tokens: int = 128,
                 dtype: str = "auto"):
        import torch
        import transformers

        if dtype not in DTYPES:
            raise ScoreError(f"unknown ASR dtype {dtype!r}: choose {', '.join(DTYPES)}")
        if dtype == "auto":
            dtype = "float32" if torch.device(device).type == "cpu" else "bfloat16"

        try:
            config = transformers.AutoConfig.from_pretrained(model)
        except (OSError, ValueError) as e:
            raise ScoreError(f"{model}: not a transformers model folder or hub id ({str(e).splitlines()[0]})") from None
        seq2seq = type(config) in transformers.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING
        ctc = type(config) in transformers.MODEL_FOR_CTC_MAPPING
        if not (seq2seq or ctc):
            raise ScoreError(f"{model}: not an ASR model (a {config.model_type!r} model; score --asr takes a "
                             "speech-to-text or CTC model: Whisper, Moonshine, wav2vec2, Parakeet CTC)")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model)
        except Exception as e:  # noqa: BLE001  a malformed tokenizer or feature-extractor file, whatever it raises
            raise ScoreError(f"{model}: cannot load the ASR model's processor ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]})") from None
        auto = transformers.AutoModelForSpeechSeq2Seq if seq2seq else transformers.AutoModelForCTC
        try:
            self.model = load_pretrained(auto, model, "ASR model", unexpected_ok=True).to(device, getattr(torch, dtype)).eval()
        except ValueError as e:
            raise ScoreError(str(e)) from None
        self.kind, self.dtype = "seq2seq" if seq2seq else "ctc", dtype
        # Whisper's and Parakeet's feature extractors compute their log-mel spectrograms with torch on a device of
        # our choice: the model's (on the CPU the same inputs as before; on a GPU the gain is not measured yet)
        extractor = getattr(self.processor, "feature_extractor", None)
        self._spectrograms_at = ({"device": device} if extractor is not None
                                 and "device" in inspect.signature(extractor.__call__).parameters else {})
        self.counts: collections.Counter[str] = collections.Counter()  # batches halved for memory
        self.name, self.device, self.max_new_tokens = str(model), device, max_new_tokens
        self.batch_size = batch_size or default_batch_size(device)
        self.revision = _revision(model)
        spelling = Path(model) / "normalizer.json"
        self.normalise = normaliser(spelling_mapping(spelling) if spelling.is_file() else None)
        self.spelling = spelling.is_file()

    def _transcribe_batch(self, batch: list[np.ndarray]) -> list[tuple[str, str | None]]:
        import torch

        inputs = self._inputs(batch).to(self.device)
        inputs = inputs.to(self.model.dtype)  # floating inputs (samples, log-mels) only; masks stay integers
        with torch.inference_mode():
            if self.kind == "seq2seq":  # Whisper counts its 4 start tokens in max_target_positions
                room = getattr(self.model.config, "max_target_positions", 1 << 30) - 8
                with _quiet_transformers():  # Whisper's generate warns per batch about its own arguments
                    ids = self.model.generate(**inputs, max_new_tokens=max(1, min(self.max_new_tokens, room)))
            else:  # each clip's own frames: the padding's frames decode to letters too
                ids = self.model(**inputs).logits.argmax(dim=-1)
                lengths = _ctc_frames(self.model, inputs["attention_mask"]).tolist()
                ids = [row[:n] for row, n in zip(ids, lengths)]
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.model.config.model_type != "whisper":
            return [(t, None) for t in texts]
        raw = self.processor.batch_decode(ids, skip_special_tokens=False)  # <|startoftranscript|><|de|><|transcribe|>…
        return [(t, (re.search(r"<\|([a-z]{2,3})\|>", r) or [None, None])[1]) for t, r in zip(texts, raw)]

    def _transcribe_or_reason(self, batch: list[np.ndarray]) -> list[tuple[str, str | None]]:
        """:meth:`_transcribe_batch`; for one clip that does not fit even alone (attention over an hour left uncut),
        the reason it has no transcript (:class:`BadAnswer`), so that the others are scored and a rerun ends."""
        if len(batch) > 1:  # halved by the caller (memory.batches)
            return self._transcribe_batch(batch)
        heard, said = attempt(lambda: self._transcribe_batch(batch))
        return heard if said is None else [(BadAnswer(even_alone(a_clip(batch[0]), said)), None)]

    @property
    def spec(self) -> dict:
        spec = {"judge": "asr", "model": self.name, "revision": self.revision, "kind": self.kind,
                "model_type": self.model.config.model_type, "spelling_mapping": self.spelling}
        if self.dtype != "float32":  # float32 scores keep the spec (and stamps) they always had
            spec["dtype"] = self.dtype
        return spec

    def _inputs(self, wavs: list[np.ndarray]):
        where = self._spectrograms_at
        if self.model.config.model_type == "whisper":  # Whisper's 30 s frames; longer clips as long-form
            long = max(len(w) for w in wavs) > 30 * TARGET_SR
            kwargs = {"truncation": False, "padding": "longest", "return_attention_mask": True} if long else {}
            return self.processor(wavs, sampling_rate=TARGET_SR, return_tensors="pt", **kwargs, **where)
        return self.processor(wavs, sampling_rate=TARGET_SR, return_tensors="pt", padding=True, return_attention_mask=True,
                              **where)

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Texts of 16 kHz clips, ``batch_size`` at a time (similar lengths together); a batch that runs out of
        memory is halved (``self.counts["batches_halved"]``), and ``batch_size`` becomes what fitted."""
        from ..memory import batches

        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # similar lengths together: less padding
        heard, self.batch_size = batches(self._transcribe_or_reason, [wavs[i] for i in order], self.batch_size,
                                         self.counts, a_clip)
        out = [""] * len(wavs)
        self.languages = {}  # clip → the language token a Whisper model chose (the last call's clips)
        for i, (text, language) in zip(order, heard):
            out[i] = text
            if language:
                self.languages[i] = language
        return out


def a_clip(wav: np.ndarray) -> str:
    """A 16 kHz clip, as a line about memory names it."""
    return f"a clip of {len(wav) / TARGET_SR:.1f} s"


def _ctc_frames(model, attention_mask):
    """Each clip's output frames in a CTC model's padded batch: wav2vec2's family counts them from the samples,
    Parakeet's from its log-mel frames (subsampled 8x), each with the model's own arithmetic."""
    counted = attention_mask.sum(-1)
    if hasattr(model, "_get_feat_extract_output_lengths"):
        return model._get_feat_extract_output_lengths(counted)
    return model._get_subsampling_output_length(counted)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off for a block (errors still show)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _revision(model: str) -> str:
    """What names the weights exactly: the sha256 of a folder's weights file, or the hub commit of a hub id."""
    folder = Path(model)
    if folder.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                return "sha256:" + sha256_file(folder / name)
        return "unknown"
    from transformers.utils import cached_file

    parts = Path(cached_file(model, "config.json")).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"


# HTTP statuses that say "not now" rather than "never": timeout, conflict, rate limit, server errors
TRANSIENT_STATUS = (408, 409, 429, 500, 502, 503, 504)


class EndpointASR:
    """An OpenAI-compatible ``POST {base_url}/audio/transcriptions`` server (OpenAI's API shape; tested against a
    loopback server that answers as OpenAI documents): each clip sent as 16-bit WAV, ``threads`` requests at a time.
    A request that times out or is answered 408/409/429/5xx is retried by the ``openai`` client, ``max_retries``
    times with exponential backoff (0.5 s doubling, at most 8 s apart) or after the server's ``Retry-After``; a server
    still failing then, or one that cannot be reached, stops the job (:class:`ScoreError`): the shard is not written,
    so a rerun scores it once the server is back, and no passing failure is ever recorded as a score. An answer with
    no transcript in it is that utterance's error (:class:`BadAnswer`)."""

    MAX_RETRIES = 6  # 0.5 + 1 + 2 + 4 + 8 + 8 s of backoff (less up to a quarter: jitter) before a server counts as down

    def __init__(self, base_url: str, model: str = "whisper-1", threads: int = 4, timeout: float = 120.0,
                 max_retries: int | None = None):
        from openai import OpenAI

        from ..llm import api_key, check_endpoint

        check_endpoint(base_url, "--base-url")
        self.client = OpenAI(base_url=base_url, api_key=api_key() or "none", timeout=timeout,
                             max_retries=self.MAX_RETRIES if max_retries is None else max_retries)
        self.base_url, self.name, self.threads = base_url, model, threads
        self.normalise, self.kind = normaliser(), "endpoint"

    @property
    def spec(self) -> dict:
        return {"judge": "asr", "model": self.name, "base_url": self.base_url, "kind": self.kind}

    def _one(self, wav: np.ndarray) -> str | BadAnswer:
        import openai
        import soundfile as sf

        data = io.BytesIO()
        sf.write(data, np.clip(wav, -1, 1), TARGET_SR, format="WAV", subtype="PCM_16")
        try:
            raw = self.client.audio.transcriptions.with_raw_response.create(
                model=self.name, file=("utterance.wav", data.getvalue(), "audio/wav"), response_format="json")
            body = raw.http_response.text
        except openai.APIConnectionError as e:  # also a timeout, after the retries
            raise ScoreError(f"{self.base_url}: transcription server unreachable ({e}) after "
                             f"{self.client.max_retries} retries; run again when it is back") from None
        except openai.APIStatusError as e:
            if e.status_code in (401, 403, 404):  # every request would fail the same way
                raise ScoreError(f"{self.base_url}: transcription request refused (HTTP {e.status_code}: "
                                 f"{str(e)[:200]})") from None
            if e.status_code in TRANSIENT_STATUS:  # still failing after the client's retries: stop, record nothing
                raise ScoreError(f"{self.base_url}: transcription server still answering HTTP {e.status_code} after "
                                 f"{self.client.max_retries} retries; nothing of this shard was written: run again "
                                 "when it is back (finished shards are kept)") from None
            return BadAnswer(f"transcription server answered HTTP {e.status_code}")
        try:
            text = json.loads(body)["text"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            return BadAnswer(f"transcription server answered no transcript ({body[:60]!r})")
        return text.strip()

    def transcribe(self, wavs: list[np.ndarray]) -> list[str | BadAnswer]:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(self._one, wavs))


class BadAnswer(str):
    """The reason one utterance got no transcript."""


def load_asr(model: str, base_url: str | None = None, device: str = "cpu", batch_size: int | None = None,
             dtype: str = "auto"):
    """``model``: a transformers ASR folder or hub id; with ``base_url``, the model name at that endpoint
    (``openai`` means the endpoint's default, whisper-1). ``dtype``: a transformers model's (:data:`DTYPES`)."""
    if base_url:
        return EndpointASR(base_url, "whisper-1" if model == "openai" else model)
    if model == "openai":
        raise ScoreError("--asr openai needs --base-url (an OpenAI-compatible /audio/transcriptions server)")
    return TransformersASR(model, device=device, batch_size=batch_size, dtype=dtype)
