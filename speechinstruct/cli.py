"""The ``speechinstruct`` command: a thin layer over the pipeline functions (each stage a module)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from . import __version__

app = typer.Typer(
    help="Build SpeechInstruct-style cross-modal speech-instruction datasets and train LMs on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def _version(value: bool):
    if value:
        typer.echo(f"speechinstruct {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    pass


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs):
    """Call a pipeline function, turning expected failures into one clear line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, ValueError, KeyError, PermissionError) as e:
        fail(str(e) if not isinstance(e, KeyError) else str(e.args[0]))


def _print_json(obj):
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


class Corpus(str, Enum):
    librispeech = "librispeech"
    librilight = "librilight"
    gigaspeech = "gigaspeech"
    commonvoice = "commonvoice"


@app.command()
def shard(
    corpus: Corpus = typer.Argument(..., help="Corpus layout of ROOT."),
    root: Path = typer.Argument(..., help="Corpus folder in its native layout."),
    out: Path = typer.Argument(..., help="Output folder for manifest-*.parquet and summary.json."),
    shard_hours: float = typer.Option(10.0, help="Hours of audio per manifest shard."),
    max_seconds: float = typer.Option(30.0, help="librilight: longest utterance cut from the VAD spans."),
    subset: Optional[str] = typer.Option(None, help="gigaspeech: XS, S, M, L or XL."),
    tsv: str = typer.Option("validated.tsv", help="commonvoice: which TSV to read."),
    license: Optional[str] = typer.Option(None, help="Override the corpus's license string."),
    quiet: bool = Quiet,
):
    """Read a corpus in its native layout into sharded Parquet manifests."""
    from .shard import shard_corpus

    options = {"license": license}
    if corpus is Corpus.librilight:
        options["max_seconds"] = max_seconds
    if corpus is Corpus.gigaspeech:
        options["subset"] = subset
    if corpus is Corpus.commonvoice:
        options["tsv"] = tsv
    summary = _run(shard_corpus, corpus.value, root, out, shard_hours=shard_hours, quiet=quiet, **options)
    summary = {k: v for k, v in summary.items() if k != "skipped_examples"}
    _print_json(summary)


class Features(str, Enum):
    mfcc = "mfcc"
    hubert = "hubert"


NumShards = typer.Option(1, help="Split the work into this many parts (job arrays)...")
ShardIndex = typer.Option(0, help="...and do only this part (0-based).")


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@app.command()
def extract(
    manifest: Path = typer.Argument(..., help="A `shard` output folder (or one manifest .parquet)."),
    out: Path = typer.Argument(..., help="Output folder for features-*.arrow (or units-*.parquet with --kmeans)."),
    features: Features = typer.Option(Features.mfcc, help="mfcc (offline default) or hubert."),
    checkpoint: Optional[str] = typer.Option(None, help="hubert: fairseq .pt, Hugging Face folder, or hub id."),
    layer: Optional[int] = typer.Option(None, help="hubert: transformer layer (1-based; default: last). SpeechGPT: 11."),
    kmeans: Optional[Path] = typer.Option(None, help="Quantize on the fly with this k-means; features are not stored."),
    root: Optional[Path] = typer.Option(None, help="Corpus root (default: the one recorded by `shard`)."),
    batch_seconds: float = typer.Option(100.0, help="Seconds of audio per model batch."),
    float16: bool = typer.Option(False, help="Store features as float16."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    workers: int = typer.Option(2, help="Audio decoding threads."),
    engine: str = typer.Option("local", help="local, or ray (pip install speechinstruct[ray])."),
    ray_address: Optional[str] = typer.Option(None, help="ray: address of an existing cluster (default: start one)."),
    actors: int = typer.Option(2, help="ray: model actors."),
    num_gpus_per_actor: float = typer.Option(0.0, help="ray: GPUs per model actor."),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Decode audio and compute MFCC or HuBERT features (or units) per manifest shard; resumable."""
    from .extract import extract as run_extract
    from .features import load_extractor
    from .units import load_kmeans

    km = _run(load_kmeans, kmeans) if kmeans else None
    if engine == "ray":
        from .engine_ray import extract_ray

        stats = _run(extract_ray, manifest, out, features.value, checkpoint=checkpoint, layer=layer,
                     kmeans_path=kmeans, root=root, batch_seconds=batch_seconds, float16=float16,
                     actors=actors, num_gpus_per_actor=num_gpus_per_actor, address=ray_address,
                     num_shards=num_shards, shard_index=shard_index)
    elif engine == "local":
        extractor = _run(load_extractor, features.value, checkpoint, layer, _device(device))
        stats = _run(run_extract, manifest, out, extractor,
                     root=root, kmeans=km, batch_seconds=batch_seconds, float16=float16, num_shards=num_shards,
                     shard_index=shard_index, workers=workers, quiet=quiet)
    else:
        fail(f"unknown engine {engine!r}: choose local or ray")
    _print_json(stats)


@app.command()
def cluster(
    features: Path = typer.Argument(..., help="An `extract` output folder."),
    out: Path = typer.Argument(..., help="Output folder for centroids.npy and kmeans.json."),
    k: int = typer.Option(1000, help="Number of units (SpeechGPT: 1000)."),
    max_frames: int = typer.Option(1_000_000, help="Frames sampled for fitting."),
    seed: int = typer.Option(0),
    niter: int = typer.Option(50, help="k-means iterations."),
    nredo: int = typer.Option(3, help="k-means runs from different random starts; the best is kept."),
    quiet: bool = Quiet,
):
    """Fit FAISS k-means on a random sample of feature frames."""
    from .cluster import cluster as run_cluster

    _print_json(_run(run_cluster, features, out, k=k, max_frames=max_frames, seed=seed, niter=niter, nredo=nredo, quiet=quiet))


@app.command()
def quantize(
    features: Path = typer.Argument(..., help="An `extract` output folder."),
    kmeans: Path = typer.Argument(..., help="A `cluster` output folder, centroids .npy, or a fairseq *_km*.bin."),
    out: Path = typer.Argument(..., help="Output folder for units-*.parquet and stats.json."),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Assign units, merge repeats, write SpeechGPT unit strings joined to the manifest."""
    from .quantize import quantize as run_quantize
    from .units import load_kmeans

    km = _run(load_kmeans, kmeans)
    _print_json(_run(run_quantize, features, km, out, num_shards=num_shards, shard_index=shard_index, quiet=quiet))


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
