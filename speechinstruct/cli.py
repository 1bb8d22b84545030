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


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
