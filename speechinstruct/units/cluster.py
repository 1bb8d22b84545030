"""``speechinstruct cluster``: FAISS k-means on a seeded random sample of feature frames.

Saves ``centroids.npy`` (k × dim float32) and ``kmeans.json`` (features spec, k, inertia on the sample,
sample size, seed, iterations, centroid hash) in the output folder.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

import faiss
import numpy as np

from .. import recipe as settings
from ..io import atomic_path, claim_outputs, write_json, wrote_before
from ..memory import attempt
from ..shardfiles import feature_dim, feature_files, frame_blocks, read_spec
from .kmeans import KMeans, nearest_centroids

log = logging.getLogger(__name__)


def sample_frames(features: str | Path, max_frames: int, seed: int = 0) -> np.ndarray:
    """Up to ``max_frames`` frames drawn uniformly without replacement from every feature file: the files are
    counted first, then only the drawn frames are read from their memory maps (memory holds the sample, not
    the features: 2.4 GB of HuBERT frames, a sample of 20,000: peak RSS 3.2 GB when every file was read whole)."""
    paths = feature_files(features)
    dims = [feature_dim(path) for path in paths]
    for path, dim in zip(paths, dims):
        if dim != dims[0]:
            raise ValueError(f"{path}: {dim}-dim frames, but {paths[0]}: {dims[0]}-dim (feature files of different "
                             "extractors or layers in one folder)")
    sizes = [sum(len(flat) for _, _, flat in frame_blocks(path)) for path in paths]
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"{features}: feature files hold no frames")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(max_frames, total), replace=False))
    out, start = [], 0
    for path, size in zip(paths, sizes):
        if np.searchsorted(chosen, start) == np.searchsorted(chosen, start + size):  # none drawn here
            start += size
            continue
        for _, _, flat in frame_blocks(path):
            local = chosen[np.searchsorted(chosen, start) : np.searchsorted(chosen, start + len(flat))] - start
            if local.size:
                out.append(flat[local].astype(np.float32))
                if not np.isfinite(out[-1]).all():  # FAISS would fit NaN centroids
                    raise ValueError(f"{path}: frames hold NaN or infinite values (the model overflowed?); extract "
                                     "it again")
            start += len(flat)
    return np.concatenate(out)


def engine_for(gpu: bool | None = None) -> str:
    """Which k-means runs: FAISS (its GPU build where installed, else its CPU build), or torch on a GPU when torch
    sees one and FAISS has no GPU (faiss-cpu is what installs by default)."""
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu is False or faiss_gpus > 0:
        return "faiss"
    import torch

    return "torch" if torch.cuda.is_available() else "faiss"


def fit_torch(sample: np.ndarray, k: int, seed: int = 0, niter: int = 25, device: str = "cuda",
              chunk: int = 65536) -> np.ndarray:
    """Lloyd's k-means in torch: k-means++ to start, then as FAISS runs it, ``niter`` rounds of
    nearest-centroid assignment (``|x|² - 2x·c + |c|²`` in chunks of ``chunk`` points) and means; an empty cluster
    takes half of a large one (FAISS's split: a cluster drawn by size, its centroid copied and both moved apart by
    a relative 1/1024). On a GPU the assignments are matrix products; on the CPU the same code runs (tested)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(device)
    generator = torch.Generator(device=x.device).manual_seed(seed)  # draws where the points are: no copies back
    norms = (x * x).sum(1)
    centroids = _kmeans_plus_plus(x, norms, k, generator)
    for _ in range(niter):
        labels = nearest_centroids(x, norms, centroids, chunk)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        for empty in torch.nonzero(counts == 0).flatten().tolist():  # split a cluster drawn by its size
            donor = int(torch.multinomial(counts.double(), 1, generator=generator))
            centroids[empty] = centroids[donor] * (1 + 1 / 1024)
            centroids[donor] = centroids[donor] * (1 - 1 / 1024)
            counts[empty] = counts[donor] // 2
            counts[donor] -= counts[empty]
    return centroids.float().cpu().numpy()


def _kmeans_plus_plus(x, norms, k: int, generator):
    """k starting centroids by k-means++ (Arthur and Vassilvitskii, 2007): each next one drawn with probability
    proportional to its squared distance from the nearest one chosen so far; one pass over the points each."""
    import torch

    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator, device=x.device))]
    nearest = (norms - 2 * x @ x[chosen[0]] + norms[chosen[0]]).clamp(min=0)
    for _ in range(1, k):
        weights = nearest.double()
        pick = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(n, (1,), generator=generator, device=x.device))
        chosen.append(pick)
        nearest = torch.minimum(nearest, (norms - 2 * x @ x[pick] + norms[pick]).clamp(min=0))
    return x[torch.tensor(chosen, device=x.device)].clone()


def fit(sample: np.ndarray, k: int, seed: int = 0, niter: int = 25, nredo: int = 1, gpu: bool | None = None,
        verbose: bool = False, engine: str | None = None, device: str = "cuda") -> np.ndarray:
    """k-means centroids of ``sample`` (rows are points) with FAISS, seeded and multi-threaded.

    Defaults are FAISS's own (25 iterations, one run): on speech features with hundreds of clusters this
    matches scikit-learn's MiniBatchKMeans with fairseq's settings within about 1 % inertia at over 10×
    the speed (``python -m benchmarks --only kmeans``). FAISS starts from random points, so for a few
    well-separated clusters raise ``nredo`` (best of several runs) to avoid a poor local minimum."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} frames, the sample has {sample.shape[0]}")
    if (engine or engine_for(gpu)) == "torch":  # nredo: the best run by inertia, as FAISS keeps
        runs = [fit_torch(sample, k, seed + r, niter, device) for r in range(nredo)]
        return min(runs, key=lambda c: KMeans(c).inertia(sample)) if nredo > 1 else runs[0]
    if gpu is None:
        gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    km = faiss.Kmeans(sample.shape[1], k, niter=niter, nredo=nredo, seed=seed, gpu=bool(gpu), verbose=verbose,
                      max_points_per_centroid=max(256, sample.shape[0] // k + 1), spherical=False)
    km.train(sample)
    return np.asarray(km.centroids, dtype=np.float32)


def cluster(features: str | Path, out: str | Path, cfg: settings.KMeans | None = None, gpu: bool | None = None) -> dict:
    """Fit k-means on a seeded sample of the feature frames in ``features`` (``cfg``: the recipe's ``kmeans``
    section, its defaults when None); write ``centroids.npy`` and ``kmeans.json`` into ``out``."""
    cfg = cfg or settings.KMeans()
    k, max_frames, seed, niter, nredo = cfg.k, cfg.max_frames, cfg.seed, cfg.niter, cfg.nredo
    features, out = Path(features), Path(out)
    claim_outputs(out, "cluster", r"centroids\.npy|kmeans\.json",
                  wrote_before(out / "kmeans.json", {"k", "dim", "sha256", "sample_frames"}))
    spec = read_spec(features / "features.json", "; extract again") if (features / "features.json").is_file() else {}
    started = time.perf_counter()
    sample = sample_frames(features, max_frames, seed)
    read = time.perf_counter()
    engine = engine_for(gpu)
    fitting = functools.partial(fit, sample, k, seed=seed, niter=niter, nredo=nredo, gpu=gpu, engine=engine)
    centroids, short = attempt(fitting) if engine == "torch" else (fitting(), None)
    if short is not None:  # the GPU could not hold the sample and its distances: FAISS on the CPU holds it
        log.warning("k-means on the GPU ran out of memory with %s frames of %d (%s): FAISS on the CPU instead",
                    f"{len(sample):,}", sample.shape[1], short)
        engine = "faiss"
        centroids = fit(sample, k, seed=seed, niter=niter, nredo=nredo, gpu=False, engine=engine)
    fitted = time.perf_counter()
    inertia = KMeans(centroids).inertia(sample)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "centroids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids, allow_pickle=False)
    meta = {
        "k": k, "dim": int(centroids.shape[1]), "features": {k_: v for k_, v in spec.items() if k_ not in ("manifest", "root")},
        "inertia": inertia, "sample_frames": int(sample.shape[0]), "seed": seed, "niter": niter, "nredo": nredo,
        "sha256": hashlib.sha256(centroids.tobytes()).hexdigest(), "seconds": round(time.perf_counter() - started, 3),
        # where they went: reading the sample from the feature files, and the k-means itself
        "seconds_reading": round(read - started, 3), "seconds_fitting": round(fitted - read, 3),
        **({"engine": "torch"} if engine == "torch" else {}),
        **({"engine": "faiss", "gpu_out_of_memory": short} if short else {}),
    }
    write_json(out / "kmeans.json", meta)
    return meta
