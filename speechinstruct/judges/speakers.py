"""Who speaks: speaker embeddings, their similarity, and speakers found in raw recordings by clustering.

Two encoders, one face (``embed(wav_16k) -> unit vector``, ``spec``):

* :class:`GE2E`, the default, needs no download: Resemblyzer's GE2E speaker encoder (a 3-layer LSTM over 40 mel
  bands, 256-dimensional embeddings), whose weights ship inside the ``resemblyzer`` wheel (Apache-2.0). The
  package itself is not imported (its ``audio`` module imports webrtcvad, and its wheel declares the ``typing``
  backport, which must not be installed on Python 3): ``scripts/setup.sh`` installs the wheel without
  dependencies, and the weights file is read from where it lies. ``embed`` computes what
  ``VoiceEncoder.embed_utterance`` does, step for step: partial utterances of 1.6 s at 1.3 per second (the last kept
  when at least 75 % covered, the waveform zero-padded to it), librosa's 40-band mel power spectrogram (25 ms
  windows, 10 ms hops), the LSTM's last hidden state through a linear layer and a ReLU, each partial L2-normed,
  their mean L2-normed (a test holds the two equal).
* :class:`XVector`: any transformers audio x-vector model (WavLM for x-vectors: a folder, or a hub id with
  internet), its embedding L2-normed.

:func:`cluster_speakers` groups the embeddings of one recording's segments (average-linkage agglomerative
clustering on cosine distance, cut at ``threshold``; the number of speakers is what the cut leaves).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
PARTIAL_FRAMES, HOP_MS, WINDOW_MS, N_MELS = 160, 10, 25, 40


def resemblyzer_weights() -> Path:
    """``resemblyzer/pretrained.pt`` of the installed wheel, found without importing the package."""
    from ..io import installed_file

    path = installed_file("resemblyzer", "pretrained.pt")
    if path is None:
        raise FileNotFoundError("the speaker encoder's weights ship in the resemblyzer wheel: "
                                "pip install --no-deps resemblyzer==0.1.4 (its declared 'typing' backport must not "
                                "be installed on Python 3), or give a transformers x-vector model")
    return path


class GE2E:
    """Resemblyzer's GE2E encoder, run as ``VoiceEncoder.embed_utterance`` runs it (see the module docstring)."""

    dim = 256

    def __init__(self, device: str = "cpu", weights: str | Path | None = None):
        import torch

        from ..io import sha256_file

        path = Path(weights) if weights else resemblyzer_weights()
        state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
        self.lstm = torch.nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = torch.nn.Linear(256, self.dim)
        self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
        self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        self.lstm.to(device).eval()
        self.linear.to(device).eval()
        self.device = device
        self.spec = {"encoder": "resemblyzer-ge2e", "sha256": sha256_file(path)}

    @staticmethod
    def partial_slices(n_samples: int, rate: float = 1.3, min_coverage: float = 0.75) -> tuple[list, list]:
        """Resemblyzer's ``compute_partial_slices``: (waveform slices, mel slices) of the partial utterances."""
        per_frame = SAMPLE_RATE * HOP_MS // 1000
        n_frames = int(np.ceil((n_samples + 1) / per_frame))
        step = int(np.round((SAMPLE_RATE / rate) / per_frame))
        wav_slices, mel_slices = [], []
        for i in range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step):
            mel_slices.append(slice(i, i + PARTIAL_FRAMES))
            wav_slices.append(slice(i * per_frame, (i + PARTIAL_FRAMES) * per_frame))
        last = wav_slices[-1]
        if (n_samples - last.start) / (last.stop - last.start) < min_coverage and len(mel_slices) > 1:
            wav_slices, mel_slices = wav_slices[:-1], mel_slices[:-1]
        return wav_slices, mel_slices

    def partials(self, wav: np.ndarray) -> np.ndarray:
        """(partials, 256) L2-normed embeddings of an utterance's partial utterances."""
        import librosa
        import torch

        wav = np.asarray(wav, dtype=np.float32)
        wav_slices, mel_slices = self.partial_slices(len(wav))
        if wav_slices[-1].stop >= len(wav):
            wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)))
        mel = librosa.feature.melspectrogram(y=wav, sr=SAMPLE_RATE, n_fft=SAMPLE_RATE * WINDOW_MS // 1000,
                                             hop_length=SAMPLE_RATE * HOP_MS // 1000, n_mels=N_MELS)
        mel = mel.astype(np.float32).T
        mels = torch.from_numpy(np.array([mel[s] for s in mel_slices])).to(self.device)
        with torch.inference_mode():
            _, (hidden, _) = self.lstm(mels)
            raw = torch.relu(self.linear(hidden[-1]))
            return (raw / torch.norm(raw, dim=1, keepdim=True)).cpu().numpy()

    def embed(self, wav: np.ndarray) -> np.ndarray:
        raw = self.partials(wav).mean(axis=0)
        return (raw / np.linalg.norm(raw)).astype(np.float32)


class XVector:
    """A transformers audio x-vector model (``AutoModelForAudioXVector``: WavLM, wav2vec2, UniSpeech-SAT for
    x-vectors), from a folder or a hub id; ``embed`` gives its L2-normed embedding."""

    def __init__(self, model: str | Path, device: str = "cpu"):
        import transformers

        from ..checkpoints import load_pretrained

        try:
            self.extractor = transformers.AutoFeatureExtractor.from_pretrained(str(model))
        except Exception as e:  # noqa: BLE001  a folder without a usable preprocessor_config.json
            raise ValueError(f"{model}: no feature extractor for an x-vector model ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]})") from None
        self.model = load_pretrained(transformers.AutoModelForAudioXVector, str(model), "x-vector model").eval().to(device)
        self.device, self.dim = device, int(self.model.config.xvector_output_dim)
        self.spec = {"encoder": "x-vector", "model": str(model), "model_type": self.model.config.model_type}

    def embed(self, wav: np.ndarray) -> np.ndarray:
        import torch

        inputs = self.extractor(np.asarray(wav, np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs).embeddings[0].float().cpu().numpy()
        return (out / np.linalg.norm(out)).astype(np.float32)


def load_speaker_encoder(name: str | None = "resemblyzer", device: str = "cpu"):
    """``resemblyzer`` (the default, in its wheel) or a transformers x-vector model folder or hub id."""
    if not name or name in ("resemblyzer", "ge2e"):
        return GE2E(device)
    return XVector(name, device)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def cluster_speakers(embeddings: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    """A speaker label 0, 1, … per embedding (row): average-linkage clustering on cosine distance cut at
    ``threshold``, labels numbered by first appearance."""
    from scipy.cluster.hierarchy import fcluster, linkage

    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(embeddings) < 2:
        return np.zeros(len(embeddings), dtype=np.int64)
    raw = fcluster(linkage(embeddings, method="average", metric="cosine"), t=threshold, criterion="distance")
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(c), len(order)) for c in raw], dtype=np.int64)
