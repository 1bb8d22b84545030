"""``extract --engine ray``: the same job on a Ray cluster (``pip install speechinstruct[ray]``).

One Ray Data pipeline reads every manifest shard still to do, decodes audio in CPU tasks, and runs the
extractor (and, fused, the k-means) in a pool of model actors (``actors``, ``num_gpus_per_actor``) that
start once. Order is preserved, and the driver writes exactly the files the local engine writes, shard by
shard, with the same writer, so outputs of the two engines are interchangeable and resume each other. ``address`` joins an existing
cluster; without it a local Ray runtime starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import audio
from .io import safe_join


def _decode(batch: dict, root: str) -> dict:
    wavs, errors = [], []
    for path, offset, duration in zip(batch["path"], batch["offset"], batch["duration"]):
        try:
            wavs.append(audio.load(safe_join(root, str(path)), float(offset), float(duration)).tobytes())
            errors.append("")
        except (audio.AudioError, ValueError, OSError) as e:
            wavs.append(b"")
            errors.append(str(e))
    return {"id": batch["id"], "wav": np.array(wavs, dtype=object), "error": np.array(errors, dtype=object)}


class _Model:
    """A Ray actor holding the extractor (and k-means): decoded audio in, features or labels out."""

    def __init__(self, kind: str, checkpoint, layer, device: str, kmeans_path, batch_seconds: float):
        from .features import load_extractor
        from .units import load_kmeans

        self.extractor = load_extractor(kind, checkpoint, layer, device)
        self.kmeans = load_kmeans(kmeans_path) if kmeans_path else None
        self.batch_seconds = batch_seconds

    def __call__(self, batch: dict) -> dict:
        from .extract import compute

        decoded = [({"id": i}, e if e else np.frombuffer(w, dtype=np.float32))
                   for i, w, e in zip(batch["id"], batch["wav"], batch["error"])]
        payloads, frames, errors = [], [], []
        for _, value in compute(self.extractor, iter(decoded), self.batch_seconds):
            if isinstance(value, str):
                payloads.append(b"")
                frames.append(0)
                errors.append(value)
                continue
            out = self.kmeans.assign(value) if self.kmeans is not None else value.astype(np.float32)
            payloads.append(out.tobytes())
            frames.append(value.shape[0])
            errors.append("")
        return {"id": batch["id"], "payload": np.array(payloads, dtype=object), "frames": np.array(frames),
                "error": np.array(errors, dtype=object)}


def extract_ray(manifest, out, kind: str, checkpoint=None, layer=None, kmeans_path=None, root=None,
                batch_seconds: float = 100.0, float16: bool = False, actors: int = 2, num_gpus_per_actor: float = 0.0,
                address: str | None = None, num_shards: int = 1, shard_index: int = 0, device: str | None = None,
                rows_per_block: int = 32) -> dict:
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'speechinstruct[ray]'") from None
    from .extract import run_shards, select_shards, shard_output
    from .features import load_extractor
    from .shard import corpus_root, manifest_files
    from .units import load_kmeans

    device = device or ("cuda" if num_gpus_per_actor > 0 else "cpu")
    probe = load_extractor(kind, checkpoint, layer, "cpu")  # for the spec and dimensions; the actors load their own
    kmeans = load_kmeans(kmeans_path) if kmeans_path else None
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if num_gpus_per_actor == 0 and actors >= cpus:
        # CPU actors holding every CPU leave none for reading and decoding: the pipeline would stall.
        print(f"ray: {cpus} CPUs in the cluster; using {max(1, cpus - 1)} model actor(s) instead of {actors}", flush=True)
        actors = max(1, cpus - 1)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False

    # One pipeline over every shard still to do, so the model actors start once; with order preserved,
    # the driver takes each shard's rows off the stream in turn and writes that shard.
    manifest, out = Path(manifest), Path(out)
    root = Path(root) if root else corpus_root(manifest)
    pending = [str(s) for s in select_shards(manifest_files(manifest), num_shards, shard_index)
               if not shard_output(out, s, fused=kmeans is not None).exists()]
    stream = iter(())
    if pending:
        ds = ray.data.read_parquet(pending, columns=["id", "path", "offset", "duration"])
        ds = ds.map_batches(_decode, fn_kwargs={"root": str(root)}, batch_size=rows_per_block, batch_format="numpy")
        ds = ds.map_batches(_Model, fn_constructor_kwargs={"kind": kind, "checkpoint": checkpoint, "layer": layer,
                                                           "device": device, "kmeans_path": str(kmeans_path) if kmeans_path else None,
                                                           "batch_seconds": batch_seconds},
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus_per_actor,
                            batch_size=rows_per_block, batch_format="numpy")
        stream = (item for batch in ds.iter_batches(batch_format="numpy", batch_size=None)
                  for item in zip(batch["id"], batch["payload"], batch["frames"], batch["error"]))

    def results_for(shard: Path, rows: list[dict], root: Path):
        for row in rows:
            uid, payload, n, error = next(stream)
            if str(uid) != row["id"]:
                raise RuntimeError(f"ray engine: expected {row['id']} from {shard.name}, got {uid} (order lost)")
            if error:
                yield row, str(error)
            elif kmeans is not None:
                yield row, np.frombuffer(payload, dtype=np.int64)
            else:
                yield row, np.frombuffer(payload, dtype=np.float32).reshape(int(n), probe.dim)

    stats = run_shards(manifest, out, probe, results_for, root=root, kmeans=kmeans, float16=float16,
                       num_shards=num_shards, shard_index=shard_index, quiet=True)
    return {**stats, "engine": "ray"}
