"""``speechinstruct score IN OUT``: how good each utterance's speech is, as columns.

Two judges, either or both:

* :class:`DNSMOS`: Microsoft's DNSMOS (P.835 SIG, BAK, OVRL and P.808), the ONNX models that ship inside the
  ``speechmos`` wheel, run with onnxruntime. The scores are speechmos's ``dnsmos.run(wav, 16000)``: the same
  tiling, windows and polynomials, quirks kept (see :func:`dnsmos_windows`); the work is batched over the windows
  of many clips and the sessions and mel filterbank are built once.
* An ASR round trip (:func:`load_asr`): a transformers ASR model (Whisper, wav2vec2/Parakeet CTC, Moonshine) or an
  OpenAI-compatible ``/audio/transcriptions`` server transcribes the clip; both sides are normalised with Whisper's
  English normaliser (:func:`normalise`) and compared with jiwer: ``wer``, ``cer`` against the utterance's own text.

Input: a ``shard`` output (``manifest-NNNNN.parquet``) or a units folder (``units-NNNNN.parquet``). Output per
input shard: ``scores-NNNNN.parquet`` (``schemas/scores.json``) and ``errors-NNNNN.jsonl`` (utterances that could
not be scored, and why); ``score.json`` records the judges (models and their hashes), ``summary.json`` the
distribution of every score. A shard is done when its scores file exists (written atomically); a rerun skips it.

:class:`Gates` turns scores into keep-or-drop decisions with a reason (the recipe's ``quality`` section).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from . import records
from .audio import TARGET_SR, AudioError
from .checkpoints import load_pretrained
from .io import iter_rows, parquet_rows, read_json, read_table, remove_stale_temps, sha256_file, write_json, write_text
from .shardfiles import check_spec, select_shards, shard_suffix

SCORE_COLUMNS = ("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808", "asr_text", "wer", "cer",
                 "speaker_similarity", "text_language", "asr_language")


class ScoreError(ValueError):
    """A judge that cannot work at all (a model folder that is no ASR model, a server that is down)."""


# ------------------------------------------------------------------------------------------------ DNSMOS
DNSMOS_SR = 16_000
WINDOW_SECONDS = 9.01  # speechmos's INPUT_LENGTH
# speechmos's non-personalised polynomials (numpy.poly1d, highest power first), raw model output → MOS
POLYNOMIALS = {"ovrl": [-0.06766283, 1.11546468, 0.04602535], "sig": [-0.08397278, 1.22083953, 0.0052439],
               "bak": [-0.13166888, 1.60915514, -0.39604546]}


def dnsmos_windows(wav: np.ndarray) -> np.ndarray:
    """The (n, 144160) windows speechmos scores for one 16 kHz clip, stacked (:func:`iter_windows` gives them one
    at a time, as :meth:`DNSMOS.score` reads them)."""
    return np.stack(list(iter_windows(wav)))


def iter_windows(wav: np.ndarray) -> Iterator[np.ndarray]:
    """The windows speechmos scores for one 16 kHz clip, as views of it (never all copied at once: a 20-minute clip
    has 1,170 windows of 576 kB), computed with speechmos's own expressions: a clip shorter than 9.01 s is
    appended to itself until it is not; windows start every second; the clip's ``floor(seconds - 9.01) + 1``
    windows end at ``int((i + 9.01) * 16000)``, which float rounding makes one sample short for i = 7..23, and
    speechmos skips such windows (so do we: same scores)."""
    audio = np.asarray(wav, dtype=np.float32)
    if audio.size == 0:
        raise AudioError("no samples")
    need = int(WINDOW_SECONDS * DNSMOS_SR)
    while len(audio) < need:
        audio = np.append(audio, audio)
    hops = int(np.floor(len(audio) / DNSMOS_SR) - WINDOW_SECONDS) + 1
    for i in range(hops):
        window = audio[int(i * DNSMOS_SR): int((i + WINDOW_SECONDS) * DNSMOS_SR)]
        if len(window) >= need:
            yield window


def _models_dir() -> Path:
    import speechmos

    return Path(speechmos.__file__).parent / "dnsmos_models"


class DNSMOS:
    """DNSMOS P.835 and P.808 on batches of windows. ``score(wavs)`` → one dict per clip with ``dnsmos_ovrl``,
    ``dnsmos_sig``, ``dnsmos_bak``, ``dnsmos_p808``.

    ``engine``: ``onnxruntime`` (the default on the CPU: speechmos's own runtime, its exact scores) or ``torch``
    (the default on a GPU: the same two networks run by torch, :class:`~speechinstruct.onnx_graph.TorchGraph`, with
    the P.808 log-mel features computed by torch too, so no second CUDA stack is needed and windows of many clips go
    to the GPU in large batches; within 0.02 of speechmos on every clip, tested on the CPU)."""

    def __init__(self, threads: int | None = None, batch_windows: int | None = None, device: str = "cpu",
                 engine: str | None = None):
        import librosa

        from .threads import available_cpus

        engine = engine or ("onnxruntime" if device == "cpu" else "torch")
        self.counts: collections.Counter[str] = collections.Counter()  # batches halved for memory (torch engine)
        if engine not in ("onnxruntime", "torch"):
            raise ScoreError(f"unknown DNSMOS engine {engine!r}: onnxruntime or torch")
        self.engine, self.device = engine, device
        folder = _models_dir()
        self.files = {"p835": folder / "sig_bak_ovr.onnx", "p808": folder / "model_v8.onnx"}
        for path in self.files.values():
            if not path.is_file():
                raise ScoreError(f"{path}: missing: the speechmos wheel is incomplete; reinstall speechmos")
        self.batch_windows = batch_windows or (8 if engine == "onnxruntime" else 256)
        self.mel_basis = librosa.filters.mel(sr=DNSMOS_SR, n_fft=321, n_mels=120)  # as melspectrogram builds it
        self.polynomials = {k: np.poly1d(v) for k, v in POLYNOMIALS.items()}
        if engine == "torch":
            self._torch_networks()
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.p835 = ort.InferenceSession(str(self.files["p835"]), options, providers=providers)
        self.p808 = ort.InferenceSession(str(self.files["p808"]), options, providers=providers)

    def _torch_networks(self) -> None:
        import torch

        from .onnx_graph import TorchGraph

        self.torch_p835 = TorchGraph(self.files["p835"]).eval().to(self.device)
        self.torch_p808 = TorchGraph(self.files["p808"]).eval().to(self.device)
        self.torch_mel = torch.from_numpy(self.mel_basis).float().to(self.device)
        self.torch_window = torch.hann_window(321, periodic=True, device=self.device)  # librosa's "hann" (fftbins)

    @property
    def spec(self) -> dict:
        from importlib.metadata import version

        return {"judge": "dnsmos", "speechmos": version("speechmos"),
                "models": {k: {"file": p.name, "sha256": sha256_file(p)} for k, p in self.files.items()},
                **({"engine": "torch"} if self.engine == "torch" else {})}  # onnxruntime's stamps stay as they were

    def p808_features(self, windows: np.ndarray) -> np.ndarray:
        """(n, 900, 120) log-mel inputs of P.808, as speechmos's ``audio_melspec`` of each window less its last
        160 samples: librosa's mel power spectrogram (n_fft 321, hop 160), ``power_to_db(ref=max)`` of that
        window, then (dB + 40) / 40."""
        import librosa

        power = np.abs(librosa.stft(windows[:, :-160], n_fft=321, hop_length=160)) ** 2
        mel = np.einsum("...ft,mf->...mt", power, self.mel_basis, optimize=True)
        db = np.stack([librosa.power_to_db(m, ref=np.max) for m in mel])
        return ((db + 40) / 40).transpose(0, 2, 1).astype(np.float32)

    def torch_p808_features(self, windows):
        """:meth:`p808_features` in torch on the windows' device: librosa's centred STFT (zero padding, periodic
        Hann window of 321), mel power, ``power_to_db(ref=max, top_db=80)`` per window, then (dB + 40) / 40."""
        import torch

        spec = torch.stft(windows[:, :-160], n_fft=321, hop_length=160, window=self.torch_window, center=True,
                          pad_mode="constant", return_complex=True)
        mel = torch.einsum("mf,nft->nmt", self.torch_mel, spec.abs() ** 2)
        db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
        db = db - 10.0 * torch.log10(torch.clamp(mel.amax(dim=(1, 2), keepdim=True), min=1e-10))
        db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)
        return ((db + 40) / 40).transpose(1, 2)

    def score_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, 4) OVRL, SIG, BAK, P.808 per window."""
        if self.engine == "torch":
            return self._torch_score_windows(windows)
        out = []
        for start in range(0, len(windows), self.batch_windows):
            batch = windows[start: start + self.batch_windows].astype(np.float32)
            raw = self.p835.run(None, {"input_1": batch})[0]  # SIG, BAK, OVRL
            p808 = self.p808.run(None, {"input_1": self.p808_features(batch)})[0][:, 0]
            out.append(np.stack([self.polynomials["ovrl"](raw[:, 2]), self.polynomials["sig"](raw[:, 0]),
                                 self.polynomials["bak"](raw[:, 1]), p808.astype(np.float64)], axis=1))
        return np.concatenate(out)

    def _torch_score_windows(self, windows: np.ndarray) -> np.ndarray:
        """(n, 4) per window with torch, ``batch_windows`` at a time, halved while a batch runs out of memory."""
        from .memory import halving

        out = []
        for start in range(0, len(windows), self.batch_windows):
            rows = list(windows[start: start + self.batch_windows])
            out += halving(self._torch_batch, rows, self.counts)
        return np.asarray(out)

    def _torch_batch(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(rows), dtype=np.float32)).to(self.device)
            raw = self.torch_p835(batch).double().cpu().numpy()  # SIG, BAK, OVRL
            p808 = self.torch_p808(self.torch_p808_features(batch))[:, 0].double().cpu().numpy()
        return list(np.stack([self.polynomials["ovrl"](raw[:, 2]), self.polynomials["sig"](raw[:, 0]),
                              self.polynomials["bak"](raw[:, 1]), p808], axis=1))

    def score(self, wavs: list[np.ndarray]) -> list[dict]:
        """Scores of 16 kHz clips (samples clipped to [-1, 1], which speechmos requires), one dict each: the mean
        over each clip's windows. The windows of all clips are batched together, ``batch_windows`` at a time,
        streamed from the clips: memory holds one batch of windows, whatever the clips' lengths."""
        per_clip: list[list[np.ndarray]] = [[] for _ in wavs]
        owners: list[int] = []
        batch: list[np.ndarray] = []

        def flush():
            if batch:
                for owner, row in zip(owners, self.score_windows(np.stack(batch))):
                    per_clip[owner].append(row)
                batch.clear()
                owners.clear()

        for n, wav in enumerate(wavs):
            for window in iter_windows(np.clip(wav, -1.0, 1.0)):
                batch.append(window)
                owners.append(n)
                if len(batch) == self.batch_windows:
                    flush()
        flush()
        return [dict(zip(("dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808"), map(float, np.mean(rows, axis=0))))
                for rows in per_clip]


# ---------------------------------------------------------------------------------------------------- ASR
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


class TransformersASR:
    """A transformers ASR model from a folder (or a hub id, with internet): sequence-to-sequence (Whisper,
    Moonshine) or CTC (wav2vec2, HuBERT, Parakeet CTC). ``transcribe(wavs)`` → texts, ``batch_size`` clips per
    forward pass (the clips of a batch are padded to the longest, with an attention mask)."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 8, max_new_tokens: int = 128):
        import transformers

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
            self.model = load_pretrained(auto, model, "ASR model", unexpected_ok=True).to(device).eval()
        except ValueError as e:
            raise ScoreError(str(e)) from None
        self.kind = "seq2seq" if seq2seq else "ctc"
        self.counts: collections.Counter[str] = collections.Counter()  # batches halved for memory
        self.name, self.device, self.batch_size, self.max_new_tokens = str(model), device, batch_size, max_new_tokens
        self.revision = _revision(model)
        spelling = Path(model) / "normalizer.json"
        self.normalise = normaliser(spelling_mapping(spelling) if spelling.is_file() else None)
        self.spelling = spelling.is_file()

    def _transcribe_batch(self, batch: list[np.ndarray]) -> list[tuple[str, str | None]]:
        import torch

        inputs = self._inputs(batch).to(self.device)
        with torch.inference_mode():
            if self.kind == "seq2seq":  # Whisper counts its 4 start tokens in max_target_positions
                room = getattr(self.model.config, "max_target_positions", 1 << 30) - 8
                with _quiet_transformers():  # Whisper's generate warns per batch about its own arguments
                    ids = self.model.generate(**inputs, max_new_tokens=max(1, min(self.max_new_tokens, room)))
            else:  # each clip's own frames: the padding's frames decode to letters too
                ids = self.model(**inputs).logits.argmax(dim=-1)
                lengths = self.model._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1)).tolist()
                ids = [row[:n] for row, n in zip(ids, lengths)]
        texts = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        if self.model.config.model_type != "whisper":
            return [(t, None) for t in texts]
        raw = self.processor.batch_decode(ids, skip_special_tokens=False)  # <|startoftranscript|><|de|><|transcribe|>…
        return [(t, (re.search(r"<\|([a-z]{2,3})\|>", r) or [None, None])[1]) for t, r in zip(texts, raw)]

    @property
    def spec(self) -> dict:
        return {"judge": "asr", "model": self.name, "revision": self.revision, "kind": self.kind,
                "model_type": self.model.config.model_type, "spelling_mapping": self.spelling}

    def _inputs(self, wavs: list[np.ndarray]):
        if self.model.config.model_type == "whisper":  # Whisper's 30 s frames; longer clips as long-form
            long = max(len(w) for w in wavs) > 30 * TARGET_SR
            kwargs = {"truncation": False, "padding": "longest", "return_attention_mask": True} if long else {}
            return self.processor(wavs, sampling_rate=TARGET_SR, return_tensors="pt", **kwargs)
        return self.processor(wavs, sampling_rate=TARGET_SR, return_tensors="pt", padding=True, return_attention_mask=True)

    def transcribe(self, wavs: list[np.ndarray]) -> list[str]:
        """Texts of 16 kHz clips, ``batch_size`` at a time (similar lengths together); a batch that runs out of
        memory is halved (``self.counts["batches_halved"]``)."""
        from .memory import halving

        order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # similar lengths together: less padding
        heard: list[tuple[str, str | None]] = []
        for start in range(0, len(wavs), self.batch_size):
            batch = [wavs[i] for i in order[start: start + self.batch_size]]
            heard += halving(self._transcribe_batch, batch, self.counts,
                             lambda w: f"a clip of {len(w) / TARGET_SR:.1f} s")
        out = [""] * len(wavs)
        self.languages = {}  # clip → the language token a Whisper model chose (the last call's clips)
        for i, (text, language) in zip(order, heard):
            out[i] = text
            if language:
                self.languages[i] = language
        return out


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

        from .llm import api_key, check_endpoint

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


def load_asr(model: str, base_url: str | None = None, device: str = "cpu", batch_size: int = 8):
    """``model``: a transformers ASR folder or hub id; with ``base_url``, the model name at that endpoint
    (``openai`` means the endpoint's default, whisper-1)."""
    if base_url:
        return EndpointASR(base_url, "whisper-1" if model == "openai" else model)
    if model == "openai":
        raise ScoreError("--asr openai needs --base-url (an OpenAI-compatible /audio/transcriptions server)")
    return TransformersASR(model, device=device, batch_size=batch_size)


# -------------------------------------------------------------------------------------------------- gates
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
            if value is None:
                return f"no {name}"
            if (value < limit) if side == "below" else (value > limit):
                return f"{name} {side} {limit:g} ({value:.3f})"  # 1.996 is not shown as 2.00
        return None


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
             batch_size: int = 8, speaker: str | None = None, references: str | Path | None = None,
             language: bool = False) -> "Judge":
        """The judges a command's options or a recipe's ``quality`` name, loaded: the DNSMOS models, an ASR model (or
        a model at ``base_url``), a speaker encoder (``references``: a folder of SPEAKER.wav to compare with)."""
        from .speakers import load_speaker_encoder

        judge_dnsmos = DNSMOS(device=device) if dnsmos else None
        judge_asr = load_asr(asr, base_url=base_url, device=device, batch_size=batch_size) if asr else None
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
        if self.speaker is not None:
            for i, wav in enumerate(wavs):
                embedding = self.speaker.embed(wav)
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
        return out


# ---------------------------------------------------------------------------------------------- the job
def input_files(folder: str | Path) -> tuple[list[Path], str]:
    """The shard files of a manifest or units folder (or one such file), and which kind they are."""
    folder = Path(folder)
    for pattern, kind in (("manifest-*.parquet", "manifest"), ("units-*.parquet", "units")):
        if folder.is_file() and folder.match(pattern):
            return [folder], kind
        files = sorted(folder.glob(pattern)) if folder.is_dir() else []
        if files:
            return files, kind
    raise FileNotFoundError(f"{folder}: no manifest-*.parquet or units-*.parquet files: score reads a `shard` "
                            "output or a units folder")


def audio_root(folder: Path, kind: str) -> Path:
    """The corpus root of a manifest folder (summary.json) or a units folder (units.json, as extract wrote it)."""
    from .shardfiles import corpus_root, read_units_spec

    if kind == "manifest":
        return corpus_root(folder)
    root = (read_units_spec(folder) or {}).get("root")
    if isinstance(root, str):
        return Path(root)
    raise FileNotFoundError(f"{(folder if folder.is_dir() else folder.parent) / 'units.json'}: no corpus root recorded; "
                            "pass --root")


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score(source: str | Path, out: str | Path, judge: Judge, root: str | Path | None = None, num_shards: int = 1,
          shard_index: int = 0, workers: int = 2, clips_at_a_time: int = 16) -> dict:
    """Score every utterance of the shards this worker owns (see the module docstring); returns the summary."""
    from .decoding import AUDIO_COLUMNS, decode_rows
    from .progress import progress

    source, out = Path(source), Path(out)
    files, kind = input_files(source)
    root = Path(root) if root else audio_root(source, kind)
    out.mkdir(parents=True, exist_ok=True)
    check_spec(out, {**judge.spec, "source": str(source.resolve()), "root": str(root.resolve())}, "score.json")
    schema = records.arrow_schema("scores")
    done = skipped = 0
    started = time.perf_counter()
    for path in select_shards(files, num_shards, shard_index):
        suffix = shard_suffix(path)
        target = out / f"scores-{suffix}.parquet"
        if target.exists() and not transient_errors(out / f"errors-{suffix}.jsonl"):
            skipped += 1
            continue
        remove_stale_temps(out, f".*-{suffix}.*.tmp-*")
        present = _columns(path)
        rows = iter_rows(path, columns=[c for c in (*AUDIO_COLUMNS, "text", "speaker") if c in present])
        total = _num_rows(path)
        errors: list[dict] = []
        embeddings: list[np.ndarray] = []  # row for row with the scores file (score --speaker)
        bar = progress(total=total, desc=f"score {path.name}", unit="utt")
        with parquet_rows(target, schema, lambda rs: records.to_table("scores", rs)) as sink:
            for chunk in _chunks(decode_rows(rows, root, workers), clips_at_a_time):
                good = [(row, wav) for row, wav in chunk if not isinstance(wav, str)]
                errors += [{"id": row["id"], "path": row["path"], "reason": wav} for row, wav in chunk if isinstance(wav, str)]
                results = judge.scores([w for _, w in good], [r.get("text") for r, _ in good],
                                       [r.get("speaker") for r, _ in good]) if good else []
                for (row, _), result in zip(good, results):
                    if isinstance(result, str):
                        errors.append({"id": row["id"], "path": row["path"], "reason": result})
                    else:
                        sink.add({"id": row["id"], "duration": row["duration"], **{c: result.get(c) for c in SCORE_COLUMNS}})
                        if "embedding" in result:
                            embeddings.append(result["embedding"])
                bar.update(len(chunk))
            bar.close()
            write_text(out / f"errors-{suffix}.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
            if judge.speaker is not None:  # before the scores file appears: a complete shard has its embeddings
                write_embeddings(out / f"embeddings-{suffix}.npy", embeddings, judge.speaker.dim)
        done += 1
    halved = sum(getattr(j, "counts", {}).get("batches_halved", 0) for j in (judge.dnsmos, judge.asr) if j is not None)
    summary = {"shards_done": done, "shards_skipped": skipped, "seconds": round(time.perf_counter() - started, 3),
               **({"batches_halved": halved} if halved else {}), **summarise(out)}
    write_json(out / "summary.json", summary)
    return summary


def reason_key(error: dict) -> str:
    """What an error counts as: its reason without the file it names (``…/a.flac: unreadable audio (…)``) and without
    the detail in brackets, which may quote a server's answer (``{"text": ["a", "b"]}``)."""
    reason, name = str(error.get("reason", "")), Path(str(error.get("path") or "")).name
    if name and f"{name}: " in reason:
        reason = reason.rsplit(f"{name}: ", 1)[1]
    return reason.split(" (")[0].strip() or "unknown"


def transient_errors(path: Path) -> int:
    """How many errors of an errors file record a passing server failure (HTTP 408/409/429/5xx), as versions before
    0.3 wrote them: such a shard is scored again on a rerun."""
    if not path.is_file():
        return 0
    statuses = "|".join(map(str, TRANSIENT_STATUS))
    pattern = re.compile(rf"answered HTTP (?:{statuses})\b")
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line))


def write_embeddings(path: Path, embeddings: list[np.ndarray], dim: int) -> None:
    """(rows, dim) float16 speaker embeddings, row i the scores file's row i, written atomically."""
    from .io import atomic_path

    array = np.asarray(embeddings, dtype=np.float16).reshape(len(embeddings), dim)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def read_embeddings(folder: str | Path, suffix: str) -> tuple[list[str], np.ndarray] | None:
    """(ids, embeddings) of one shard of a ``score --speaker`` output, or None when it has none."""
    path = Path(folder) / f"embeddings-{suffix}.npy"
    if not path.is_file():
        return None
    ids = read_table(Path(folder) / f"scores-{suffix}.parquet", columns=["id"]).column("id").to_pylist()
    return ids, np.load(path, allow_pickle=False).astype(np.float32)


def reference_embeddings(folder: str | Path, encoder) -> dict[str, np.ndarray]:
    """speaker id → the embedding of ``folder/SPEAKER.wav`` (any audio file libsndfile reads, named by its
    speaker id), for ``score --speaker-references``."""
    from . import audio

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


def _columns(path: Path) -> set[str]:
    import pyarrow.parquet as pq

    from .io import naming

    with naming(path):
        return set(pq.read_schema(path).names)


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


HISTOGRAM_BINS = {"dnsmos_ovrl": np.linspace(1, 5, 17), "dnsmos_sig": np.linspace(1, 5, 17),
                  "dnsmos_bak": np.linspace(1, 5, 17), "dnsmos_p808": np.linspace(1, 5, 17),
                  "wer": np.linspace(0, 1, 11), "cer": np.linspace(0, 1, 11)}


def summarise(folder: str | Path) -> dict:
    """Counts, mean, percentiles and a histogram of every score over all scores files of a folder, and the
    skip reasons of the errors files."""
    folder = Path(folder)
    tables = [read_table(p) for p in sorted(folder.glob("scores-*.parquet"))]
    reasons: collections.Counter[str] = collections.Counter()
    for p in sorted(folder.glob("errors-*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                reasons[reason_key(json.loads(line))] += 1
    summary: dict = {"utterances": sum(t.num_rows for t in tables), "skipped": sum(reasons.values()),
                     "skip_reasons": dict(reasons.most_common()), "scores": {}}
    for column in ("text_language", "asr_language"):  # utterances per language measured (score --language)
        found = collections.Counter(v for t in tables if column in t.column_names for v in t.column(column).to_pylist() if v)
        if found:
            summary[column] = dict(found.most_common())
    for column, bins in HISTOGRAM_BINS.items():
        values = np.concatenate([t.column(column).to_numpy(zero_copy_only=False) for t in tables]) if tables else np.zeros(0)
        values = values[~np.isnan(values.astype(np.float64))] if values.size else values
        if not values.size:
            continue
        values = values.astype(np.float64)
        counts, edges = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)
        summary["scores"][column] = {
            "count": int(values.size), "mean": round(float(values.mean()), 4),
            **{f"p{q}": round(float(np.percentile(values, q)), 4) for q in (5, 50, 95)},
            "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()}}
    return summary


def read_scores(folder: str | Path, suffix: str) -> dict[str, dict]:
    """id → score columns of one shard (``scores-{suffix}.parquet``)."""
    path = Path(folder) / f"scores-{suffix}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: run `speechinstruct score` on this shard first")
    table = read_table(path)
    return {row["id"]: {c: row.get(c) for c in SCORE_COLUMNS} for row in table.to_pylist()}  # older files lack some
