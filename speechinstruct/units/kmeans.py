"""Discrete units: a k-means quantizer and the repeat merger (SpeechGPT's unit string: ``speechgpt.to_text``).

``load_kmeans`` reads this project's ``cluster`` output (a folder with ``centroids.npy`` and
``kmeans.json``), a bare ``.npy`` of centroids, or a fairseq/SpeechGPT ``*_km1000.bin`` (a joblib pickle
of scikit-learn's MiniBatchKMeans, read with a restricted unpickler). Assignment is the nearest centroid
in squared Euclidean distance, as scikit-learn's ``predict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..io import read_json, sha256_file


class KMeans:
    """Nearest-centroid assignment: FAISS's search on the CPU, torch's matrix products on a GPU; on both, a frame's
    two nearest centroids by that search are compared again by the distance itself where the search's rounding
    could have put them in the wrong order, so that both give the nearest, the same labels."""

    def __init__(self, centroids: np.ndarray, source: str = "", meta: dict | None = None):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"{source}: centroids must be a (k, dim) array, got shape {centroids.shape}")
        bad = ~np.isfinite(centroids).all(1)
        if bad.any():  # FAISS would assign every frame to -1
            first = int(np.argmax(bad))
            word = "NaN" if np.isnan(centroids[first]).any() else "infinite"
            raise ValueError(f"{source}: centroid {first} holds {word} values ({int(bad.sum())} of {len(bad)} centroids "
                             "do): not a usable k-means")
        self.centroids = centroids
        self.k, self.dim = centroids.shape
        self.source = source
        self.meta = meta or {}
        import faiss  # here, not at module import: validate and --help never need it

        self._index = faiss.IndexFlatL2(self.dim)
        self._index.add(centroids)
        self._c_norms = np.square(centroids).sum(1)

        self.device = "cpu"  # where assign runs: FAISS on the CPU, torch's matrix products elsewhere (to())
        self._torch = None

    def __reduce__(self):  # the FAISS index is rebuilt from the centroids (the Ray engine ships k-means)
        return (KMeans, (self.centroids, self.source, self.meta))

    def to(self, device: str) -> "KMeans":
        """Assign on ``device``: ``cpu`` is FAISS's search; any other torch device (a GPU) computes the same
        nearest centroids as chunked matrix products there (``torch`` forces that path on the CPU, for tests)."""
        import torch

        self.device = device
        self._torch = None if device == "cpu" else torch.from_numpy(self.centroids).to("cpu" if device == "torch" else device)
        return self

    def assign(self, feats: np.ndarray) -> np.ndarray:
        feats = np.ascontiguousarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(
                f"{self.source}: k-means expects {self.dim}-dim features, got shape {feats.shape} "
                "(features and k-means come from different extractors or layers)"
            )
        if feats.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        if self._torch is not None:
            import torch

            if not feats.flags.writeable:  # frames from a feature file's memory map: torch warns, though only reading
                feats = feats.copy()
            return self.labels(torch.from_numpy(feats).to(self._torch.device)).cpu().numpy().astype(np.int64)
        if self.k == 1:
            return np.where(np.isfinite(feats).all(1), 0, -1).astype(np.int64)
        near, two = self._index.search(feats, 2)  # -1 for a frame that is not finite
        labels = two[:, 0].astype(np.int64)
        with np.errstate(invalid="ignore", over="ignore"):  # rows of NaN: never close (labels -1)
            close = np.flatnonzero(near[:, 1] - near[:, 0] <= _rounding(np.square(feats).sum(1), self._c_norms, self.dim))
        if close.size:
            labels[close] = _closer(feats[close], self.centroids, two[close])
        return labels

    def labels(self, x):
        """The nearest centroid of each row of ``x``, a float32 torch tensor on the device :meth:`to` chose (a GPU):
        :meth:`assign` without the copies, for frames still on the device (extract's fused units path); -1 for a
        frame that is not finite, as FAISS's search says (argmin over NaN distances would say 0)."""
        import torch

        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 distances, whatever runs around it
            labels = nearest_centroids(x, (x * x).sum(1), self._torch, exact=True)
        return labels.masked_fill_(~torch.isfinite(x).all(1), -1)

    def inertia(self, feats: np.ndarray) -> float:
        distances, _ = self._index.search(np.ascontiguousarray(feats, dtype=np.float32), 1)
        return float(distances.sum())


def nearest_centroids(x, norms, centroids, chunk: int = 65536, exact: bool = False):
    """The index of each row of ``x`` (torch, any device; ``norms``: its squared norms) nearest to a row of
    ``centroids``: ``|x|² - 2x·c + |c|²``, ``chunk`` rows at a time. That sum rounds off a float32 error of the
    size of ``|x|²``, far more than the gap between two nearly equidistant centroids, so that two devices (or
    FAISS and torch) can choose differently; ``exact``: the two nearest by it are compared again by their
    distance itself (:func:`_closer`), as :meth:`KMeans.assign` does with FAISS's two nearest, so that both
    choose the same centroid (k-means fitting, which does not need it, leaves it off)."""
    import torch

    c_norms = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    caller = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a caller's TF32 or bfloat16 products would swamp the distances
    try:
        for start in range(0, x.shape[0], chunk):
            part = x[start: start + chunk]
            distances = norms[start: start + chunk, None] - 2 * part @ centroids.T + c_norms[None]
            if exact and centroids.shape[0] > 1:
                near, two = distances.topk(2, dim=1, largest=False)
                labels = two[:, 0].clone()
                close = torch.nonzero(near[:, 1] - near[:, 0] <= _rounding(norms[start: start + chunk], c_norms, x.shape[1]))
                if close.numel():
                    close = close.flatten()
                    labels[close] = _closer(part[close], centroids, two[close])
                out[start: start + chunk] = labels
            else:
                out[start: start + chunk] = distances.argmin(1)
    finally:
        torch.set_float32_matmul_precision(caller)
    return out


def _rounding(norms, c_norms, dim: int):
    """Twice the most float32 rounding that ``|x|² - 2x·c + |c|²`` can carry for rows of squared norms ``norms`` and
    centroids of squared norms ``c_norms`` (numpy or torch): (dim + 2) units of the last place of (|x| + |c|)². Two
    centroids whose distances by it differ by more are in the right order whatever the rounding."""
    return 2 * (dim + 2) * 2.0 ** -24 * (norms ** 0.5 + c_norms.max() ** 0.5) ** 2


def _closer(x, centroids, two):
    """Of each row's two candidate centroids (``two``: (n, 2) indices), the nearer by their squared distances (the
    lower index when they are equally near), for numpy arrays or torch tensors alike: each float32 difference and
    its square are correctly rounded on any device, and their sum is taken in float64, so that its rounding (about
    1e-16 of the distance) is the only thing the device's order of summation changes."""
    if isinstance(x, np.ndarray):
        a, b = (np.square(x - centroids[two[:, j]]).sum(1, dtype=np.float64) for j in (0, 1))
        low = np.minimum(two[:, 0], two[:, 1])
        return np.where(a < b, two[:, 0], np.where(b < a, two[:, 1], low)).astype(np.int64)
    import torch

    a, b = ((x - centroids[two[:, j]]).square().sum(1, dtype=torch.float64) for j in (0, 1))
    return torch.where(a < b, two[:, 0], torch.where(b < a, two[:, 1], torch.minimum(two[:, 0], two[:, 1])))


def load_kmeans(path: str | Path) -> KMeans:
    path = Path(path)
    if path.name == "kmeans.json" and (path.parent / "centroids.npy").is_file():
        path = path.parent  # cluster's description of its output: the folder it describes is meant
    if path.is_dir():
        centroids_path, meta_path = path / "centroids.npy", path / "kmeans.json"
        if not centroids_path.is_file():
            raise FileNotFoundError(f"{path}: no centroids.npy (not a `speechinstruct cluster` output)")
        meta = read_json(meta_path, dict, "; cluster again") if meta_path.is_file() else {}
        return KMeans(np.load(centroids_path, allow_pickle=False), str(path), meta)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such k-means file or folder")
    if path.suffix == ".npy":
        return KMeans(np.load(path, allow_pickle=False), str(path), {"format": "npy", "sha256": sha256_file(path)})
    from ..checkpoints import Stub, joblib_load_restricted  # torch: only when a fairseq k-means file is read

    model = joblib_load_restricted(path)
    state = model.state if isinstance(model, Stub) else None
    if not isinstance(state, dict) or "cluster_centers_" not in state:
        raise ValueError(f"{path}: the pickle holds no fitted k-means (no cluster_centers_)")
    meta = {"format": "sklearn-joblib", "class": type(model).__name__, "sklearn_version": state.get("_sklearn_version"),
            "sha256": sha256_file(path)}
    return KMeans(np.asarray(state["cluster_centers_"]), str(path), meta)


def dedup(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive repeats: 5 5 5 9 9 2 → units 5 9 2, durations 3 2 1."""
    units = np.asarray(units)
    if units.size == 0:
        return units.astype(np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate([[True], units[1:] != units[:-1]]))
    durations = np.diff(np.concatenate([starts, [units.size]]))
    return units[starts].astype(np.int64), durations.astype(np.int64)


class Encoded(NamedTuple):
    units: np.ndarray      # repeats merged (unless the encoder keeps them)
    durations: np.ndarray  # frames per unit
    n_frames: int


class SpeechEncoder:
    """Speech → units in textlesslib's ``SpeechEncoder`` shape: a dense model (``extractor``: MFCC or HuBERT),
    a quantizer (``kmeans``), then consecutive repeats merged (``deduplicate``). ``encode`` runs all three on
    a waveform; ``quantize`` the last two on features computed elsewhere (batched extraction, feature files);
    ``merge`` the last one on unit labels. Extract, quantize, compose and chat all go through it."""

    codebooks = 1  # one unit per frame

    def __init__(self, kmeans: KMeans, extractor=None, deduplicate: bool = True):
        self.kmeans, self.extractor, self.deduplicate = kmeans, extractor, deduplicate

    # the tokenizer's face, as a codec has it (tokenizer.py)
    @property
    def sample_rate(self) -> int:
        from ..audio import sample_rate_of  # here: reading the units module loads no audio library

        return sample_rate_of(self.extractor)

    @property
    def frame_rate(self) -> float:
        return self.extractor.frame_rate

    def vocabulary(self):
        from ..shardfiles import kmeans_vocabulary

        return kmeans_vocabulary(self.extractor.spec, self.kmeans.k, self.kmeans.meta.get("sha256"))

    def describe(self) -> dict:
        """What makes the units, for a compose summary: the dense model, the k-means and the vocabulary."""
        from ..shardfiles import kmeans_spec

        return {"extractor": {k: v for k, v in self.extractor.spec.items() if k != "checkpoint"},
                "kmeans": kmeans_spec(self.kmeans), "vocabulary": self.vocabulary().to_json()}

    def encode(self, wav: np.ndarray, sample_rate: int = 16000) -> Encoded:
        if self.extractor is None:
            raise ValueError("this SpeechEncoder has no extractor: it can only quantize features")
        return self.quantize(self.extractor.features(wav, sample_rate))

    def quantize(self, feats: np.ndarray) -> Encoded:
        return self.merge(self.kmeans.assign(feats))

    def merge(self, labels: np.ndarray) -> Encoded:
        labels = np.asarray(labels, dtype=np.int64)
        if self.deduplicate:
            return Encoded(*dedup(labels), int(labels.size))
        return Encoded(labels, np.ones(labels.size, dtype=np.int64), int(labels.size))
