"""Raw recordings (corpus name ``audio``): any folder of audio files of any length that libsndfile reads, such as
podcasts, audiobooks or broadcasts, untranscribed. Speech is found by silero-vad (:mod:`speechinstruct.vad`), each
file streamed in blocks; speech spans closer than 2 s are joined into utterances of at most ``max_seconds`` (a
longer group is cut at its longest pause), as LibriLight's cuts are. Every row is ``train``. Without ``asr`` the rows
have no transcript and feed stage-1 ``pretrain`` records; with it, each utterance is transcribed by that model (the
ASR ``score`` uses: a transformers folder, or a model at an OpenAI-compatible ``base_url``) and can feed
cross-modal records too. With ``speakers``, each recording's speech spans are embedded (Resemblyzer's GE2E,
:mod:`speechinstruct.speakers`) and clustered, the number of speakers being what the clustering finds; each row's
``speaker`` is ``{recording}#S1``, ``#S2``, … (the speaker of most of its speech), and a row whose spans hold two
voices is named in the summary's notes with each recording's count of speakers. With ``channels="each"`` a
recording of several channels (a telephone call, a side on each) is cut one channel at a time, each row naming
its ``channel``; by default the channels are mixed. A license is required: we will not guess one.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ...io import files_under
from ...progress import progress
from .base import CHANNELS, Item, Note, Skip, probe, relpath

# the container suffixes libsndfile reads (soundfile.available_formats(), as file names spell them)
SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".snd", ".w64", ".caf", ".rf64")


def read(root: str | Path, max_seconds: float = 30.0, license: str | None = None,
         asr: str | None = None, base_url: str | None = None, device: str = "auto", batch_size: int | None = None,
         speakers: bool = False, speaker_threshold: float = 0.25, channels: str = "mix",
         workers: int | None = None, engine: str = "local", ray_address: str | None = None) -> Iterator[Item]:
    from ...audio import AudioError, channels as audio_channels
    from ..vad import utterances

    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, got {channels!r}")
    if not license:
        raise ValueError(f"{root}: shard audio needs --license: the license of these recordings (we will not guess one)")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be local or ray, got {engine!r}")
    root = Path(root)
    files = sorted(p for _, p in files_under(root) if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{root}: no audio files ({', '.join(SUFFIXES)})")
    # each file's sample rate and the channels it is cut on (None: mixed), or why it is skipped
    plan: list[tuple[Path, str, int, list[int | None]] | Skip] = []
    for path in files:
        rel = relpath(path, root)
        probed = probe(path, root)
        if isinstance(probed, Skip):
            plan.append(probed)
            continue
        sides: list[int | None] = [None]
        if channels == "each":
            try:
                sides = list(range(n)) if (n := audio_channels(path)) > 1 else [None]
            except AudioError as e:
                plan.append(Skip(rel, "unreadable audio", str(e)))
                continue
        plan.append((path, rel, probed[0], sides))
    jobs = [(entry[0], channel) for entry in plan if not isinstance(entry, Skip) for channel in entry[3]]
    nodes: collections.Counter = collections.Counter()  # Ray: the jobs each node ran
    found = vad_spans_ray(jobs, ray_address, nodes) if engine == "ray" else vad_spans(jobs, workers)
    encoder = None
    if speakers:
        from ...judges.speakers import GE2E

        encoder = GE2E()
    transcriber = None
    if asr:
        from ...devices import resolve_device
        from ...judges.asr import load_asr

        transcriber = load_asr(asr, base_url, device=resolve_device(device), batch_size=batch_size)
        batch_size = getattr(transcriber, "batch_size", None) or batch_size or 8  # the model's, by its device
        yield Note(f"transcripts by ASR: {json.dumps(transcriber.spec, sort_keys=True)}")
    missed = collections.Counter()
    for entry in progress(plan, desc="audio files (VAD)", unit="file"):
        if isinstance(entry, Skip):
            yield entry
            continue
        path, rel, sr, sides = entry
        results = [next(found) for _ in sides]  # this file's, in order
        stem = str(Path(rel).with_suffix(""))
        for channel, result in zip(sides, results):
            side = "" if channel is None else f" (channel {channel})"
            if isinstance(result, AudioError):
                if "NaN or Inf" not in str(result):
                    yield Skip(rel, "unreadable audio", str(result))
                    break
                yield Skip(rel, "NaN or Inf samples", f"{result}{side}")  # another channel may be clean
                continue
            spans, seconds = result
            cuts = utterances(spans, max_seconds)
            if not cuts:
                yield Skip(rel, "no speech found", f"{seconds:.1f} s{side}, silero-vad found no speech")
                continue
            # a side's ids end in chN-00000, which no file's (ending in 00000) can equal
            name, prefix = (stem, "") if channel is None else (f"{stem}#ch{channel}", f"ch{channel}-")
            rows = [{
                    "id": f"audio/{stem}/{prefix}{i:05d}",
                    "path": rel,
                    "offset": round(start, 4),
                    "duration": round(min(end, seconds) - start, 4),
                    "sample_rate": sr,
                    "text": None,
                    "speaker": "unknown",
                    "corpus": "audio",
                    "license": license,
                    "split": "train",
                    "corpus_split": "train",
                    "channel": channel,
                } for i, (start, end) in enumerate(cuts)]
            if encoder is not None:
                yield label_speakers(encoder, path, name, spans, cuts, rows, speaker_threshold, channel)
            if transcriber:
                transcribe(transcriber, path, rows, batch_size, missed)
            yield from rows
    for reason, count in sorted(missed.items()):
        yield Note(f"{count} utterances kept without a transcript (pretrain only): {reason}")
    if nodes:
        yield Note(f"VAD on Ray: {sum(nodes.values())} recordings (or channels) on {len(nodes)} "
                   f"node{'s' if len(nodes) != 1 else ''} ({', '.join(f'{n}: {c}' for n, c in sorted(nodes.items()))})")


def vad_spans(jobs: list[tuple[Path, int | None]], workers: int | None = None) -> Iterator:
    """(speech spans, seconds) of each job, a file's channel (None: mixed), or the AudioError that stopped it, in
    order. ``workers`` threads (default: the CPUs this process may use) run one file each at a time, each with a
    silero-vad model of its own run with one thread, as silero runs it: onnxruntime and the audio libraries
    release the GIL, and the spans do not depend on the thread. Threads, not processes: a spawned process
    imports the caller's ``__main__`` again (a script without ``if __name__ == "__main__"`` runs twice), and a
    forked one copies the thread pools torch or onnxruntime may hold half-made."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ...audio import AudioError
    from ...threads import available_cpus
    from ..vad import SileroVAD

    own = threading.local()

    def spans(job):
        if not hasattr(own, "vad"):
            own.vad = SileroVAD()
        try:
            return own.vad.spans(*job)
        except AudioError as e:
            return e

    workers = max(1, min(workers or available_cpus(), len(jobs)))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vad")
    try:
        yield from pool.map(spans, jobs)
    finally:  # stopped early (an error, ^C): the files not begun are not run
        pool.shutdown(wait=True, cancel_futures=True)


def vad_spans_ray(jobs: list[tuple[Path, int | None]], address: str | None = None,
                  nodes: collections.Counter | None = None, max_retries: int = 3) -> Iterator:
    """:func:`vad_spans`'s results, each job a Ray task of one CPU run where Ray's scheduler puts it (``address``: as
    ``extract --engine ray`` joins a cluster), so that a cluster's nodes cut the recordings, which must be readable
    at the same path on each. In order, with at most two tasks in flight per CPU of the cluster; a worker that dies
    is retried ``max_retries`` times, and an error the VAD raised (not an unreadable file's) is one line.
    ``nodes`` counts the jobs each node ran."""
    from ...raycluster import connect, reason_of

    import itertools

    ray = connect(address)
    task = ray.remote(_vad_task).options(num_cpus=1, max_retries=max_retries)

    def submit(path: Path, channel: int | None):  # absolute: a Ray worker's working folder is not this process's
        return path, task.remote(str(path.absolute()), channel)

    todo = iter(jobs)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = collections.deque(submit(*job) for job in itertools.islice(todo, window))
    try:
        while pending:
            path, ref = pending.popleft()
            try:
                node, result = ray.get(ref)
            except ray.exceptions.RayError as e:
                raise ValueError(f"{path}: ray engine: the VAD task failed: {reason_of(e)}") from None
            if (job := next(todo, None)) is not None:
                pending.append(submit(*job))
            if nodes is not None:
                nodes[node] += 1
            yield result
    finally:  # stopped early (an error, ^C): the tasks still in flight are cancelled
        for _, left in pending:
            ray.cancel(left)


_VAD = None  # a Ray worker's silero-vad model, made by its first task and kept for the next


def _vad_task(path: str, channel: int | None):
    """One job of :func:`vad_spans_ray`, run in a Ray worker: (its node, (speech spans, seconds) or the AudioError)."""
    global _VAD
    from ...audio import AudioError
    from ...raycluster import node_name
    from ..vad import SileroVAD

    if _VAD is None:
        _VAD = SileroVAD()
    try:
        return node_name(), _VAD.spans(Path(path), channel)
    except AudioError as e:
        return node_name(), e


JOIN_GAP = 0.25          # seconds: spans closer than this are one segment for speaker embeddings
MIN_EMBED_SECONDS = 1.0  # segments shorter than this join the nearest speaker instead of being clustered


def label_speakers(encoder, path: Path, stem: str, spans: list[tuple[float, float]], cuts: list[tuple[float, float]],
                   rows: list[dict], threshold: float, channel: int | None = None) -> Note:
    """Each row's ``speaker`` from the clustered embeddings of the speech inside it (the speaker of most of its
    speech); a Note with the recording's count of speakers and the rows whose speech holds two voices. Spans less
    than :data:`JOIN_GAP` apart are one segment (a pause inside a sentence); segments of :data:`MIN_EMBED_SECONDS`
    or more are clustered, and shorter ones, whose embeddings are unreliable, join the nearest cluster."""
    from ...audio import load
    from ...judges.speakers import cluster_speakers

    segments: list[list[float]] = []
    for a, b in spans:
        if segments and a - segments[-1][1] < JOIN_GAP:
            segments[-1][1] = b
        else:
            segments.append([a, b])
    spans = [(a, b) for a, b in segments]
    embeddings = np.array([encoder.embed(load(path, a, max(b - a, 0.05), reject_silence=False, channel=channel))
                           for a, b in spans])
    long = np.array([b - a >= MIN_EMBED_SECONDS for a, b in spans])
    if long.sum() >= 1:
        labels = np.zeros(len(spans), dtype=np.int64)
        labels[long] = cluster_speakers(embeddings[long], threshold)
        centroids = np.array([embeddings[long][labels[long] == c].mean(axis=0) for c in range(labels[long].max() + 1)])
        labels[~long] = np.argmax(embeddings[~long] @ centroids.T, axis=1) if (~long).any() else []
    else:
        labels = cluster_speakers(embeddings, threshold)
    mixed = []
    for row, (start, end) in zip(rows, cuts):
        talk: collections.Counter[int] = collections.Counter()
        for (a, b), label in zip(spans, labels):
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                talk[int(label)] += overlap
        if talk:
            row["speaker"] = f"{stem}#S{talk.most_common(1)[0][0] + 1}"
        if len(talk) > 1:
            mixed.append(row["id"])
    found = len(set(labels.tolist()))
    return Note(f"{stem}: {found} speaker{'s' if found != 1 else ''}" + (
        f"; {len(mixed)} utterances hold two voices: {', '.join(mixed[:10])}" if mixed else ""))


def transcribe(transcriber, path: Path, rows: list[dict], batch_size: int, missed: collections.Counter) -> None:
    """Set each row's ``text`` to what ``transcriber`` hears in its span of ``path`` (``batch_size`` spans in
    memory at a time). A span it hears no words in, or gets no answer for, keeps ``text`` None, counted in
    ``missed`` by reason."""
    from ...audio import load
    from ...judges.asr import BadAnswer

    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        wavs = [load(path, r["offset"], r["duration"], reject_silence=False, channel=r["channel"]) for r in batch]
        for row, text in zip(batch, transcriber.transcribe(wavs)):
            if isinstance(text, BadAnswer) or not text.strip():
                missed[str(text) if isinstance(text, BadAnswer) else "the ASR model heard no words"] += 1
            else:
                row["text"] = text.strip()
