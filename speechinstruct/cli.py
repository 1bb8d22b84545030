"""The ``speechinstruct`` command: a thin layer over the pipeline functions (each stage a module)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from . import recipe as settings
from .recipe import default
from .sources.corpora import CHANNELS, SOURCES
from .tokenizers import FEATURES

# --help lists the commands in pipeline order (typer lists commands as defined, then groups)
PIPELINE_ORDER = ("shard", "score", "align", "extract", "cluster", "quantize", "dedup", "templates", "compose", "publish",
                  "validate", "report", "resynth", "run", "train", "chat")


class _PipelineOrder(typer.core.TyperGroup):
    def list_commands(self, ctx):
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else len(PIPELINE_ORDER))


app = typer.Typer(
    cls=_PipelineOrder,
    help="Build SpeechInstruct-style cross-modal speech-instruction datasets and train LMs on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
Quiet = typer.Option(False, "--quiet", "-q", help="No progress bars or stage lines (warnings and errors still show).")


def _version(value: bool):
    if value:
        typer.echo(f"speechinstruct {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for OpenMP/FAISS, BLAS and torch "
                                          "(default: the CPUs this process may use: affinity and cgroup quota)."),
):
    from . import threads as threads_mod

    threads_mod.configure(threads)  # before any command imports torch or faiss


def fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def expected_failures():
    """Expected failures as one clear line and exit code 2: missing or unreadable files (OSError), bad values,
    refused checkpoints, failed LLM or TTS calls, a failed Ray job, memory that halving could not find. Work already written stays; rerunning
    resumes. Anything else is a bug and keeps its traceback."""
    from .checkpoints import UnsafeCheckpointError
    from .llm import LLMError
    from .memory import OutOfMemory
    from .sources.tts import TTSError
    from .units.engine_ray import RayJobError

    try:
        yield
    except KeyError as e:  # our own say what they are; one nobody foresaw is a field an input lacks
        key = e.args[0] if e.args else ""
        fail(key if isinstance(key, str) and " " in key else
             f"no {key!r} where one was expected (an input written by another tool or version?)")
    except (OSError, ValueError, UnsafeCheckpointError, LLMError, TTSError, RayJobError, OutOfMemory) as e:
        if getattr(e, "summary", None) is not None:  # a stage that went through but must run again: its summary too
            _print_json(e.summary)
        if isinstance(e, FileNotFoundError) and e.errno is None and " " not in str(e):  # pyarrow's: the path alone
            fail(f"{e}: no such file or folder")
        fail(str(e))


class _Stderr(logging.Handler):
    """What the stages log, on whatever ``sys.stderr`` is when they say it (a test runner swaps it per call):
    info lines as they are, warnings and errors prefixed ``warning:`` / ``error:``."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


def log_to_stderr(quiet: bool) -> None:
    """The ``speechinstruct`` loggers to stderr: stage lines (info) and above, or with ``-q`` warnings and
    errors only. Progress bars are tqdm's, also off with ``-q``: ours, and the Hub's, transformers' ("Loading
    weights") and datasets' (their variables, read when they load: the commands import them later)."""
    logger = logging.getLogger("speechinstruct")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")


def command(group: typer.Typer, name: str | None = None):
    """``group.command(name)`` for a function whose expected failures (:func:`expected_failures`) end the
    command with one line, and whose ``quiet`` option sets what the stages log (:func:`log_to_stderr`)."""
    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            log_to_stderr(bool(kwargs.get("quiet", False)))
            with expected_failures():
                return fn(*args, **kwargs)
        return group.command(name)(run)
    return register


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default; a command without it: no)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _utf8(value: str) -> str:
    """``value``, or one line when it holds bytes that are not UTF-8 (Python passes them on as lone surrogates):
    Arrow, which reads and writes every shard, cannot open such a path."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise typer.BadParameter(f"{os.fsencode(value)!r}: the path is not UTF-8 (Arrow, which reads and writes every "
                                 "shard, cannot open it); rename it") from None
    return value


def _input_name(value: str) -> str:
    """An input given as a path, hub id or name; a URL (``s3://…``, ``hf://…``) is copied into the cache first
    (:func:`speechinstruct.sources.storage.local`) and becomes that copy's path."""
    from .sources.storage import local

    return str(local(_utf8(value)))


def _input(value: str) -> Path:
    """An input file or folder; a URL is copied into the cache first, as for :func:`_input_name`."""
    return Path(_input_name(value))


def _output(value: str) -> Path:
    """An output file or folder: local (a URL would become a local folder named ``s3:``); one line otherwise."""
    from .sources.storage import is_url, redacted

    if is_url(_utf8(value)):
        raise typer.BadParameter(f"{redacted(value)}: outputs are written to a local folder (copy them to object "
                                 "storage after, e.g. with the aws or gcloud command line)")
    return Path(value)


def _print_json(obj):
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


# the corpus choices, from the registry (corpora.SOURCES); Corpus.demo is speechinstruct-demo
Corpus = Enum("Corpus", {name.removeprefix("speechinstruct-"): name for name in SOURCES}, type=str)
Channels = Enum("Channels", {name: name for name in CHANNELS}, type=str)


@command(app)
def shard(
    ctx: typer.Context,
    corpus: Corpus = typer.Argument(..., help="Corpus layout of ROOT."),
    root: str = typer.Argument(..., parser=_utf8, help="Corpus folder in its native layout; hf: a dataset folder (Hub-style "
                               "Parquet or save_to_disk) or a hub id; lhotse: a folder of manifests or of Shar shards, or a cuts file; "
                               "kaldi: a data directory or a folder of them; webdataset: a folder of tars, a brace pattern (data/shard-{000..099}.tar) "
                               "or one tar. A URL (s3://, gs://, hf://) is copied into the cache first."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for manifest-*.parquet and summary.json."),
    shard_hours: float = typer.Option(default(settings.Shard, "shard_hours"), help="Hours of audio per manifest shard."),
    max_seconds: float = typer.Option(30.0, help="librilight, audio: longest utterance cut from the VAD spans."),
    asr: Optional[str] = typer.Option(None, parser=_input_name, help="audio: transcribe each utterance with this ASR "
                                      "model (as `score --asr`: a transformers folder or hub id, or a model at --base-url)."),
    base_url: Optional[str] = typer.Option(None, help="audio: --asr at an OpenAI-compatible /audio/transcriptions server."),
    device: str = typer.Option("auto", help="audio: where --asr runs (cpu, cuda, cuda:N or auto)."),
    speakers: bool = typer.Option(False, "--speakers", help="audio: find each recording's speakers (speaker embeddings "
                                  "clustered); rows get speaker RECORDING#S1, #S2, …"),
    speaker_threshold: float = typer.Option(0.25, help="audio --speakers: the cosine distance at which clusters stop "
                                            "merging (lower: more speakers)."),
    workers: Optional[int] = typer.Option(None, min=1, help="audio: threads running the VAD, a file at a time each "
                                          "(default: one per CPU this process may use)."),
    channels: Channels = typer.Option("mix", help="audio: a recording of several channels is cut with its channels "
                                      "mixed, or each channel on its own (each: the two sides of a telephone call; "
                                      "rows get `channel`). Not for stereo music or podcasts, whose channels hold the "
                                      "same speech: each utterance would come twice."),
    engine: Optional[str] = typer.Option(None, help="audio: the VAD here (local), or as Ray tasks over a cluster's "
                                         "nodes (ray; pip install speechinstruct[ray]); default: ray when --ray-address "
                                         "is given, else local."),
    ray_address: Optional[str] = typer.Option(None, help="audio --engine ray: auto, host:6379 (from a cluster node) or "
                                              "ray://host:10001 (Ray client); default: start a local Ray."),
    subset: Optional[str] = typer.Option(None, help="gigaspeech: XS, S, M, L, XL (training), DEV or TEST."),
    tsv: Optional[str] = typer.Option(None, help="commonvoice: which TSV to read (default validated.tsv; clips in "
                                      "dev.tsv/test.tsv stay validation/test; a TSV named here is read even without them)."),
    audio_column: str = typer.Option("audio", help="hf: the audio column (struct<bytes, path>); of an "
                                      "audiofolder, the metadata's file_name (audio) or X_file_name (X) column."),
    text_column: str = typer.Option("text", help="hf: the transcript column."),
    id_column: Optional[str] = typer.Option(None, help="hf: a column of utterance ids (default: file and row)."),
    speaker_column: Optional[str] = typer.Option(None, help="hf: a column of speaker ids."),
    split: Optional[str] = typer.Option(None, help="hf: read only this split of the dataset (its own name, e.g. validation)."),
    config: Optional[str] = typer.Option(None, help="hf: the dataset card's config to read (load_dataset's second "
                                         "argument, the Hub's subset; default: the card's default config)."),
    revision: Optional[str] = typer.Option(None, help="hf, a hub id: the branch, tag or commit to fetch, e.g. "
                                           "refs/convert/parquet (where the Hub keeps its Parquet conversion)."),
    audio_root: Optional[Path] = typer.Option(None, parser=_input, help="lhotse, kaldi: the folder manifest paths are relative to "
                                              "(default: the deepest folder holding every listed file)."),
    splits: Optional[str] = typer.Option(None, help="Keep only these splits, e.g. train or train,validation (default: all, each marked)."),
    split_map: Optional[list[str]] = typer.Option(None, "--split-map", help="NAME=SPLIT: the split (train, validation, test) "
                                                  "of a corpus part whose name does not say it, e.g. heldout_a=validation; repeatable."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Read files through links in ROOT that lead out of "
                                      "it (parts linked in from elsewhere); without it each is a counted skip."),
    license: Optional[str] = typer.Option(None, help="The audio's license: required for audio and webdataset (we will "
                                          "not guess one); for LibriSpeech, LibriLight, GigaSpeech, Common Voice and "
                                          "the demo it replaces the corpus's known license; hf: the dataset card's "
                                          "unless given; lhotse, kaldi: recorded as unknown unless given."),
    quiet: bool = Quiet,
):
    """Read a corpus into sharded Parquet manifests, every row with its split: LibriSpeech, LibriLight, GigaSpeech,
    Common Voice in their native layouts, a Hugging Face audio dataset, lhotse manifests, a Kaldi data directory,
    WebDataset tar shards (webdataset), or raw recordings of any length cut at speech by silero-vad (audio)."""
    from .sources.corpora import option_problem
    from .sources.shard import read_something, shard_corpus

    # each source's own options (SOURCES[...].options); a flag given for a source that does not take it is one line
    values = {"max_seconds": max_seconds, "subset": subset, "tsv": tsv, "audio_column": audio_column,
              "text_column": text_column, "id_column": id_column, "speaker_column": speaker_column, "split": split,
              "config": config, "audio_root": audio_root, "channels": channels.value,
              "workers": workers, "engine": engine, "ray_address": ray_address}
    foreign = [p.name for p in ctx.command.params if any(p.name in s.options for s in SOURCES.values())
               and _given(ctx, p.name) and option_problem(corpus.value, p.name)]
    if foreign:
        takers = sorted({source for name in foreign for source, s in SOURCES.items() if name in s.options})
        own = "".join(f", --{o.replace('_', '-')}" for o in SOURCES[corpus.value].options)
        fail(f"{' and '.join('--' + f.replace('_', '-') for f in foreign)} {'is' if len(foreign) == 1 else 'are'} for "
             f"`shard {'/'.join(takers)}` (a {corpus.value} corpus takes --license, --splits, --split-map, --follow-links{own})")
    if base_url and not asr:
        fail("--base-url needs --asr: the model name at that server (`openai`: whisper-1)")
    inferred: list[str] = []
    if corpus.value == "audio":
        values["engine"] = _engine(ctx, engine, ray_address, inferred)
        if values["engine"] == "ray" and _given(ctx, "workers"):
            fail("--workers: the local engine's VAD threads, and --engine ray runs the VAD as Ray tasks (one CPU "
                 "each, as many at a time as the cluster has CPUs): leave it out")
    options = {"license": license, "splits": splits, "split_map": split_map or None, "follow_links": follow_links or None,
               **{name: value for name, value in values.items() if name in SOURCES[corpus.value].options}}
    if asr:
        options.update(asr=asr, base_url=base_url, device=device)
    if not speakers and _given(ctx, "speaker_threshold"):
        inferred.append("--speakers (--speaker-threshold is given)")
        logging.getLogger("speechinstruct").warning("inferred %s", inferred[-1])
        speakers = True
    if speakers:
        options.update(speakers=True, speaker_threshold=speaker_threshold)
    settings.checked(settings.CorpusOptions, **{name: value for name, value in options.items()  # as a recipe's are
                                                 if name in settings.CorpusOptions.model_fields and name != "split_map"})
    if revision is not None and (corpus is not Corpus.hf or Path(root).exists()):
        fail("--revision is for `shard hf` with a hub id (owner/name); an hf:// URL names its revision as "
             "hf://datasets/owner/name@REVISION")
    if corpus is Corpus.hf:
        from .sources.corpora.hf import hub_url, local_folder
        from .sources.storage import is_url

        if url := hub_url(str(root)):  # a dataset's page on the Hub, pasted from a browser
            inferred.append(f"{url} (the Hub's web address {root})")
            logging.getLogger("speechinstruct").warning("inferred %s", inferred[-1])
            root = url
        root = root if is_url(root) else local_folder(root, split, config, revision)  # a URL is copied by shard_corpus
    summary = shard_corpus(corpus.value, root, out, settings.checked(settings.Shard, shard_hours=shard_hours), **options)
    summary = {k: v for k, v in summary.items() if k != "skipped_examples"} | ({"inferred": inferred} if inferred else {})
    _print_json(read_something(summary, out))


# the --features choices (tokenizers.FEATURES): MFCC, the SSL encoders read at --layer, the codecs; Features.data2vec
# is data2vec-audio
Features = Enum("Features", {kind.split("-")[0]: kind for kind in FEATURES}, type=str)


NumShards = typer.Option(1, help="Split the work into this many parts (job arrays)...")
ShardIndex = typer.Option(0, help="...and do only this part (0-based).")
Engine = typer.Option(None, help="local, or ray (pip install speechinstruct[ray]); default: ray when --ray-address "
                      "or another ray: option is given, else local.")
RayAddress = typer.Option(None, help="ray: auto, host:6379 (from a cluster node) or ray://host:10001 (Ray client); "
                          "default: start a local Ray.")
Actors = typer.Option(default(settings.Ray, "actors"), min=1, help="ray: model actors, spread over the nodes.")
GpusPerActor = typer.Option(default(settings.Ray, "num_gpus_per_actor"), min=0.0, help="ray: GPUs per model actor.")
CpusPerActor = typer.Option(default(settings.Ray, "cpus_per_actor"), min=0.0,
                            help="ray: CPUs per model actor (and its torch threads).")
MaxRetries = typer.Option(default(settings.Ray, "max_retries"), min=0, help="ray: retries of a decode task whose "
                          "worker died and restarts of a dead model actor (an error the code raises is not retried).")


# the options only the Ray engine reads (besides --ray-address)
RAY_ONLY = ("actors", "num_gpus_per_actor", "cpus_per_actor", "block_seconds", "max_retries")


def _engine(ctx: typer.Context, engine: str | None, address: str | None, inferred: list[str]) -> str:
    """local or ray. Without ``--engine``, a cluster address or another option of the Ray engine given on the
    command line means ray (they were ignored: the job ran locally), added to ``inferred`` for the summary and said
    on stderr; with ``--engine local`` they contradict it: one line."""
    given = (["--ray-address"] if address else []) + [
        f"--{name.replace('_', '-')}" for name in RAY_ONLY if _given(ctx, name)]
    if engine is None:
        if not given:
            return "local"
        inferred.append(f"--engine ray ({', '.join(given)} {'is' if len(given) == 1 else 'are'} given)")
        logging.getLogger("speechinstruct").warning("inferred %s", inferred[-1])
        return "ray"
    if engine not in ("local", "ray"):
        fail(f"unknown engine {engine!r}: choose local or ray")
    if engine == "local" and given:
        fail(f"{', '.join(given)}: the Ray engine's, and --engine local runs here: give --engine ray, or leave "
             f"{'it' if len(given) == 1 else 'them'} out")
    return engine


def _device(device: str) -> str:
    from .devices import resolve_device

    return resolve_device(device)


@command(app)
def extract(
    ctx: typer.Context,
    manifest: Path = typer.Argument(..., parser=_input, help="A `shard` output folder (or one manifest .parquet)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for features-*.arrow (or units-*.parquet with --kmeans)."),
    features: Features = typer.Option(Features.mfcc, help="mfcc (offline default); hubert, wav2vec2, wavlm or "
                                      "data2vec-audio at --layer; or a codec whose codes are the units: mimi, encodec, dac, xcodec, xcodec2."),
    checkpoint: Optional[str] = typer.Option(None, parser=_input_name, help="hubert: fairseq .pt, Hugging Face folder, or hub id; a codec: "
                                             "a folder saved by transformers, or a hub id."),
    codebooks: Optional[int] = typer.Option(None, min=1, help="codecs: how many of the model's codebooks to keep "
                                            "(default: all)."),
    layer: Optional[int] = typer.Option(None, help="hubert: transformer layer (1-based; default: last). SpeechGPT: 11."),
    kmeans: Optional[Path] = typer.Option(None, parser=_input, help="Quantize on the fly with this k-means; features are not stored."),
    root: Optional[Path] = typer.Option(None, parser=_input, help="Corpus root (default: the one recorded by `shard`)."),
    batch_seconds: float = typer.Option(default(settings.Features, "batch_seconds"), help="Seconds of audio per model batch."),
    float16: bool = typer.Option(default(settings.Features, "float16"), help="Store features as float16."),
    dtype: str = typer.Option(default(settings.Features, "dtype"),
                              help="hubert: compute in float32 or bfloat16 (autocast; AVX512-BF16/AMX CPUs, GPUs)."),
    device: str = typer.Option(default(settings.Features, "device"), help="cpu, cuda, cuda:N or auto."),
    workers: Optional[int] = typer.Option(default(settings.Features, "workers"), min=1, help="Audio decoding threads "
                                          "(default: every usable CPU when the model runs on a GPU, else 2)."),
    engine: Optional[str] = Engine,
    ray_address: Optional[str] = RayAddress,
    actors: int = Actors,
    num_gpus_per_actor: float = GpusPerActor,
    cpus_per_actor: float = CpusPerActor,
    block_seconds: Optional[float] = typer.Option(None, help="ray: seconds of audio per work block (default: 4 x --batch-seconds)."),
    max_retries: int = MaxRetries,
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Decode audio and compute MFCC or HuBERT features (or units) per manifest shard; resumable."""
    from .units.extract import extract as run_extract
    from .units.kmeans import load_kmeans
    from .units.tokenizer import load_tokenizer

    inferred: list[str] = []
    engine = _engine(ctx, engine, ray_address, inferred)
    cfg = settings.checked(settings.Features, kind=features.value, batch_seconds=batch_seconds, float16=float16,
                           dtype=dtype, device=device, workers=workers, layer=layer, codebooks=codebooks)
    km = load_kmeans(kmeans) if kmeans else None
    # the Ray engine ships a CPU copy to its actors, which move it to their own device
    extractor = load_tokenizer(features.value, checkpoint, layer, "cpu" if engine == "ray" else _device(device),
                               dtype=dtype, codebooks=codebooks, kmeans=km, features_only=True)
    if km is not None and engine == "local" and _device(device) != "cpu":
        km.to(_device(device))  # the fused units path assigns where the features are made
    if engine == "ray":
        from .units.engine_ray import extract_ray

        stats = extract_ray(manifest, out, extractor, cfg, root=root, actors=actors, num_gpus_per_actor=num_gpus_per_actor,
                            cpus_per_actor=cpus_per_actor, address=ray_address, num_shards=num_shards,
                            shard_index=shard_index,
                            block_seconds=block_seconds, max_retries=max_retries)
    else:
        stats = run_extract(manifest, out, extractor, cfg, root=root, num_shards=num_shards, shard_index=shard_index)
    _print_json(stats | ({"inferred": inferred} if inferred else {}))


@command(app)
def cluster(
    features: Path = typer.Argument(..., parser=_input, help="An `extract` output folder."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for centroids.npy and kmeans.json."),
    k: int = typer.Option(default(settings.KMeans, "k"), help="Number of units (SpeechGPT: 1000)."),
    max_frames: int = typer.Option(default(settings.KMeans, "max_frames"), help="Frames sampled for fitting."),
    seed: int = typer.Option(default(settings.KMeans, "seed")),
    niter: int = typer.Option(default(settings.KMeans, "niter"), help="k-means iterations."),
    nredo: int = typer.Option(default(settings.KMeans, "nredo"), help="k-means runs from different random starts; the "
                              "best is kept (raise for few, well-separated clusters)."),
    quiet: bool = Quiet,
):
    """Fit FAISS k-means on a random sample of feature frames."""
    from .units.cluster import cluster as run_cluster

    _print_json(run_cluster(features, out, settings.checked(settings.KMeans, k=k, max_frames=max_frames, seed=seed,
                                                            niter=niter, nredo=nredo)))


@command(app)
def quantize(
    features: Path = typer.Argument(..., parser=_input, help="An `extract` output folder."),
    kmeans: Path = typer.Argument(..., parser=_input, help="A `cluster` output folder (or its kmeans.json), centroids .npy, or a fairseq *_km*.bin."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for units-*.parquet and stats.json."),
    device: str = typer.Option("auto", help="Where to assign: cpu (FAISS's search), cuda, cuda:N or auto (a GPU "
                               "when there is one: torch's matrix products); the same nearest centroids on each."),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Assign units, merge repeats, write SpeechGPT unit strings joined to the manifest."""
    from .units.kmeans import load_kmeans
    from .units.quantize import quantize as run_quantize

    km = load_kmeans(kmeans).to(_device(device))
    _print_json(run_quantize(features, km, out, num_shards=num_shards, shard_index=shard_index))


EvalSets = typer.Option(None, "--eval", help="An evaluation set (repeatable): a text file (a line each), a JSONL file, a "
                        "manifest or units folder, or NAME=PATH (a corpus in the layout `shard` reads as NAME); "
                        "what shares a 13-word n-gram with it (or equals a shorter text of it) is dropped.")


@command(app)
def dedup(
    units: Path = typer.Argument(..., parser=_input, help="A units folder (quantize or extract --kmeans output, or codec units)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder: units-*.parquet without the dropped rows, "
                               "dropped-*.jsonl, dedup.json."),
    eval: Optional[list[str]] = EvalSets,
    ngram: int = typer.Option(default(settings.Dedup, "ngram"), help="Units per n-gram for MinHash."),
    num_perm: int = typer.Option(default(settings.Dedup, "num_perm"), help="MinHash permutations."),
    threshold: float = typer.Option(default(settings.Dedup, "threshold"), help="LSH's Jaccard threshold for candidates."),
    similarity: float = typer.Option(default(settings.Dedup, "similarity"), help="Normalised Levenshtein similarity "
                                     "of two unit sequences that makes them duplicates."),
    eval_ngram: int = typer.Option(default(settings.Dedup, "eval_ngram"), help="Words per n-gram against evaluation texts."),
    max_per_transcript: Optional[int] = typer.Option(default(settings.Dedup, "max_per_transcript"),
                                                     help="At most this many utterances per normalised transcript."),
    speaker_disjoint: bool = typer.Option(default(settings.Dedup, "speaker_disjoint"),
                                          help="Drop training rows of speakers who also speak in an evaluation split."),
    audio_hash: bool = typer.Option(default(settings.Dedup, "audio_hash"), help="Also compare the decoded audio "
                                    "(decodes every row)."),
    scores: Optional[Path] = typer.Option(None, parser=_input, help="A `score` output: each group keeps its best DNSMOS."),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Near-duplicate audio (unit MinHash), repeated transcripts and evaluation data out of the training rows; the
    folder's own validation and test rows always count as evaluation data."""
    from .curate.dedup import dedup as run_dedup

    cfg = settings.checked(settings.Dedup, eval=eval or [], ngram=ngram, num_perm=num_perm, threshold=threshold,
                           similarity=similarity, eval_ngram=eval_ngram, max_per_transcript=max_per_transcript,
                           speaker_disjoint=speaker_disjoint, audio_hash=audio_hash)
    summary = run_dedup(units, out, cfg, scores=scores, num_shards=num_shards, shard_index=shard_index)
    _print_json({k: v for k, v in summary.items() if k != "examples"})


templates_app = typer.Typer(help="Instruction templates for cross-modal records.", no_args_is_help=True)
compose_app = typer.Typer(help="Compose SpeechInstruct records from units.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")
app.add_typer(compose_app, name="compose")

BaseUrl = typer.Option(None, help="OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama…); key from $OPENAI_API_KEY.")
Model = typer.Option(default(settings.LLM, "model"), help="LLM model name at the endpoint.")
MaxRequests = typer.Option(None, help="Most LLM requests this run may make.")
# the tokenizer of the speech a compose command synthesizes (chain-of-modality, dialogue): as extract made the units
SpeechKmeans = typer.Option(None, "--kmeans", parser=_input, help="k-means matching --features (a `cluster` output); not for a codec.")
SpeechFeatures = typer.Option(Features.mfcc, "--features")
SpeechCheckpoint = typer.Option(None, "--checkpoint", parser=_input_name, help="hubert or a codec: checkpoint.")
SpeechCodebooks = typer.Option(None, "--codebooks", min=1, help="codecs: codebooks to keep (as extract was given).")
SpeechLayer = typer.Option(None, "--layer", help="hubert: layer.")
TtsModel = typer.Option(default(settings.ChainOfModality, "tts_model"), "--tts-model", parser=_input_name,
                        help="openai: the endpoint's TTS model; vits: a transformers VitsModel folder.")
Voices = typer.Option(None, "--voices", help="Comma-separated TTS voices to draw from (espeak: en-us, en+f2, …; openai: "
                      "alloy, …; vits: speaker ids 0, 1, …). Default: the engine's own list.")


def _llm(base_url, model, cache_dir, max_requests, required=True, **options):
    from .llm import LLM, LLMError, api_key

    if base_url is None and api_key() is None and not required:
        return None
    try:
        return LLM(base_url=base_url, model=model, cache_dir=cache_dir, max_requests=max_requests, **options)
    except LLMError as e:
        fail(str(e))


@command(templates_app, "generate")
def templates_generate(
    out: Path = typer.Argument(..., parser=_output, help="Template file to write (JSON)."),
    task: str = typer.Option(..., help="asr or tts."),
    n: int = typer.Option(100, help="How many distinct instructions."),
    base_url: Optional[str] = BaseUrl,
    model: str = Model,
    max_requests: Optional[int] = MaxRequests,
    max_tokens: int = typer.Option(default(settings.LLM, "max_tokens"),
                                   help="Longest answer per request; an answer cut off there counts as failed."),
    timeout: float = typer.Option(default(settings.LLM, "timeout"), help="Seconds to wait for one request (local models can be slow)."),
    allow_fewer: bool = typer.Option(False, help="Exit 0 even when fewer than --n usable instructions came back."),
    cache_dir: Optional[Path] = typer.Option(None, parser=_output, help="Cache LLM answers here (default: beside OUT)."),
    quiet: bool = Quiet,
):
    """Ask an LLM for varied task instructions; write a versioned template file. Ends with a line saying how
    many were asked, written and dropped, by reason."""
    from .compose import templates

    llm = _llm(base_url, model, cache_dir or out.parent / ".llm-cache", max_requests, max_tokens=max_tokens, timeout=timeout)
    data = templates.generate(llm, task, n, out, allow_fewer=allow_fewer)  # fewer than asked: exit 2, saying so
    source = data["source"]
    typer.echo(f"asked {n}, wrote {source['written']} {task} templates (version {data['version']}) to {out}; "
               f"dropped {templates.reasons_line(source['dropped'])}")


@command(compose_app, "cross-modal")
def compose_cross_modal(
    units: Path = typer.Argument(..., parser=_input, help="A `quantize` output folder."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for train-*.parquet."),
    mode: str = typer.Option(default(settings.CrossModal, "mode"), help="both (ASR and TTS per utterance), random, asr or tts."),
    asr_fraction: float = typer.Option(default(settings.CrossModal, "asr_fraction"), help="random mode: share of ASR records."),
    asr_templates: Optional[str] = typer.Option(None, parser=_input_name, help="ASR template file (default: shipped set)."),
    tts_templates: Optional[str] = typer.Option(None, parser=_input_name, help="TTS template file (default: shipped set)."),
    prefix_file: Optional[Path] = typer.Option(None, parser=_input, help="System prompt file (default: SpeechGPT-style)."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """ASR (speech→text) and TTS (text→speech) instruction records."""
    from .compose import templates
    from .compose.cross_modal import cross_modal
    from .io import read_text
    from .speechgpt import DEFAULT_PREFIX

    cfg = settings.checked(settings.CrossModal, mode=mode, asr_fraction=asr_fraction)
    prefix = read_text(prefix_file) if prefix_file else DEFAULT_PREFIX
    sets = {t: templates.load(src, t) for t, src in (("asr", asr_templates), ("tts", tts_templates))}
    _print_json(cross_modal(units, out, sets["asr"], sets["tts"], cfg, prefix=prefix, seed=seed, num_shards=num_shards,
                            shard_index=shard_index))


@command(compose_app, "pretrain")
def compose_pretrain(
    units: Path = typer.Argument(..., parser=_input, help="A `quantize` output folder."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for train-*/validation-*/test-*.parquet."),
    dev_fraction: float = typer.Option(default(settings.Pretrain, "dev_fraction"),
                                       help="Share of train utterances also held out for validation."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Stage-1 unit text: one <sosp>…<eosp> per utterance, in its audio's split (train, validation, test)."""
    from .compose.pretrain import pretrain

    _print_json(pretrain(units, out, settings.checked(settings.Pretrain, dev_fraction=dev_fraction), seed=seed,
                         num_shards=num_shards, shard_index=shard_index))


def _speech_maker(out: Path, cache_dir, tts: str, tts_model: str, voices: str | None, rewrite: bool, base_url, model,
                  max_requests, features, checkpoint, layer, codebooks, kmeans, device):
    """(LLM or None, TTS engine, speech tokenizer) for a compose command that speaks text."""
    from .sources.tts import make_tts
    from .units.tokenizer import load_tokenizer

    cache = cache_dir or out / ".cache"
    llm = _llm(base_url, model, cache / "llm", max_requests) if (rewrite or tts == "openai") else None
    engine = make_tts(tts, cache / "tts", llm=llm, model=tts_model,
                      voices=[v.strip() for v in voices.split(",") if v.strip()] if voices else None)
    return llm if rewrite else None, engine, load_tokenizer(features.value, checkpoint, layer, _device(device),
                                                            codebooks=codebooks, kmeans=kmeans)


@command(compose_app, "chain-of-modality")
def compose_chain_of_modality(
    instructions: str = typer.Argument(..., parser=_input_name, help="JSONL/Parquet file, saved HF dataset, hub id, or 'builtin'."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for train-*.parquet."),
    kmeans: Optional[Path] = SpeechKmeans,
    features: Features = SpeechFeatures,
    checkpoint: Optional[str] = SpeechCheckpoint,
    codebooks: Optional[int] = SpeechCodebooks,
    layer: Optional[int] = SpeechLayer,
    tts: str = typer.Option(default(settings.ChainOfModality, "tts"), help="espeak (embedded), openai (the endpoint's /audio/speech) or vits (--tts-model FOLDER)."),
    tts_model: str = TtsModel,
    voices: Optional[str] = Voices,
    rewrite: bool = typer.Option(default(settings.ChainOfModality, "rewrite"), help="Rewrite pairs for speech with the LLM (needs an endpoint)."),
    base_url: Optional[str] = BaseUrl,
    model: str = Model,
    max_requests: Optional[int] = MaxRequests,
    formats: str = typer.Option(",".join(("speech-speech", "speech-text", "text-speech", "text-text")),
                                help="Comma-separated formats to draw from."),
    all_formats: bool = typer.Option(default(settings.ChainOfModality, "all_formats"),
                                     help="Emit every format for every pair (default: one, drawn by seed)."),
    instruction_column: str = typer.Option("instruction"),
    response_column: str = typer.Option("response"),
    id_column: str = typer.Option("id"),
    license: str = typer.Option(default(settings.ChainOfModality, "license"), help="License of the instruction data."),
    max_pairs: Optional[int] = typer.Option(default(settings.ChainOfModality, "max_pairs")),
    cache_dir: Optional[Path] = typer.Option(None, parser=_output, help="TTS/LLM cache (default: OUT/.cache)."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    device: str = typer.Option(default(settings.Features, "device")),
    eval: Optional[list[str]] = EvalSets,
    quiet: bool = Quiet,
):
    """Chain-of-modality dialogues: text pairs → (LLM rewrite) → TTS → units, in four formats."""
    from .compose.chain_of_modality import chain_of_modality

    cfg = settings.checked(settings.ChainOfModality, tts=tts, tts_model=tts_model, rewrite=rewrite,
                           all_formats=all_formats, license=license, max_pairs=max_pairs)
    llm, engine, tokenizer = _speech_maker(out, cache_dir, tts, tts_model, voices, rewrite, base_url, model, max_requests,
                                           features, checkpoint, layer, codebooks, kmeans, device)
    summary = chain_of_modality(
        instructions, out, tokenizer, engine, cfg, llm=llm,
        formats=tuple(f.strip() for f in formats.split(",") if f.strip()), seed=seed,
        instruction_column=instruction_column, response_column=response_column, id_column=id_column,
        eval_texts=_eval_texts(eval))
    _print_json({k: v for k, v in summary.items() if k != "dropped_examples"})


def _eval_texts(sources: Optional[list[str]]):
    """``--eval`` of the compose commands: the evaluation texts pairs and conversations are held to, or None."""
    from .curate.dedup import eval_texts

    return eval_texts(sources) if sources else None


@command(app)
def align(
    manifest: Path = typer.Argument(..., parser=_input, help="A `shard` output folder."),
    out: Path = typer.Argument(..., parser=_output, help="A new shard folder: the same rows, with word timings."),
    model: str = typer.Option(..., parser=_input_name, help="A transformers CTC model folder (wav2vec2 with a character vocabulary), or a hub id."),
    device: str = typer.Option(default(settings.Features, "device")),
    quiet: bool = Quiet,
):
    """Word timings for a corpus that has none: CTC forced alignment of each transcript with a wav2vec2-CTC model
    (for `compose interleaved`). Rows that already have words are kept as they are."""
    from .sources.alignments import CtcAligner, align_manifest

    _print_json(align_manifest(manifest, out, CtcAligner(model, _device(device))))


@command(compose_app, "interleaved")
def compose_interleaved(
    units: Path = typer.Argument(..., parser=_input, help="A units folder (extract --kmeans, quantize, or a codec) whose rows have word "
                                 "alignments (TextGrids beside the corpus audio, lhotse alignments, the demo corpus)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for {split}-*.parquet."),
    min_words: int = typer.Option(default(settings.Interleaved, "min_words"), help="Fewest words in a segment."),
    max_words: int = typer.Option(default(settings.Interleaved, "max_words"), help="Most words in a segment."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Text and speech interleaved at word boundaries (SpiritLM's [TEXT]/[SPEECH]), for stage-1-style pretraining."""
    from .compose.interleaved import interleaved

    cfg = settings.checked(settings.Interleaved, min_words=min_words, max_words=max_words)
    summary = interleaved(units, out, cfg, seed=seed, num_shards=num_shards, shard_index=shard_index)
    _print_json({k: v for k, v in summary.items() if k != "dropped_examples"})


@command(compose_app, "dialogue")
def compose_dialogue(
    conversations: str = typer.Argument(..., parser=_input_name, help="JSONL/Parquet of ShareGPT `conversations` or `messages`, a saved "
                                        "HF dataset, a hub id, or 'builtin' (a shipped sample)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for train-*.parquet."),
    kmeans: Optional[Path] = SpeechKmeans,
    features: Features = SpeechFeatures,
    checkpoint: Optional[str] = SpeechCheckpoint,
    codebooks: Optional[int] = SpeechCodebooks,
    layer: Optional[int] = SpeechLayer,
    tts: str = typer.Option(default(settings.Dialogue, "tts"), help="espeak (embedded), openai (the endpoint's /audio/speech) or vits (--tts-model FOLDER)."),
    tts_model: str = TtsModel,
    voices: Optional[str] = Voices,
    rewrite: bool = typer.Option(default(settings.Dialogue, "rewrite"), help="Rewrite each exchange for speech with the LLM."),
    base_url: Optional[str] = BaseUrl,
    model: str = Model,
    max_requests: Optional[int] = MaxRequests,
    id_column: str = typer.Option("id"),
    license: str = typer.Option(default(settings.Dialogue, "license"), help="License of the conversations."),
    max_dialogues: Optional[int] = typer.Option(default(settings.Dialogue, "max_dialogues")),
    cache_dir: Optional[Path] = typer.Option(None, parser=_output, help="TTS/LLM cache (default: OUT/.cache)."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    device: str = typer.Option(default(settings.Features, "device")),
    eval: Optional[list[str]] = EvalSets,
    quiet: bool = Quiet,
):
    """Multi-turn spoken dialogues: every user turn spoken, every answer in the chain-of-modality way, with
    chat-format `messages` beside SpeechGPT's markup."""
    from .compose.dialogue import dialogue

    cfg = settings.checked(settings.Dialogue, tts=tts, tts_model=tts_model, rewrite=rewrite, license=license,
                           max_dialogues=max_dialogues)
    llm, engine, tokenizer = _speech_maker(out, cache_dir, tts, tts_model, voices, rewrite, base_url, model, max_requests,
                                           features, checkpoint, layer, codebooks, kmeans, device)
    summary = dialogue(conversations, out, tokenizer, engine, cfg, llm=llm, seed=seed, id_column=id_column,
                       eval_texts=_eval_texts(eval))
    _print_json({k: v for k, v in summary.items() if k != "dropped_examples"})


@command(compose_app, "duplex")
def compose_duplex(
    conversations: str = typer.Argument(..., parser=_input_name, help="Conversations as `compose dialogue` reads them "
                                        "(JSONL/Parquet, a saved HF dataset, a hub id, or 'builtin')."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder: audio/{id}.wav + .json, duplex.jsonl, stats.jsonl."),
    tts: str = typer.Option(default(settings.Duplex, "tts"), help="espeak: its word events time every word."),
    voices: Optional[str] = Voices,
    max_conversations: Optional[int] = typer.Option(default(settings.Duplex, "max_conversations")),
    sample_rate: int = typer.Option(default(settings.Duplex, "sample_rate"), help="Hz (Mimi: 24000)."),
    gap_mean: float = typer.Option(default(settings.Duplex, "gap_mean"), help="Mean seconds from one turn's end to the "
                                   "next's start (negative: overlap)."),
    gap_sd: float = typer.Option(default(settings.Duplex, "gap_sd"), help="Their standard deviation."),
    interruption_rate: float = typer.Option(default(settings.Duplex, "interruption_rate"),
                                            help="Share of overlapping turns that interrupt."),
    backchannel_rate: float = typer.Option(default(settings.Duplex, "backchannel_rate"),
                                           help="Backchannels per second of the other's turns over 2.5 s."),
    seed: int = typer.Option(default(settings.Compose, "seed")),
    tts_model: str = TtsModel,
    kmeans: Optional[Path] = SpeechKmeans,
    features: Optional[Features] = typer.Option(None, "--features", help="Also a duplex config of both channels' "
                                                "units: a codec (e.g. mimi, with --checkpoint), or features with --kmeans."),
    checkpoint: Optional[str] = SpeechCheckpoint,
    codebooks: Optional[int] = SpeechCodebooks,
    layer: Optional[int] = SpeechLayer,
    device: str = typer.Option(default(settings.Features, "device")),
    quiet: bool = Quiet,
):
    """Full-duplex spoken conversations for Moshi-style models, in moshi-finetune's layout: stereo WAV (left the
    assistant, right the user) with word alignments, gaps, overlaps, interruptions and backchannels; with a
    tokenizer, also a duplex config of both channels' units."""
    from .compose.duplex import duplex
    from .sources.tts import make_tts
    from .units.tokenizer import load_tokenizer

    cfg = settings.checked(settings.Duplex, max_conversations=max_conversations, sample_rate=sample_rate,
                           gap_mean=gap_mean, gap_sd=gap_sd, interruption_rate=interruption_rate,
                           backchannel_rate=backchannel_rate)
    if tts != "espeak":
        fail(f"--tts {tts}: compose duplex needs word timings from the TTS itself, which only espeak gives")
    engine = make_tts(tts, None, model=tts_model, voices=[v.strip() for v in voices.split(",")] if voices else None)
    tokenizer = load_tokenizer(features.value, checkpoint, layer, _device(device), codebooks=codebooks,
                               kmeans=kmeans) if features else None
    summary = duplex(conversations, out, engine, cfg, seed=seed, tokenizer=tokenizer)
    _print_json({k: v for k, v in summary.items() if k != "dropped_examples"})


@command(app)
def publish(
    compose_dir: Path = typer.Argument(..., parser=_input, help="Folder with cross_modal/, chain_of_modality/, pretrain/ from `compose`."),
    out: Path = typer.Argument(..., parser=_output, help="Dataset folder to write (Parquet + README.md card)."),
    name: str = typer.Option("SpeechInstruct", help="Dataset name for the card."),
    push_to_hub: Optional[str] = typer.Option(None, help="Also upload to this Hugging Face dataset repo (needs a token)."),
    save_to_disk: bool = typer.Option(False, help="Also write OUT/arrow/{config} for datasets.load_from_disk."),
    eval_splits: bool = typer.Option(default(settings.Output, "eval_splits"), "--eval-splits/--train-only",
                                     help="Publish records from the corpora's dev/test audio as validation/test splits, or leave them out."),
    format: str = typer.Option("hf", help="hf (the dataset), or hf,speechgpt: also SpeechGPT's own training files "
                               "in OUT/speechgpt/stage{1,2,3}/ (train.txt/dev.txt, SpeechInstruct_*.jsonl)."),
    quiet: bool = Quiet,
):
    """Write composed records as a Hugging Face dataset with a dataset card."""
    from .release.publish import publish as run_publish

    formats = {f.strip() for f in format.split(",") if f.strip()}
    if not formats <= {"hf", "speechgpt"} or not formats:
        fail(f"--format {format!r}: choose hf or hf,speechgpt")
    meta = run_publish(compose_dir, out, settings.checked(settings.Output, eval_splits=eval_splits), name=name,
                       push_to_hub=push_to_hub, save_to_disk=save_to_disk, speechgpt_files="speechgpt" in formats)
    _print_json({"dataset": str(out), "k": meta["k"], "counts": meta["counts"], "hours": meta["hours"],
                 **({"speechgpt_files": meta["speechgpt_files"]} if "speechgpt_files" in meta else {})})


def _judge_options(dnsmos: bool, asr: Optional[str], base_url: Optional[str], batch_size: Optional[int],
                   speaker: Optional[str] = None, references: Optional[Path] = None, language: bool = False,
                   asr_dtype: str = "auto") -> dict:
    """The arguments of ``Judge.load`` (but the device) that score's options name."""
    if references and not speaker:
        speaker = "resemblyzer"  # references mean speaker similarity: the default encoder
    if not (dnsmos or asr or speaker or language):
        fail("nothing to score with: give --dnsmos, --asr MODEL, --speaker or --language")
    return {"dnsmos": dnsmos, "asr": asr, "base_url": base_url, "batch_size": batch_size, "speaker": speaker,
            "references": references, "language": language, "asr_dtype": asr_dtype}


@command(app)
def score(
    ctx: typer.Context,
    source: Path = typer.Argument(..., parser=_input, help="A `shard` output (manifest-*.parquet) or a units folder (units-*.parquet)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for scores-*.parquet, errors-*.jsonl, score.json, summary.json."),
    dnsmos: bool = typer.Option(False, "--dnsmos", help="DNSMOS P.835 (OVRL, SIG, BAK) and P.808, with the ONNX "
                                "models inside the speechmos wheel (no download)."),
    asr: Optional[str] = typer.Option(None, parser=_input_name, help="ASR round trip: a transformers ASR folder (Whisper, Moonshine, "
                                      "wav2vec2/Parakeet CTC) or hub id; or a model name at --base-url (`openai`: whisper-1)."),
    base_url: Optional[str] = typer.Option(None, help="An OpenAI-compatible server: score POSTs each clip to "
                                           "{base-url}/audio/transcriptions (key from $OPENAI_API_KEY)."),
    root: Optional[Path] = typer.Option(None, parser=_input, help="Corpus root (default: the one recorded by `shard` or `extract`)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    batch_size: Optional[int] = typer.Option(default(settings.Quality, "batch_size"), min=1, help="ASR: clips per "
                                             "forward pass (default: 64 on a GPU, halved where they do not fit; 8 on the CPU)."),
    asr_dtype: str = typer.Option(default(settings.Quality, "asr_dtype"), help="ASR weights: auto (bfloat16 on a "
                                  "GPU, float32 on the CPU), float32, bfloat16 or float16."),
    workers: Optional[int] = typer.Option(None, min=1, help="Audio decoding threads (default: every usable CPU when "
                                          "a judge runs on a GPU, else 2); the Ray engine decodes in Ray tasks."),
    speaker: Optional[str] = typer.Option(None, "--speaker", parser=_input_name, help="Speaker embeddings "
                                          "(embeddings-NNNNN.npy, float16, row for row with the scores): "
                                          "`resemblyzer` (GE2E, its weights in its wheel) or a transformers x-vector "
                                          "model folder or hub id."),
    speaker_references: Optional[Path] = typer.Option(None, parser=_input, help="A folder of reference recordings, "
                                                      "SPEAKER.wav each: speaker_similarity is each utterance's cosine "
                                                      "to its speaker's (implies --speaker resemblyzer)."),
    language: bool = typer.Option(False, "--language", help="Language ID of each transcript (langid, in its "
                                  "package) and, with --asr, of the audio (a Whisper model's language token)."),
    engine: Optional[str] = Engine,
    ray_address: Optional[str] = RayAddress,
    actors: int = Actors,
    num_gpus_per_actor: float = GpusPerActor,
    cpus_per_actor: float = CpusPerActor,
    block_seconds: Optional[float] = typer.Option(default(settings.Ray, "block_seconds"), min=0.001,
                                                  help="ray: seconds of audio per work block (default: 600)."),
    max_retries: int = MaxRetries,
    num_shards: int = NumShards,
    shard_index: int = ShardIndex,
    quiet: bool = Quiet,
):
    """Score every utterance: DNSMOS, the WER and CER of an ASR round trip, speaker embeddings and similarity,
    language; resumable per shard."""
    from .curate.score import score as run_score, score_ray
    from .judges.judge import Judge

    options = _judge_options(dnsmos, asr, base_url, batch_size, speaker, speaker_references, language, asr_dtype)
    inferred: list[str] = []
    if _engine(ctx, engine, ray_address, inferred) == "ray":  # each actor loads the judges on its own device
        summary = score_ray(source, out, options, root=root, num_shards=num_shards, shard_index=shard_index,
                            device=device, actors=actors, num_gpus_per_actor=num_gpus_per_actor,
                            cpus_per_actor=cpus_per_actor, address=ray_address, block_seconds=block_seconds,
                            max_retries=max_retries)
    else:
        summary = run_score(source, out, Judge.load(**options, device=_device(device)), root=root,
                            num_shards=num_shards, shard_index=shard_index, workers=workers)
    for column in summary["scores"].values():
        column.pop("histogram", None)
    _print_json(summary | ({"inferred": inferred} if inferred else {}))


@command(app)
def validate(
    dataset: Path = typer.Argument(..., parser=_input, help="A published dataset, a units/manifest folder, or one Parquet file."),
    k: Optional[int] = typer.Option(None, help="Number of units (default: from the dataset's metadata)."),
    max_errors: int = typer.Option(50, help="Per-record errors to list."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    quiet: bool = Quiet,
):
    """Check every record against schemas/ and SpeechInstruct's rules; exit 1 when anything fails."""
    from .release.validate import format_report, validate as run_validate

    report = run_validate(dataset, k=k, max_examples=max_errors)
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else format_report(report))
    raise typer.Exit(0 if report.ok else 1)


@command(app)
def report(
    dataset: Path = typer.Argument(..., parser=_input, help="A published dataset."),
    out: Path = typer.Argument(..., parser=_output, help="Folder for index.html and the PNG plots."),
    units: Optional[Path] = typer.Option(None, parser=_input, help="A units folder (quantize output): its utterances' original "
                                         "audio goes into the report to listen to."),
    vocoder: Optional[Path] = typer.Option(None, parser=_input, help="Resynthesise the samples: a unit HiFi-GAN (g_00500000 + "
                                           "config.json) or, as a preview, an MFCC k-means folder."),
    samples: int = typer.Option(4, min=0, help="How many utterances to put in the listening table."),
    work: Optional[Path] = typer.Option(None, parser=_input, help="The `run` workdir that built the dataset: adds what each stage "
                                        "dropped and why, the stage timings and the speech-quality scores."),
    asr: Optional[str] = typer.Option(None, parser=_input_name, help="Transcribe each resynthesised sample with this ASR model (as `score "
                                      "--asr`) and give its WER: how much of the words the units keep."),
    base_url: Optional[str] = typer.Option(None, help="--asr at an OpenAI-compatible /audio/transcriptions server."),
    quiet: bool = Quiet,
):
    """An HTML report with plots: hours, durations, unit usage, units/s, record counts, text lengths, and
    samples to listen to (original and resynthesised, with their mel-cepstral distance)."""
    from .judges.asr import load_asr
    from .release.report import report as run_report
    from .units.codecs import codec_of

    voice = _load_vocoder(vocoder, dataset) if vocoder else codec_of(units) if units else None
    if asr and voice is None:
        fail("--asr scores the resynthesised samples: give --vocoder too")
    judge = load_asr(asr, base_url=base_url, device=_device("auto")) if asr else None
    result = run_report(dataset, out, units=units, vocoder=voice, samples=samples, work=work, asr=judge)
    extra = f", {result['samples']} samples" if result.get("samples") else ""
    mcd = f", resynthesis MCD {result['resynthesis_mcd_db']} dB" if "resynthesis_mcd_db" in result else ""
    mcd += f", resynthesis WER {result['resynthesis_wer']}" if "resynthesis_wer" in result else ""
    typer.echo(f"report: {result['page']} ({len(result['plots'])} plots{extra}{mcd})")


@command(app)
def run(
    recipe: Path = typer.Argument(..., parser=_input, help="A recipe YAML, e.g. recipes/mini.yaml."),
    workdir: Optional[Path] = typer.Option(None, parser=_output, help="Override the recipe's workdir."),
    force: bool = typer.Option(False, help="Redo every stage even when up to date."),
    quiet: bool = Quiet,
):
    """Run the whole job: shard → (score) → extract → cluster → quantize → compose → publish → validate → report."""
    from .pipeline import run as run_recipe

    summary = run_recipe(recipe, workdir=workdir, force=force)
    _print_json(summary)
    if not summary["valid"]:
        raise typer.Exit(1)


@command(app)
def train(
    stage: int = typer.Option(..., help="1: modality adaptation, 2: cross-modal instructions, 3: chain-of-modality (LoRA)."),
    base_model: str = typer.Option(..., parser=_input_name, help="A causal LM folder (or hub id): the base, or the previous stage's model/."),
    data: Path = typer.Option(..., parser=_input, help="A dataset written by `speechinstruct publish`."),
    out: Path = typer.Option(..., parser=_output, help="Output folder: model/ (or adapter/), checkpoints/, log.jsonl."),
    config: Optional[Path] = typer.Option(None, parser=_input, help="Settings YAML (default: SpeechGPT's, the packaged recipes/train-stage{N}.yaml)."),
    epochs: Optional[float] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None, help="Global micro-batch over all processes."),
    grad_accum: Optional[int] = typer.Option(None),
    max_steps: Optional[int] = typer.Option(None),
    block_size: Optional[int] = typer.Option(None, help="Stage 1 block size."),
    max_length: Optional[int] = typer.Option(None, help="Stages 2/3 maximum sequence length."),
    mask: Optional[str] = typer.Option(None, help="No loss over: prefix (SpeechGPT's default), prompt (answer-only "
                                       "loss), assistant (loss on every [SpeechGPT] turn only) or none."),
    configs: Optional[str] = typer.Option(None, help="Dataset configs to train on, comma-separated (default: the stage's; "
                                          "stage 3 with dialogues: chain_of_modality,dialogue)."),
    lora_targets: Optional[str] = typer.Option(None, help="Stage 3: comma-separated layer names (default: peft's for the model)."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping (SpeechGPT/Trainer: 1.0; 0 turns it off)."),
    eval_every: Optional[int] = typer.Option(None, help="Evaluate on the validation split every N steps (always at the end)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Stage 3: also save the merged model."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                          help="Recompute activations in the backward pass (less memory)."),
    attention: Optional[str] = typer.Option(None, help="The attention kernel: sdpa (default), eager or flash_attention_2."),
    pack: Optional[bool] = typer.Option(None, "--pack/--no-pack", help="Stages 2 and 3: each batch's examples end to "
                                        "end in rows of --max-length tokens, attention within each example."),
    save_every: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the latest checkpoint in OUT."),
    quiet: bool = Quiet,
):
    """Fine-tune a causal LM on a published SpeechInstruct dataset (stages 1–3), with SpeechGPT's settings."""
    from .io import read_yaml
    from .model.train import TrainConfig, settings_for_stage, train as run_train

    if stage not in (1, 2, 3):
        fail(f"--stage must be 1, 2 or 3, got {stage}")
    if config:
        settings = read_yaml(config, "training settings") or {}
        if not isinstance(settings, dict):
            fail(f"{config}: training settings must be a YAML mapping")
    else:
        settings = settings_for_stage(stage)
    overrides = dict(epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
                     block_size=block_size, max_length=max_length, mask=mask, max_grad_norm=max_grad_norm,
                     eval_every=eval_every, merge=merge, save_every=save_every, seed=seed, configs=configs,
                     gradient_checkpointing=gradient_checkpointing, attention=attention, pack=pack,
                     lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig.from_dict(settings, str(config) if config else f"stage {stage}'s training settings")
    result = run_train(stage, base_model, data, out, cfg, resume=resume)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one summary, not one a process (`accelerate launch`)
        _print_json({k: v for k, v in result.items() if k != "history"} | {"last": result["history"][-1:] })


@command(app)
def chat(
    model: Path = typer.Option(..., parser=_input, help="A trained model folder (model/ or merged/), or the base with --lora."),
    lora: Optional[Path] = typer.Option(None, parser=_input, help="A stage-3 adapter/ folder."),
    text: Optional[str] = typer.Option(None, help="Say this (text input)."),
    audio_file: Optional[Path] = typer.Option(None, "--audio", parser=_input, help="Say this recording (audio input → units)."),
    kmeans: Optional[Path] = typer.Option(None, parser=_input, help="For --audio: the dataset's k-means (not for codec units)."),
    features: Features = typer.Option(Features.mfcc, help="For --audio: the dataset's features (or its codec)."),
    checkpoint: Optional[str] = typer.Option(None, parser=_input_name),
    layer: Optional[int] = typer.Option(None),
    codebooks: Optional[int] = typer.Option(None, min=1, help="Codec units: the dataset's codebooks (for --audio with "
                                            "a codec and for a codec --vocoder)."),
    max_new_tokens: int = typer.Option(256),
    sample: bool = typer.Option(False, "--sample", help="Sample as SpeechGPT's cli_infer.py does (temperature 0.7, "
                                "top-p 0.8, top-k 50, at least 10 new tokens); default: greedy, the same answer each time."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (implies --sample)."),
    top_p: Optional[float] = typer.Option(None, help="Sample from the smallest set of tokens this likely (implies --sample)."),
    top_k: Optional[int] = typer.Option(None, help="Sample from this many likeliest tokens, 0: all (implies --sample)."),
    seed: Optional[int] = typer.Option(None, min=0, max=2**32 - 1, help="Seed the sampling: the same answers again."),
    prompt: str = typer.Option("chain_of_modality", help="Prompt format: chain_of_modality (stage 3's records), "
                               "cross_modal (stage 2's) or speechgpt-cli (SpeechGPT's cli_infer.py template)."),
    prefix_file: Optional[Path] = typer.Option(None, parser=_input, help="System prompt file (default: SpeechGPT's)."),
    device: str = typer.Option("auto"),
    vocoder: Optional[Path] = typer.Option(None, parser=_input, help="A unit HiFi-GAN (fairseq g_00500000 + config.json, or its "
                                           "folder), or the dataset's codec folder, to speak the unit answer."),
    speak: Optional[Path] = typer.Option(None, parser=_output, help="With --vocoder: write the spoken unit answer here (.wav)."),
    history: Optional[Path] = typer.Option(None, parser=_input, help="A JSON file of the dialogue so far ([{input, answer}, …]; "
                                           "created when missing): each reply sees it, and is added to it."),
    quiet: bool = Quiet,
):
    """Generate a reply to text or an audio file; prints the answer split into text question, text answer and
    unit answer (as SpeechGPT's cli_infer.py). Reads stdin lines when neither --text nor --audio is given."""
    from .io import read_text
    from .model.chat import Chat, audio_to_unit_text
    from .speechgpt import DEFAULT_PREFIX
    from .units.tokenizer import load_tokenizer

    if bool(vocoder) != bool(speak):
        fail("--vocoder and --speak go together: the vocoder speaks the unit answer into the --speak wav")
    sampling = _sampling(sample, temperature, top_p, top_k)
    voice = _load_vocoder(vocoder) if vocoder else None
    if voice is not None and codebooks is not None:  # a codec speaks the units of the codebooks trained on
        voice.keep(codebooks)
    prefix = read_text(prefix_file) if prefix_file else DEFAULT_PREFIX
    bot = Chat(model, lora, _device(device), prefix=prefix, kind=prompt)
    inputs: list[str] = []
    if audio_file:
        tokenizer = load_tokenizer(features.value, checkpoint, layer, codebooks=codebooks, kmeans=kmeans)
        inputs.append(audio_to_unit_text(audio_file, tokenizer))
    if text:
        inputs.append(text)
    if not inputs:
        inputs = (line.strip() for line in sys.stdin if line.strip())
    past = _read_history(history) if history else None
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    for user_input in inputs:
        answer = bot.reply(user_input, max_new_tokens=max_new_tokens, sampling=sampling,
                           history=[(turn["input"], turn["answer"]) for turn in past or []])
        if answer.get("history_left_out"):
            typer.secho(f"note: the {answer['history_left_out']} earliest exchanges of the history did not fit the "
                        "model's context and were left out of the prompt (the file keeps them)", err=True)
        if past is not None:
            from .io import write_json

            past.append({"input": user_input, "answer": answer["answer"]})
            write_json(history, past)
        if voice is not None:
            from . import audio

            if answer["units"]:
                audio.write_wav(speak, voice.synthesize(answer["units"]), voice.sample_rate)
                answer["spoken"] = str(speak)
            else:
                answer["spoken"] = None  # nothing to say: the answer has no units
                typer.secho("note: the answer has no unit part to speak", err=True)
        _print_json(answer)


def _sampling(sample: bool, temperature: float | None, top_p: float | None, top_k: int | None) -> dict | None:
    """chat's sampling settings: SpeechGPT's (cli_infer.py), with what the options change; None: greedy. A sampling
    option without ``--sample`` means sampling (said in a note)."""
    from .model.chat import SPEECHGPT_SAMPLING

    if temperature is not None and not 0 < temperature < float("inf"):
        fail(f"--temperature must be a finite number above 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        fail(f"--top-p must be above 0 and at most 1, got {top_p}")
    if top_k is not None and top_k < 0:
        fail(f"--top-k must be 0 (off) or more, got {top_k}")
    given = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    if given and not sample:
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        typer.secho(f"note: {names} impl{'y' if len(given) > 1 else 'ies'} --sample", err=True)
    return {**SPEECHGPT_SAMPLING, **given} if sample or given else None


def _read_history(path: Path) -> list[dict]:
    """``chat --history``: the exchanges so far, or one line naming the file when it is not what chat writes."""
    if not path.exists():
        return []
    try:
        turns = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read the chat history ({e})")
    except RecursionError:
        fail(f"{path}: cannot read the chat history (JSON nested too deeply)")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("input"), str)
                                              and isinstance(t.get("answer"), str) for t in turns):
        fail(f"{path}: a chat history is a JSON list of {{\"input\": …, \"answer\": …}} objects")
    return turns


def _load_vocoder(path, units_of=None):
    """The vocoder at ``path``; a codec is set to the codebooks of the units in ``units_of`` (a units folder or a
    dataset) and refused for another tokenizer's units."""
    from .shardfiles import folder_vocabulary
    from .units.vocoder import load_vocoder

    voice = load_vocoder(path)
    if units_of is not None and Path(units_of).is_dir():
        voice.fit(folder_vocabulary(units_of))
    return voice


@command(app)
def resynth(
    source: Path = typer.Argument(..., parser=_input, help="A units folder, compose folder or published dataset (or one .parquet)."),
    out: Path = typer.Argument(..., parser=_output, help="Output folder for NNNNN.wav and manifest.jsonl."),
    vocoder: Optional[Path] = typer.Option(None, parser=_input, help="A unit HiFi-GAN: fairseq's generator checkpoint (g_00500000) "
                                           "with its config.json beside it, or their folder; an MFCC k-means folder for "
                                           "the embedded preview (centroids -> Griffin-Lim, not SpeechGPT's vocoder); or "
                                           "a codec folder. Default for codec units: the codec that made them; for MFCC "
                                           "k-means units: the preview of their k-means."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many wavs."),
    quiet: bool = Quiet,
):
    """Units back to speech: a wav for each unit record (units, cross-modal ASR/TTS speech, chain-of-modality
    \\[ua] answers, pretrain lines) with a manifest."""
    from .units.vocoder import default_vocoder, record_files, resynthesize

    record_files(source)  # none there: said before the vocoder is looked for
    voice = _load_vocoder(vocoder, source) if vocoder else default_vocoder(source)
    if voice is None:
        fail(f"{source}: give --vocoder: its units are neither a codec's (which decodes them itself) nor MFCC units "
             "whose k-means is still where their units.json names it (whose preview voices them; a published dataset "
             "does not say where)")
    _print_json(resynthesize(source, out, voice, limit=limit))


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
