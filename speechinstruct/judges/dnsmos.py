"""DNSMOS (P.835 SIG, BAK, OVRL and P.808): Microsoft's networks as the ``speechmos`` wheel ships them, run
with onnxruntime on the CPU or, as ONNX graphs run by torch (``onnx_graph``), on any device torch has. The scores
are speechmos's ``dnsmos.run(wav, 16000)``: the same tiling, windows and polynomials, quirks kept (see
:func:`dnsmos_windows`); the work is batched over the windows of many clips and the sessions and mel filterbank
are built once.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterator

import numpy as np

from ..audio import AudioError
from ..io import sha256_file
from . import ScoreError


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

        from ..threads import available_cpus

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
        """(n, 4) per window with torch, ``batch_windows`` at a time, halved while a batch runs out of memory (and
        ``batch_windows`` then becomes what fitted)."""
        from ..memory import batches

        out, self.batch_windows = batches(self._torch_batch, list(windows), self.batch_windows, self.counts)
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
