import numpy as np
import pytest
import soundfile as sf

from speechinstruct import audio
from conftest import speechlike


def dominant_frequency(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    return float(np.fft.rfftfreq(wav.size, 1 / sr)[spectrum.argmax()])


def test_resampled_tone_keeps_its_pitch(tmp_path):
    t = np.arange(48000) / 48000
    sf.write(tmp_path / "tone.wav", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), 48000)
    wav = audio.load(tmp_path / "tone.wav")
    assert wav.dtype == np.float32 and wav.shape == (16000,)
    assert abs(dominant_frequency(wav, 16000) - 1000) < 2


@pytest.mark.parametrize("fmt,subtype,sr", [("WAV", "PCM_16", 16000), ("FLAC", None, 22050), ("OGG", "OPUS", 48000), ("MP3", None, 44100)])
def test_decodes_every_format_to_16k_mono(tmp_path, fmt, subtype, sr):
    stereo = np.stack([speechlike(2.0, sr, seed=1), speechlike(2.0, sr, seed=2)], axis=1)
    path = tmp_path / f"x.{fmt.lower()}"
    sf.write(path, stereo, sr, format=fmt, subtype=subtype)
    wav = audio.load(path)
    assert wav.ndim == 1
    assert abs(wav.size - 32000) < 1200  # lossy codecs pad a little


def test_window_read_matches_slice_of_full_read(tmp_path):
    wav = speechlike(5.0, 16000, seed=3)
    sf.write(tmp_path / "x.flac", wav, 16000)
    window = audio.load(tmp_path / "x.flac", offset=1.25, duration=2.0)
    np.testing.assert_allclose(window, wav[20000:52000], atol=1e-4)


def test_window_past_end_is_truncation_error(tmp_path):
    sf.write(tmp_path / "x.flac", speechlike(1.0, seed=4), 16000)
    with pytest.raises(audio.AudioError, match=r"x\.flac: truncated"):
        audio.load(tmp_path / "x.flac", offset=0.5, duration=2.0)


@pytest.mark.parametrize("content,match", [(b"", "unreadable"), (b"RIFF\x00\x00garbage", "unreadable")])
def test_unreadable_file_names_the_file(tmp_path, content, match):
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(audio.AudioError, match=rf"bad\.wav: {match}"):
        audio.load(tmp_path / "bad.wav")


def test_empty_silent_and_nonfinite_audio_are_refused(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(audio.AudioError, match="empty.wav"):
        audio.load(tmp_path / "empty.wav")
    sf.write(tmp_path / "silent.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(audio.AudioError, match="silent.wav: all-silent"):
        audio.load(tmp_path / "silent.wav")
    bad = speechlike(1.0)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="nan.wav: contains NaN"):
        audio.load(tmp_path / "nan.wav")
