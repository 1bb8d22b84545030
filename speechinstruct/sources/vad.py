"""Voice activity detection with silero-vad's model, streamed over recordings of any length.

The model is silero-vad 6.2.0's ONNX file (MIT licensed), shipped inside this package as
``speechinstruct/data/silero_vad.onnx`` with its license beside it, so ``pip install speechinstruct`` is complete
(a test holds it byte-identical to the file in the ``silero-vad`` wheel). The package itself cannot be imported
here: ``silero_vad/utils_vad.py`` imports torchaudio at its top, which loads only beside the exact torch it was
built for, and its wheel declares torchaudio, which breaks ``import transformers``. The file is run with onnxruntime as silero's own
``OnnxWrapper`` runs it (512-sample windows at 16 kHz, each with the previous window's last 64 samples before it,
the recurrent state carried), and the speech spans follow the rules of silero's ``get_speech_timestamps`` with
its defaults (threshold 0.5, off below threshold - 0.15, speech of at least 250 ms, silences of at least 100 ms
end a span, 30 ms of padding, no maximum length). Unlike ``get_speech_timestamps``, the audio is read and
resampled in blocks (soundfile, soxr's streaming resampler), so memory does not grow with the recording.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

RATE, WINDOW, CONTEXT = 16000, 512, 64
BLOCK_SECONDS = 30.0


@dataclass(frozen=True)
class Rules:
    """``get_speech_timestamps``' settings, in its units."""

    threshold: float = 0.5
    min_speech_ms: int = 250
    min_silence_ms: int = 100
    speech_pad_ms: int = 30

    @property
    def off(self) -> float:  # silero's neg_threshold default
        return max(self.threshold - 0.15, 0.01)


def model_file() -> Path:
    """The packaged ``silero_vad.onnx`` (silero-vad 6.2.0's)."""
    from importlib import resources

    path = Path(str(resources.files("speechinstruct.data").joinpath("silero_vad.onnx")))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing: this speechinstruct installation is incomplete; reinstall it")
    return path


def wheel_model_file() -> Path | None:
    """``silero_vad/data/silero_vad.onnx`` of an installed silero-vad wheel, found without importing the package
    (the tests hold the packaged copy to it); None when none is installed."""
    from ..io import installed_file

    return installed_file("silero_vad", "data", "silero_vad.onnx")


class SileroVAD:
    """Speech probabilities of 16 kHz audio, window by window (:meth:`probabilities`), and speech spans of a
    file (:meth:`spans`)."""

    def __init__(self, rules: Rules = Rules()):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = options.intra_op_num_threads = 1  # as silero's OnnxWrapper
        self.session = onnxruntime.InferenceSession(str(model_file()), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.rules = rules

    def probabilities(self, blocks: Iterable[np.ndarray]) -> Iterator[float]:
        """One speech probability per 512 samples of the 16 kHz stream ``blocks`` (the last window zero-padded)."""
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(CONTEXT, np.float32)
        rest = np.zeros(0, np.float32)
        sr = np.array(RATE, dtype=np.int64)
        for block in itertools.chain(blocks, [None]):  # None: the end of the stream
            if block is None:
                if not rest.size:
                    break
                rest = np.pad(rest, (0, WINDOW - rest.size))
            else:
                rest = np.concatenate([rest, np.asarray(block, np.float32)])
            while rest.size >= WINDOW:
                window, rest = rest[:WINDOW], rest[WINDOW:]
                x = np.concatenate([context, window])[None]
                prob, state = self.session.run(None, {"input": x, "state": state, "sr": sr})
                context = window[-CONTEXT:]
                yield float(prob.reshape(-1)[0])

    def spans(self, path: str | Path, channel: int | None = None) -> tuple[list[tuple[float, float]], float]:
        """(speech spans in seconds, duration) of one audio file (its channels mixed, or its ``channel`` alone),
        read in blocks."""
        samples = [0]

        def counted(blocks):
            for block in blocks:
                samples[0] += block.size
                yield block

        probs = list(self.probabilities(counted(stream_16k(path, channel=channel))))
        found = speech_spans(probs, samples[0], self.rules)
        return [(a / RATE, b / RATE) for a, b in found], samples[0] / RATE


def stream_16k(path: str | Path, block_seconds: float = BLOCK_SECONDS, channel: int | None = None) -> Iterator[np.ndarray]:
    """A file's samples at 16 kHz, its channels mixed or its ``channel`` alone, a block at a time (soxr's
    streaming resampler: the same samples as resampling the whole file, without holding it)."""
    import soundfile as sf
    import soxr

    from ..audio import AudioError

    try:
        with sf.SoundFile(str(path)) as f:
            resampler = None if f.samplerate == RATE else soxr.ResampleStream(f.samplerate, RATE, 1, dtype="float32")
            read = 0
            for block in f.blocks(blocksize=int(block_seconds * f.samplerate), dtype="float32", always_2d=True):
                mono = (block.mean(axis=1) if channel is None else block[:, channel]).astype(np.float32)
                bad = np.flatnonzero(~np.isfinite(mono))
                if bad.size:  # the VAD would read them as silence, and every row cut here would fail to decode
                    raise AudioError(f"{path}: contains NaN or Inf samples (the first at {(read + bad[0]) / f.samplerate:.3f} s)")
                read += block.shape[0]
                yield mono if resampler is None else resampler.resample_chunk(mono)
            if resampler is not None:
                yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from None


def speech_spans(probs: list[float], n_samples: int, rules: Rules = Rules()) -> list[tuple[int, int]]:
    """(start, end) samples of speech from window probabilities, by ``get_speech_timestamps``' rules (no maximum
    speech length): speech starts at a window at or above the threshold and ends at the first window below
    ``rules.off`` that begins a silence of at least ``min_silence_ms``; spans of ``min_speech_ms`` or less are
    dropped; then each is padded by ``speech_pad_ms``, or by half the gap when two are closer than two pads."""
    min_speech = RATE * rules.min_speech_ms / 1000
    min_silence = RATE * rules.min_silence_ms / 1000
    pad = RATE * rules.speech_pad_ms / 1000
    found: list[list[int]] = []
    start, triggered, temp_end = 0, False, 0
    for i, p in enumerate(probs):
        sample = WINDOW * i
        if p >= rules.threshold and temp_end:
            temp_end = 0
        if p >= rules.threshold and not triggered:
            triggered, start = True, sample
            continue
        if p < rules.off and triggered:
            if not temp_end:
                temp_end = sample
            if sample - temp_end < min_silence:
                continue
            if temp_end - start > min_speech:
                found.append([start, temp_end])
            triggered, temp_end = False, 0
    if triggered and n_samples - start > min_speech:
        found.append([start, n_samples])
    for i, span in enumerate(found):
        if i == 0:
            span[0] = int(max(0, span[0] - pad))
        if i != len(found) - 1:
            gap = found[i + 1][0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                found[i + 1][0] = int(max(0, found[i + 1][0] - gap // 2))
            else:
                span[1] = int(min(n_samples, span[1] + pad))
                found[i + 1][0] = int(max(0, found[i + 1][0] - pad))
        else:
            span[1] = int(min(n_samples, span[1] + pad))
    return [(a, b) for a, b in found]


def utterances(spans: list[tuple[float, float]], max_seconds: float, max_pause: float = 2.0) -> list[tuple[float, float]]:
    """Speech spans grouped into utterances of at most ``max_seconds``: spans closer than ``max_pause`` are
    joined (so no pause of ``max_pause`` or more is inside an utterance); a group longer than ``max_seconds`` is
    cut at its longest pause, again until every part fits, as LibriLight's cuts are; one span longer than
    ``max_seconds`` alone is cut into equal parts."""
    groups: list[list[tuple[float, float]]] = []
    for span in spans:
        if groups and span[0] - groups[-1][-1][1] < max_pause:
            groups[-1].append(span)
        else:
            groups.append([span])
    out: list[tuple[float, float]] = []

    def place(group: list[tuple[float, float]]) -> None:
        start, end = group[0][0], group[-1][1]
        if end - start <= max_seconds:
            out.append((start, end))
        elif len(group) == 1:
            pieces = int(np.ceil((end - start) / max_seconds))
            step = (end - start) / pieces
            out.extend((start + i * step, start + (i + 1) * step) for i in range(pieces))
        else:
            cut = max(range(1, len(group)), key=lambda i: group[i][0] - group[i - 1][1])
            place(group[:cut])
            place(group[cut:])

    for group in groups:
        place(group)
    return out
