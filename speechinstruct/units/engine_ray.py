"""``extract --engine ray``: the same job spread over the nodes of a Ray cluster (``pip install 'speechinstruct[ray]'``).

Ray core, three kinds of work, each where Ray's scheduler puts it:
- the driver (this process) reads the manifest shards still to do and cuts each into blocks of about
  ``block_seconds`` of audio, in manifest order;
- one decode task per block (``num_cpus=1``, on any node) reads and resamples that block's audio;
- a pool of model actors spread over the nodes (``SPREAD``), each holding the extractor (and k-means),
  turns decoded blocks into features or labels.
The driver keeps ``depth`` blocks in flight per actor, so decoding overlaps compute, takes results back in
manifest order and hands each shard to the local engine's writer as its blocks come back: a shard's file
appears when its last block is done, a killed job keeps every finished shard, and a rerun of either engine
resumes. A worker or actor that dies is retried ``max_retries`` times (Ray's own task retries and actor
restarts); after that, or at once for an error the code raised (not retried: it would raise again), the job
stops with one line naming the shard and rows.

``address``: ``None`` starts a local runtime, ``"auto"`` or ``host:6379`` joins a cluster from one of its
nodes, ``ray://host:10001`` connects as a Ray client (the ``[ray]`` extra installs ``ray[client]``). The
extractor and k-means travel through Ray's object store, so only the corpus must be readable at the same
path on every node (a corpus copied from a bucket is fetched by each node's decode tasks, file by file, into
that node's cache: :func:`speechinstruct.sources.storage.fetch_copy`); the driver writes every output file itself.

``score --engine ray`` (:func:`speechinstruct.curate.score.score_ray`) runs on the same blocks, window and actor
pool, with actors that hold the judges instead of the extractor.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from .. import recipe as settings
from ..raycluster import _answers, connect, node_name, reason_of  # noqa: F401  (the Ray engines' API, as before)
from ..shardfiles import corpus_root, finished, manifest_files, repeated_elsewhere, select_shards, shard_output

log = logging.getLogger(__name__)


class RayJobError(RuntimeError):
    """The cluster could not finish a block (retries spent) or sent back something out of order."""


@dataclass
class Block:
    """A run of consecutive rows of one manifest shard: the unit of work sent to the cluster."""

    shard: str
    first: int
    rows: list[dict]  # what decode_row reads (extract.AUDIO_COLUMNS)


def blocks(shards: list[Path], block_seconds: float, repeats: dict[str, dict[str, str]] | None = None,
           extra: tuple[str, ...] = ()) -> Iterator[Block]:
    """Each shard's rows in manifest order, cut into blocks of at most ``block_seconds`` of audio (one row
    at least), leaving out the rows whose ids an earlier shard holds (``repeats``: the shared loop makes those
    skips). A row holds what decode_row reads, and the ``extra`` columns the shard has (score: text, speaker).
    Shards are read one at a time, as the blocks are needed."""
    from ..sources.decoding import audio_columns, seconds as duration

    for shard in shards:
        rows = pq.read_table(shard, columns=audio_columns(shard, extra)).to_pylist()
        earlier = (repeats or {}).get(shard.name, {})
        rows = [r for r in rows if r["id"] not in earlier]
        start, seconds = 0, 0.0
        for i, row in enumerate(rows):
            if i > start and seconds + duration(row) > block_seconds:
                yield Block(shard.name, start, rows[start:i])
                start, seconds = i, 0.0
            seconds += duration(row)
        if start < len(rows):
            yield Block(shard.name, start, rows[start:])


def decode_block(rows: list[dict], root: str, sample_rate: int = 16000) -> list[tuple[str, np.ndarray | str]]:
    """(id, samples at ``sample_rate``) per row, or (id, reason) when the audio cannot be used. Runs as a Ray task.
    A node without the corpus root (its storage not mounted there) is an error, not a reason per row: those
    rows' shards would be written as done, every row of them a skip."""
    import socket

    from ..sources.decoding import decode_row
    from ..sources.storage import in_a_copy

    if not Path(root).is_dir() and not in_a_copy(Path(root)):
        raise FileNotFoundError(f"{root}: the corpus root is not on node {socket.gethostname()}: mount it at the "
                                "same path on every node")
    return [(row["id"], decode_row(row, root, sample_rate)) for row in rows]


class ModelActor:
    """Holds the extractor (and k-means) on one node: decoded blocks in, features or labels out."""

    def __init__(self, shared: list, device: str, batch_seconds: float, threads: int):
        import ray
        import torch

        from .extract import assigns_on_device

        torch.set_num_threads(max(1, threads))
        # ``shared`` holds one object-store reference to (extractor, k-means), fetched here (nested, so that a
        # restarted actor fetches it again; the driver keeps it alive for the whole job)
        extractor, kmeans = ray.get(shared[0])
        self.extractor = extractor.to(device) if hasattr(extractor, "to") else extractor
        if kmeans is not None and device != "cpu":  # assigned where the frames are made, as the local engine does
            kmeans = kmeans.to(device)
        self.kmeans, self.device = kmeans, device
        self.on_device = kmeans if assigns_on_device(self.extractor, kmeans) else None
        self.batch_seconds = batch_seconds
        self.node = node_name()

    def card(self) -> str | None:
        """torch's name for this actor's GPU (the summary's MFU divides by its peak); None on the CPU."""
        from ..devices import card

        return card(self.device)

    def run(self, decoded: list[tuple[str, np.ndarray | str]]) -> tuple[str, list, dict]:
        """(this node, (id, frames | labels | reason) per utterance, {batches halved for memory, the model's
        FLOPs}). After running out of memory, this actor's later batches are no larger than what fitted."""
        from .extract import compute

        results, counts = [], collections.Counter()
        for uid, value in compute(self.extractor, iter(decoded), self.batch_seconds, counts, self.on_device):
            if not isinstance(value, str) and self.kmeans is not None and self.on_device is None:
                value = self.kmeans.assign(value)
            results.append((uid, value))
        self.batch_seconds = min(self.batch_seconds, counts.get("fitted_seconds") or self.batch_seconds)
        return self.node, results, {"batches_halved": counts["batches_halved"], "model_flops": counts["model_flops"]}


class _Window:
    """Block results in block order, with at most ``depth`` blocks in flight per actor: each actor gets a
    new block as soon as one of its own comes back. ``submit(actor, block)`` starts a block's work and returns
    the reference to its result, ``(node, results, counts)``."""

    def __init__(self, ray, todo: Iterator[Block], actors: list, submit, depth: int, max_retries: int):
        self.ray, self.todo, self.submit = ray, enumerate(todo), submit
        self.max_retries = max_retries
        self.free = collections.deque(a for _ in range(depth) for a in actors)
        self.limit = 2 * depth * len(actors)  # blocks in flight + finished ones waiting for their turn
        self.in_flight: dict = {}
        self.done: dict[int, tuple[Block, list]] = {}
        self.next = 0
        self.nodes: collections.Counter[str] = collections.Counter()
        self.halved = 0  # batches the actors halved for memory
        self.flops = 0.0  # the model's FLOPs over every block
        self.stream = self._in_order()  # started by the first results_for

    def _fill(self):
        while self.free and len(self.in_flight) + len(self.done) < self.limit:
            item = next(self.todo, None)
            if item is None:
                return
            seq, block = item
            actor = self.free.popleft()
            self.in_flight[self.submit(actor, block)] = (seq, block, actor)

    def _in_order(self) -> Iterator[tuple[Block, list]]:
        while True:
            self._fill()
            if self.next in self.done:
                block, results = self.done.pop(self.next)
                if isinstance(results, Exception):  # raised in its turn: every block before it is handed on
                    raise results
                yield block, results
                self.next += 1
                continue
            if not self.in_flight:
                return
            ready, _ = self.ray.wait(list(self.in_flight), num_returns=1)
            for ref in ready:
                seq, block, actor = self.in_flight.pop(ref)
                try:
                    node, results, counts = self.ray.get(ref)
                    self.nodes[node] += len(results)
                    self.halved += counts.get("batches_halved", 0)
                    self.flops += counts.get("model_flops", 0.0)
                except self.ray.exceptions.RayError as e:
                    last = block.first + len(block.rows) - 1
                    # Ray retries a worker or actor that died, not an error the code raised (RayTaskError)
                    how = ("failed" if isinstance(e, self.ray.exceptions.RayTaskError)
                           else f"failed after {self.max_retries} retries")
                    results = RayJobError(f"ray engine: {block.shard} rows {block.first}-{last} {how}: "
                                          f"{reason_of(e)} (the Ray logs have the rest)")
                self.done[seq] = (block, results)
                self.free.append(actor)

    def results_for(self, shard: str, rows: list[dict]) -> Iterator[tuple[dict, object]]:
        """(row, its result) for ``rows``, the rows of ``shard`` the blocks were cut from, in order; one line when
        the blocks that come back are of another shard, row or id than the shared loop expects."""
        done = 0
        while done < len(rows):
            block, results = next(self.stream)
            if block.shard != shard or block.first != done:
                raise RayJobError(f"ray engine: expected {shard} row {done}, got {block.shard} row {block.first}")
            for row, (uid, value) in zip(rows[done:], results):
                if uid != row["id"]:
                    raise RayJobError(f"ray engine: expected {row['id']} in {shard}, got {uid}")
                yield row, value
            done += len(results)


def check_pool(actors: int, cpus_per_actor: float, num_gpus_per_actor: float) -> None:
    """One line, before Ray starts, for a pool that cannot be: no actors, or a negative resource."""
    if actors < 1:
        raise ValueError(f"actors: {actors}: give at least one model actor")
    for name, value in (("cpus_per_actor", cpus_per_actor), ("num_gpus_per_actor", num_gpus_per_actor)):
        if value < 0:
            raise ValueError(f"{name}: {value}: cannot be negative")


@contextlib.contextmanager
def actor_pool(ray, cls, args: tuple, actors: int, cpus_per_actor: float, num_gpus_per_actor: float,
               max_retries: int) -> Iterator[list]:
    """``actors`` instances of ``cls(*args)`` spread over the nodes (``SPREAD``), each restarted ``max_retries``
    times when it dies, and killed when the ``with`` block ends, however it ends: a job that stopped leaves no
    actor holding CPUs or GPUs that the next job of this process would wait for. CPU actors are fewer when they
    would hold every CPU, leaving none for decode tasks; GPU actors are as many as the nodes' GPUs hold, and one
    line when no node has the GPUs of one (the job would wait for them for ever)."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if num_gpus_per_actor == 0 and actors * cpus_per_actor > cpus - 1:
        # CPU actors holding every CPU leave none for the decode tasks: the job would stall.
        fit = max(1, int((cpus - 1) // cpus_per_actor))
        log.warning(f"ray: {cpus:g} CPUs in the cluster; using {fit} model actor(s) instead of {actors}")
        actors = fit
    if num_gpus_per_actor > 0 and actors:
        gpus = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        fit = sum(int(g / num_gpus_per_actor + 1e-9) for g in gpus)  # an actor's GPUs are on one node
        if fit == 0:
            raise ValueError(f"{num_gpus_per_actor:g} GPU(s) per actor (--num-gpus-per-actor; a recipe's "
                             f"ray.num_gpus_per_actor): no node of the cluster has that many GPUs "
                             f"(GPUs per node: {', '.join(f'{g:g}' for g in gpus) or 'no node'}); give fewer, or "
                             "0 for CPU actors (an autoscaling cluster: start a GPU node first)")
        if fit < actors:
            log.warning(f"ray: the nodes' GPUs hold {fit} model actor(s) of {num_gpus_per_actor:g} GPU(s); "
                        f"using {fit} instead of {actors}")
            actors = fit
    remote_actor = ray.remote(cls).options(
        num_cpus=cpus_per_actor, num_gpus=num_gpus_per_actor, scheduling_strategy="SPREAD",
        max_restarts=max_retries, max_task_retries=max_retries)
    pool = [remote_actor.remote(*args) for _ in range(actors)]
    try:
        yield pool
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)


def extract_ray(manifest, out, extractor, cfg: settings.Features | None = None, kmeans=None, root=None,
                actors: int = 2, num_gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0,
                address: str | None = None, num_shards: int = 1, shard_index: int = 0,
                block_seconds: float | None = None, depth: int = 2, max_retries: int = 3) -> dict:
    """``extract`` (same arguments, same files) on a Ray cluster. ``extractor`` (loaded on the CPU; or a speech
    tokenizer, tokenizer.py) and ``kmeans`` are shipped to the actors, which move the model to ``cfg.device``
    (``auto``: cuda when actors get GPUs)."""
    from .. import devices
    from ..audio import sample_rate_of
    from ..sources.decoding import check_root
    from .extract import makes_units, run_shards
    from .tokenizer import dense_and_kmeans

    cfg = cfg or settings.Features()
    batch_seconds, float16 = cfg.batch_seconds, cfg.float16
    extractor, kmeans = dense_and_kmeans(extractor, kmeans)

    devices.given_peak()  # before any work: a bad SPEECHINSTRUCT_PEAK_TFLOPS is one line now
    check_pool(actors, cpus_per_actor, num_gpus_per_actor)
    device = devices.actor_device(cfg.device, num_gpus_per_actor)
    manifest, out = Path(manifest), Path(out)
    root = check_root(Path(root) if root else corpus_root(manifest), manifest)
    every = manifest_files(manifest)
    pending = [s for s in select_shards(every, num_shards, shard_index)
               if not finished(shard_output(out, s, fused=makes_units(extractor, kmeans)), s)]
    repeats = repeated_elsewhere(every) if pending else {}
    ray = connect(address)

    decode = ray.remote(decode_block).options(num_cpus=1, max_retries=max_retries)
    window, sample_rate = None, sample_rate_of(extractor)
    where = str(root.absolute())  # a decode task's working folder is not the driver's
    shared = [ray.put((extractor, kmeans))] if pending else []  # one copy in the object store, for every node
    with actor_pool(ray, ModelActor, (shared, device, batch_seconds, max(1, int(cpus_per_actor))),
                    actors if pending else 0, cpus_per_actor, num_gpus_per_actor, max_retries) as pool:
        if pending:
            window = _Window(ray, blocks(pending, block_seconds or 4 * batch_seconds, repeats), pool,
                             lambda actor, block: actor.run.remote(decode.remote(block.rows, where, sample_rate)),
                             depth, max_retries)

        def results_for(shard: Path, rows: list[dict], root: Path):
            return window.results_for(shard.name, rows) if window else iter(())

        stats = run_shards(manifest, out, extractor, results_for, root=root, kmeans=kmeans, float16=float16,
                           num_shards=num_shards, shard_index=shard_index, repeats=repeats, pending=pending)
        if window and window.halved:  # as the local engine's summary
            stats["batches_halved"] = window.halved
        if window:  # the model's FLOP rate, and its MFU over the actors' devices' summed peaks where all are known
            peaks = [devices.peak_tflops(device, name) for name in ray.get([actor.card.remote() for actor in pool])]
            stats.update(devices.utilisation(window.flops, stats["seconds"], peaks))
        return {**stats, "engine": "ray", "actors": len(pool),
                "nodes": dict(sorted(window.nodes.items())) if window else {}}
