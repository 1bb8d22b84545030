"""Audio input: decode wav/flac/ogg-opus/mp3 with soundfile (libsndfile), downmix, resample with soxr.

``load(path, offset, duration)`` seeks to the window instead of decoding the whole file where the format
allows it (libsndfile seeks in wav, flac, ogg and mp3).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import soxr

TARGET_SR = 16_000
SILENCE_PEAK = 1e-4  # about -80 dBFS: below this a window holds no speech


class AudioError(ValueError):
    """A file that cannot be used as speech; the message names the file and the problem."""


def sample_rate_of(model) -> int:
    """The rate a feature extractor or speech tokenizer reads audio at: its own (a codec's), else 16 kHz."""
    return int(getattr(model, "sample_rate", TARGET_SR))


def info(path: str | os.PathLike) -> tuple[int, int]:
    """(sample_rate, frames) of an audio file."""
    i = _info(path)
    return i.samplerate, i.frames


def channels(path: str | os.PathLike) -> int:
    """How many channels an audio file has."""
    return _info(path).channels


def _info(path: str | os.PathLike):
    try:
        return sf.info(str(path))
    except Exception as e:  # libsndfile's errors are RuntimeError/LibsndfileError
        raise AudioError(f"{path}: unreadable audio ({e})") from None


def resample(wav: np.ndarray, sr: int, target_sr: int = TARGET_SR) -> np.ndarray:
    if sr == target_sr:
        return wav.astype(np.float32, copy=False)
    return soxr.resample(wav, sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def load(
    path: str | os.PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    target_sr: int = TARGET_SR,
    reject_silence: bool = True,
    name: str | None = None,
    channel: int | None = None,
) -> np.ndarray:
    """Float32 mono samples at ``target_sr`` of ``[offset, offset + duration)`` seconds of ``path`` (a file
    name, or a binary file object such as ``io.BytesIO`` of encoded audio; ``name`` then labels errors): its
    channels mixed, or its ``channel`` alone (0-based: one side of a two-channel telephone call)."""
    source = path if hasattr(path, "read") else str(path)
    path = name or path
    try:
        with sf.SoundFile(source) as f:
            sr = f.samplerate
            start = int(round(offset * sr))
            if start:
                if not f.seekable():
                    raise AudioError(f"{path}: cannot seek to {offset:.3f} s")
                f.seek(start)
            frames = -1 if duration is None else int(round(duration * sr))
            wav = f.read(frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: no samples in window offset={offset} duration={duration}")
    if duration is not None and wav.shape[0] < 0.9 * duration * sr:
        raise AudioError(
            f"{path}: truncated: asked for {duration:.3f} s at {offset:.3f} s, file gave {wav.shape[0] / sr:.3f} s"
        )
    if channel is not None:
        if not 0 <= channel < wav.shape[1]:
            raise AudioError(f"{path}: no channel {channel} (channels 0 to {wav.shape[1] - 1})")
        wav = wav[:, channel]
    else:
        wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if not np.isfinite(wav).all():
        raise AudioError(f"{path}: contains NaN or Inf samples")
    if reject_silence and float(np.abs(wav).max()) < SILENCE_PEAK:
        raise AudioError(f"{path}: all-silent window (peak below {SILENCE_PEAK:g}) at {offset:.3f} s")
    return resample(wav, sr, target_sr)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sr: int = TARGET_SR) -> None:
    """A 16-bit PCM wav, written atomically (complete or absent)."""
    from .io import atomic_path

    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(wav, -1.0, 1.0), sr, format="WAV", subtype="PCM_16")
