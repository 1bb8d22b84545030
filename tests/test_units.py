
import joblib
import numpy as np
import pytest
from sklearn.cluster import MiniBatchKMeans

from speechinstruct.units import cluster
from speechinstruct import units
from speechinstruct.checkpoints import UnsafeCheckpointError


def blobs(n_per=200, k=5, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 20, size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    return (centers[labels] + rng.normal(0, 1, size=(labels.size, dim))).astype(np.float32), labels, centers


def test_faiss_kmeans_recovers_separated_clusters():
    x, labels, _ = blobs()
    km = units.KMeans(cluster.fit(x, 5, seed=0, nredo=5))  # random starts need restarts on a few far-apart blobs
    got = km.assign(x)
    # every true cluster maps to exactly one unit and vice versa
    pairs = set(zip(labels.tolist(), got.tolist()))
    assert len(pairs) == 5 and len({g for _, g in pairs}) == 5


def test_fit_is_seeded():
    x, _, _ = blobs(seed=1)
    np.testing.assert_array_equal(cluster.fit(x, 4, seed=3), cluster.fit(x, 4, seed=3))
    # the seed is used: other seeds start from other samples, so the centroids come out otherwise (in order at least)
    assert any(not np.array_equal(cluster.fit(x, 4, seed=3), cluster.fit(x, 4, seed=s)) for s in (4, 5, 6))


def test_fairseq_joblib_kmeans_matches_sklearn(tmp_path):
    x, _, _ = blobs(k=6, dim=12, seed=2)
    # fairseq learn_kmeans.py settings (smaller batch for the tiny sample)
    km = MiniBatchKMeans(n_clusters=6, init="k-means++", max_iter=100, batch_size=256, tol=0.0,
                         max_no_improvement=100, n_init=3, reassignment_ratio=0.0, random_state=0).fit(x)
    joblib.dump(km, tmp_path / "km6.bin")
    loaded = units.load_kmeans(tmp_path / "km6.bin")
    assert (loaded.k, loaded.dim) == (6, 12)
    probe = np.random.default_rng(5).normal(0, 15, size=(2000, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded.assign(probe), km.predict(probe))
    np.testing.assert_array_equal(loaded.assign(x), km.predict(x))


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_malicious_joblib_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    joblib.dump({"cluster_centers_": Exploit()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"evil.bin: refused to load.*system"):
        units.load_kmeans(tmp_path / "evil.bin")
    obj = np.array([Exploit()], dtype=object)
    joblib.dump(obj, tmp_path / "evil2.bin")
    with pytest.raises(UnsafeCheckpointError, match="evil2.bin"):
        units.load_kmeans(tmp_path / "evil2.bin")
    assert not (tmp_path / "pwned").exists()


def test_kmeans_json_of_a_cluster_folder_reads_the_folder(tmp_path):
    """`cluster` writes kmeans.json beside centroids.npy; a user passing that file (tab completion stops there)
    got "not an uncompressed joblib/pickle file". The intent is plain: the folder it describes is read."""
    x, _, _ = blobs(k=4, dim=6, seed=3)
    folder = tmp_path / "km"
    folder.mkdir()
    np.save(folder / "centroids.npy", cluster.fit(x, 4, seed=0))
    (folder / "kmeans.json").write_text('{"k": 4, "seed": 0}')
    by_file, by_folder = units.load_kmeans(folder / "kmeans.json"), units.load_kmeans(folder)
    assert (by_file.source, by_file.meta) == (by_folder.source, by_folder.meta)
    np.testing.assert_array_equal(by_file.centroids, by_folder.centroids)
    (tmp_path / "other.json").write_text("{}")  # any other JSON file is still refused, naming it
    with pytest.raises(ValueError, match="other.json: not"):
        units.load_kmeans(tmp_path / "other.json")


def test_garbage_kmeans_file_is_clear(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"hello")
    with pytest.raises(ValueError, match="junk.bin: not"):
        units.load_kmeans(tmp_path / "junk.bin")


def test_kmeans_with_nan_or_infinite_centroids_is_refused(tmp_path):
    """A centroids file holding NaN (a fit that diverged, a file written by hand) is one line naming it: FAISS
    assigned every frame to -1 and quantize stopped on numpy's "'list' argument must have no negative elements"."""
    for value, word in ((np.nan, "NaN"), (np.inf, "infinite")):
        centroids = np.zeros((4, 3), np.float32)
        centroids[2, 1] = value
        np.save(tmp_path / "km.npy", centroids)
        with pytest.raises(ValueError, match=rf"km.npy: centroid 2 holds {word} values"):
            units.load_kmeans(tmp_path / "km.npy")


def test_faiss_and_torch_choose_the_nearest_of_two_nearly_equidistant_centroids():
    """|x|² - 2x·c + |c|² rounds off a float32 error of the size of |x|²: with frames far from the origin and two
    centroids nearly equally near, FAISS's search and torch's matrix products each chose either one, and the fused
    units path's labels differed from quantize's (seen on a random HuBERT: distances 0.287909 and 0.287904). Both
    now compare the two nearest again by the distance itself: the true nearest (float64), the same on both."""
    rng = np.random.default_rng(0)
    dim, n = 64, 4000
    offset = np.full(dim, 300.0)  # |x|² near 6e6: the expansion's rounding is about 0.5, the gaps below 1e-2
    base = rng.normal(size=(n, dim))
    step = rng.normal(size=(n, dim))
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    centroids = np.concatenate([offset + rng.normal(size=(6, dim))]).astype(np.float32)
    # each frame on the bisecting plane of centroids 0 and 1, moved off it by a tiny distance
    mid, normal = (centroids[0] + centroids[1]) / 2, centroids[1] - centroids[0]
    normal /= np.linalg.norm(normal)
    frames = mid + base * 0.3 - ((base * 0.3) @ normal)[:, None] * normal + rng.uniform(-3e-3, 3e-3, (n, 1)) * normal
    frames = frames.astype(np.float32)
    truth = ((frames.astype(np.float64)[:, None] - centroids.astype(np.float64)[None]) ** 2).sum(-1).argmin(1)
    assert set(truth) == {0, 1}
    on_host = units.KMeans(centroids, source="km.npy")
    on_device = units.KMeans(centroids, source="km.npy").to("torch")
    np.testing.assert_array_equal(on_host.assign(frames), truth)
    np.testing.assert_array_equal(on_device.assign(frames), truth)
    import torch

    before = torch.get_float32_matmul_precision()
    try:  # a caller that lets torch multiply float32 matrices in TF32 or bfloat16 (a training script) gets them too
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            np.testing.assert_array_equal(on_device.assign(frames), truth)
            np.testing.assert_array_equal(on_device.assign(frames[::7] * 0.01), on_host.assign(frames[::7] * 0.01))
    finally:
        torch.set_float32_matmul_precision(before)
    nan = frames[:3].copy()
    nan[1, 5] = np.nan
    assert on_host.assign(nan)[1] == on_device.assign(nan)[1] == -1  # not finite: -1, as FAISS says
    assert units.KMeans(centroids[:1]).assign(nan).tolist() == [0, -1, 0]  # one centroid: nothing to compare


def test_wrong_dimension_fails_fast():
    km = units.KMeans(np.zeros((3, 4), np.float32), source="km.npy")
    with pytest.raises(ValueError, match="km.npy: k-means expects 4-dim features, got shape \\(10, 39\\)"):
        km.assign(np.zeros((10, 39), np.float32))


def test_dedup_and_unit_text():
    u, d = units.dedup(np.array([5, 5, 5, 9, 9, 2]))
    assert u.tolist() == [5, 9, 2] and d.tolist() == [3, 2, 1]
    assert units.to_text([661, 588, 604]) == "<sosp><661><588><604><eosp>"
    assert units.from_text("<sosp><661><588><604><eosp>") == [661, 588, 604]
    assert units.from_text(units.to_text([])) == [] and units.to_text([]) == "<sosp><eosp>"
    for bad in ["<sosp>", "<sosp><eosp><eosp>", "<661><eosp>", "<sosp><6 61><eosp>", "<sosp><1>x<eosp>"]:
        with pytest.raises(ValueError):
            units.from_text(bad)


def test_torch_kmeans_matches_faiss_on_held_out_frames():
    """The k-means that runs on a GPU when FAISS has none (torch; here on the CPU, the same code): on MFCC frames
    of generated speech, K=50, its held-out inertia is within 1 % of FAISS's on the same sample."""
    import torch

    from conftest import speechlike
    from speechinstruct.units.features import MFCC

    torch.set_num_threads(2)
    mfcc = MFCC()
    frames = np.concatenate([mfcc.features(speechlike(2.0, seed=s)) for s in range(60)]).astype(np.float32)
    rng = np.random.default_rng(0)
    rng.shuffle(frames)
    train, held = frames[:9000], frames[9000:]
    ours = units.KMeans(cluster.fit(train, 50, seed=0, engine="torch", device="cpu")).inertia(held)
    faiss_ = units.KMeans(cluster.fit(train, 50, seed=0, engine="faiss")).inertia(held)
    assert ours <= 1.01 * faiss_, (ours, faiss_)
    np.testing.assert_array_equal(cluster.fit(train, 50, seed=0, engine="torch", device="cpu"),
                                  cluster.fit(train, 50, seed=0, engine="torch", device="cpu"))  # seeded


def test_torch_kmeans_refills_empty_clusters():
    """Ten distinct points asked for 20 clusters: clusters go empty on the first round and are refilled by
    splitting others, so every centroid is finite and each distinct point sits (within the split's nudge) on one."""
    points = np.repeat(np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32), 10, axis=0)
    centroids = cluster.fit_torch(points, 20, seed=0, niter=10, device="cpu")
    assert centroids.shape == (20, 4) and np.isfinite(centroids).all() and len(np.unique(centroids, axis=0)) == 20
    assert units.KMeans(centroids).inertia(points) < 1e-3 * units.KMeans(points.mean(0, keepdims=True)).inertia(points)


def test_assignment_on_a_torch_device_equals_faiss():
    """quantize and extract --kmeans assign with torch on a GPU: the same nearest centroids as FAISS's exact
    search (run here through the torch path on the CPU)."""
    x, _, _ = blobs(k=6, dim=12, seed=4)
    centroids = cluster.fit(x, 6, seed=0)
    faiss_labels = units.KMeans(centroids).assign(x)
    torch_labels = units.KMeans(centroids).to("torch").assign(x)
    np.testing.assert_array_equal(torch_labels, faiss_labels)


def _feature_folder(folder, files=3, batches=4, per_batch=(30, 50), dim=16, float16=False, seed=0, nan=False):
    """Feature files as extract writes them: several record batches each (extract flushes every 256 utterances);
    returns every frame in file order, as float32. ``nan``: one frame of every utterance is NaN."""
    import pyarrow as pa

    from speechinstruct.shardfiles import feature_schema, features_array

    folder.mkdir(parents=True, exist_ok=True)
    rng, schema, every = np.random.default_rng(seed), feature_schema(dim, float16), []
    for f in range(files):
        with pa.OSFile(str(folder / f"features-{f:05d}.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for b in range(batches):
                feats = [rng.normal(size=(int(n), dim)).astype(np.float16 if float16 else np.float32)
                         for n in rng.integers(*per_batch, size=20)]
                for f in feats if nan else []:
                    f[len(f) // 2] = np.nan
                every += [x.astype(np.float32) for x in feats]
                w.write_batch(pa.record_batch([pa.array([f"{f}-{b}-{i}" for i in range(len(feats))]),
                                               features_array(feats, dim, float16)], schema=schema))
    return np.concatenate(every)


@pytest.mark.parametrize("float16", [False, True])
def test_cluster_reads_only_the_frames_it_samples(tmp_path, float16):
    """cluster's sample is drawn uniformly from every frame of every file, but only the sampled frames are read:
    the feature files stay memory-mapped (at SpeechGPT's scale they hold hundreds of GB; reading them whole to
    sample 1M frames held all of them in memory: 3.2 GB of peak RSS for a 61 MB sample of 2.4 GB of features).
    The sample is the one drawn before: the seeded choice of frame numbers over the files in order."""
    import subprocess
    import sys

    every = _feature_folder(tmp_path / "feat", float16=float16)
    got = cluster.sample_frames(tmp_path / "feat", 200, seed=3)
    chosen = np.sort(np.random.default_rng(3).choice(len(every), size=200, replace=False))
    np.testing.assert_array_equal(got, every[chosen])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(cluster.sample_frames(tmp_path / "feat", 10**9), every)  # all of them, in order
    # the bytes Arrow allocates while sampling (its pool's peak, in a fresh process): none of the files' frames
    code = (f"import pyarrow as pa; from speechinstruct.units.cluster import sample_frames; "
            f"sample_frames({str(tmp_path / 'feat')!r}, 200); print(pa.default_memory_pool().max_memory())")
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert peak < every.nbytes // (2 if float16 else 1) // 20, (peak, every.nbytes)


def test_cluster_names_a_feature_file_of_other_dimensions(tmp_path):
    """A folder holding feature files of two extractors (a 32-dim file among 16-dim ones) is one line naming that
    file, not numpy's concatenation error."""
    _feature_folder(tmp_path / "feat", files=2, dim=16)
    _feature_folder(tmp_path / "other", files=1, dim=32)
    (tmp_path / "other" / "features-00000.arrow").rename(tmp_path / "feat" / "features-00002.arrow")
    with pytest.raises(ValueError, match=r"features-00002.arrow: 32-dim frames, but .*features-00000.arrow"):
        cluster.sample_frames(tmp_path / "feat", 10**6)


def test_an_arrow_file_that_is_not_a_feature_file_is_named(tmp_path):
    """An Arrow file without extract's ``features`` column of frames, under a feature file's name, is one line
    naming it in cluster and quantize's reader (it was Arrow's "Column features does not exist in schema")."""
    import pyarrow as pa

    from speechinstruct.shardfiles import iter_features

    _feature_folder(tmp_path / "feat", files=1, dim=16)
    for name, table in (("features-00001.arrow", pa.table({"id": ["a"], "x": [[1.0, 2.0]]})),
                        ("features-00002.arrow", pa.table({"id": ["a"], "features": [[1.0, 2.0]]}))):
        with pa.OSFile(str(tmp_path / "feat" / name), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        with pytest.raises(ValueError, match=rf"{name}: not a feature file \(no 'features' column of frames"):
            cluster.sample_frames(tmp_path / "feat", 100)
        with pytest.raises(ValueError, match=rf"{name}: not a feature file"):
            list(iter_features(tmp_path / "feat" / name))
        (tmp_path / "feat" / name).unlink()


def test_frames_that_are_not_finite_get_no_unit_on_either_device():
    """A frame holding NaN or inf (a model that overflowed in low precision) is nearest to no centroid: FAISS's
    search says -1, and the torch path (a GPU's) said 0, a unit like any other."""
    km = units.KMeans(np.eye(3, dtype=np.float32))
    x = np.array([[1, 0, 0], [np.nan, 0, 0], [np.inf, 0, 0], [0, -np.inf, 1], [0, 0, 1]], np.float32)
    for where in ("cpu", "torch"):
        np.testing.assert_array_equal(km.to(where).assign(x), [0, -1, -1, -1, 2])


def test_cluster_names_a_feature_file_with_frames_that_are_not_finite(tmp_path):
    """NaN frames in the sample would give NaN centroids (which quantize then refuses): cluster names the file."""
    _feature_folder(tmp_path / "feat", files=2, dim=8)
    _feature_folder(tmp_path / "nan", files=1, dim=8, seed=1, nan=True)
    (tmp_path / "nan" / "features-00000.arrow").rename(tmp_path / "feat" / "features-00002.arrow")
    with pytest.raises(ValueError, match=r"features-00002.arrow: frames hold NaN or infinite values"):
        cluster.sample_frames(tmp_path / "feat", 10**6)


def test_kmeans_that_runs_out_of_gpu_memory_is_fitted_by_faiss_on_the_cpu(tmp_path, monkeypatch):
    """`cluster` on a GPU (torch's k-means) whose memory cannot hold the sample and its distances raised torch's
    OutOfMemoryError: a traceback, no k-means (issue 38, item 6: out of memory is never a crash). FAISS fits it on
    the CPU instead, said on stderr and in kmeans.json; the centroids are FAISS's own for that sample."""
    import json

    import torch
    from typer.testing import CliRunner

    from speechinstruct.cli import app

    _feature_folder(tmp_path / "features")

    def out_of_memory(sample, *args, **kwargs):
        torch.empty(len(sample), 8)  # what fitted before the distances did not
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.93 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.05 GiB is free.\nIf reserved but unallocated memory is large…")

    monkeypatch.setattr(cluster, "engine_for", lambda gpu=None: "torch")
    monkeypatch.setattr(cluster, "fit_torch", out_of_memory)
    result = CliRunner().invoke(app, ["cluster", str(tmp_path / "features"), str(tmp_path / "km"), "--k", "8"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "warning: k-means on the GPU ran out of memory with 9,369 frames of 16 (CUDA out of memory. Tried to " \
           "allocate 2.93 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.05 GiB is free.): FAISS on the CPU " \
           "instead" in result.stderr, result.stderr
    meta = json.loads((tmp_path / "km" / "kmeans.json").read_text())
    assert meta["engine"] == "faiss" and meta["gpu_out_of_memory"].startswith("CUDA out of memory. Tried to allocate")
    sample = cluster.sample_frames(tmp_path / "features", meta["sample_frames"], meta["seed"])
    np.testing.assert_array_equal(np.load(tmp_path / "km" / "centroids.npy"), cluster.fit(sample, 8, seed=meta["seed"],
                                                                                          engine="faiss"))
