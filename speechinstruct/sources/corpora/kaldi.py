"""Kaldi data directories: ``wav.scp`` (``<recording-id> <path>``), optional ``segments`` (``<utt-id>
<recording-id> <start> <end>``, seconds), ``text`` (``<utt-id> <transcript>``) and ``utt2spk``.

ROOT is one data directory or a folder of them (``data/train``, ``data/dev_clean`` …); the split is the
directory's name (``dev*``/``test*`` are dev/test, anything else train). Without ``segments`` every
recording is one utterance. ``wav.scp`` entries that are commands are never run. A command that only decodes
one file, unchanged, is read as that file (:func:`piped_file`): ``flac -c -d -s x.flac |`` (Kaldi's LibriSpeech
recipe), ``sph2pipe -f wav -p -c 1 x.sph |`` (WSJ; Switchboard, one side of a call: the row's ``channel``),
``sox x.mp3 -t wav -r 16k - |`` (format, rate, bits, encoding, mono: what every stage does to audio anyway). Any
other command, and archive offsets (``x.ark:123``), are counted skips saying so: convert such audio to files
first. Relative paths are resolved from the current folder,
as Kaldi resolves them from its recipe folder. The manifest stores paths relative to ``audio_root``: by
default the deepest folder holding every listed file (:func:`audio_root`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from ...progress import progress
from .base import Item, Skip, deepest_common_folder, probe, split_of

NAME = "kaldi"


def data_dirs(root: Path) -> list[Path]:
    if (root / "wav.scp").is_file():
        return [root]
    found = sorted(p.parent for p in root.glob("*/wav.scp"))
    if not found:
        raise FileNotFoundError(f"{root}: no wav.scp here or in a subfolder: not a Kaldi data directory")
    return found


def _table(path: Path, min_fields: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a Kaldi table file: whitespace-separated, the key first."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (editors on Windows) is not part of the first key
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < min_fields:
            raise ValueError(f"{path}:{n}: expected at least {min_fields} fields, got {line!r}")
        yield n, fields


def _file_entries(root: Path) -> Iterator[str]:
    for folder in data_dirs(root):
        for _, fields in _table(folder / "wav.scp", 2):
            entry = " ".join(fields[1:])
            if entry.endswith("|"):  # a command that only decodes a file: that file
                if (piped := piped_file(entry)) is not None:
                    yield piped[0]
            elif len(fields) == 2:
                yield entry


def audio_root(root: str | Path, audio_root: str | Path | None = None, **_) -> Path:
    """The folder manifest paths are relative to: ``audio_root`` when given, else the deepest folder that
    holds every file ``wav.scp`` lists (relative entries resolved from the current folder)."""
    if audio_root is not None:
        return Path(audio_root).resolve()
    return deepest_common_folder(_file_entries(Path(root)), Path(root))


def read(root: str | Path, audio_root: str | Path | None = None, license: str | None = None) -> Iterator[Item]:
    root = Path(root)
    base = Path(audio_root or ".").resolve()
    license = license or "unknown (Kaldi data directories carry none: pass --license)"
    for folder in data_dirs(root):
        yield from _read_dir(folder, base, license)


def _read_dir(folder: Path, base: Path, license: str) -> Iterator[Item]:
    part = folder.name
    recordings: dict[str, str] = {}
    for n, fields in _table(folder / "wav.scp", 2):
        recordings[fields[0]] = " ".join(fields[1:])
    texts = {f[0]: " ".join(f[1:]) for _, f in _table(folder / "text", 1)} if (folder / "text").is_file() else {}
    speakers = {f[0]: f[1] for _, f in _table(folder / "utt2spk", 2)} if (folder / "utt2spk").is_file() else {}
    if (folder / "segments").is_file():
        segments = []
        for n, f in _table(folder / "segments", 4):
            try:
                start, end = float(f[2]), float(f[3])
            except ValueError:
                yield Skip(f"{folder.name}/segments:{n}", "malformed segments line", " ".join(f))
                continue
            segments.append((n, f[0], f[1], start, end))
    else:
        segments = [(None, rec, rec, 0.0, None) for rec in recordings]
    probed: dict[str, tuple[str, int, float] | Skip] = {}
    for n, utt, rec, start, end in progress(segments, desc=f"kaldi {part}", unit="utt"):
        where = f"{folder.name}/segments:{n}" if n is not None else f"{folder.name}/wav.scp: {rec}"
        if rec not in recordings:
            yield Skip(where, "recording not in wav.scp", rec)
            continue
        if rec not in probed:
            probed[rec] = _probe(recordings[rec], base, f"{folder.name}/wav.scp: {rec}")
        found = probed[rec]
        if isinstance(found, Skip):
            yield found if n is None else Skip(where, found.reason, found.detail)
            continue
        rel, sr, seconds, channel = found
        end = seconds if end is None or end < 0 else end  # Kaldi's end -1 means "to the end"
        if not 0 <= start < end <= seconds + 0.01:
            yield Skip(where, "segment outside its recording", f"{start}-{end} s of a {seconds:.3f} s file")
            continue
        yield {
            "id": f"kaldi/{part}/{utt}", "path": rel, "offset": start, "duration": min(end, seconds) - start,
            "sample_rate": sr, "text": " ".join(texts[utt].split()) if texts.get(utt, "").strip() else None,
            "speaker": speakers.get(utt, "unknown"), "corpus": NAME, "license": license, "channel": channel,
            "split": split_of(part), "corpus_split": part,
        }


def piped_file(command: str) -> tuple[str, int | None] | None:
    """(the file, the 1-based channel it picks or None) that a ``wav.scp`` command (``… |``) only decodes: unchanged
    but for what every stage does anyway (resampling, mixing to mono); None for any other command. Nothing is run.
    Its first program decodes the file: ``flac -c -d -s F`` (Kaldi's LibriSpeech), ``sph2pipe [-f wav] [-p] [-c N]
    F`` (WSJ, Switchboard), ``sox F [-t T] [-r R] [-b B] [-e E] [-c 1] -``, ``ffmpeg -i F [-ar R] [-ac 1]
    [-map_channel 0.0.C] [-f wav] pipe:1`` (lhotse's export to Kaldi); programs after it may only convert what they
    read (``| ffmpeg -i pipe:0 -ar 16000 -f wav pipe:1``, ``| sox -t wav - -t wav -r 8k -``). A program may be
    named by its path (``$KALDI_ROOT/tools/sph2pipe_v2.5/sph2pipe``)."""
    import shlex

    lexer = shlex.shlex(command.rstrip().removesuffix("|"), posix=True, punctuation_chars="|;&<>")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote
        return None
    stages, stage = [], []
    for word in words:
        if word == "|":
            stages.append(stage)
            stage = []
        elif set(word) <= set("|;&<>"):  # a redirection, another command, a background job
            return None
        else:
            stage.append(word)
    stages.append(stage)
    found = [_decodes(stage) for stage in stages]
    if any(f is None for f in found) or found[0][0] == "-" or any(f[0] != "-" for f in found[1:]):
        return None  # the first reads a file, every later one what the one before it wrote
    if any(channel not in (None, 1) for _, channel in found[1:]):
        return None  # a later one picks a channel of what it reads: not the first's channel
    return found[0]


def _decodes(words: list[str]) -> tuple[str, int | None] | None:
    """(its input: a file, or "-" for what it reads; the 1-based channel it picks or None) of one program that only
    decodes or converts audio, or None."""
    if len(words) < 2:
        return None
    program, args = os.path.basename(words[0]), words[1:]
    if program == "flac":  # -c -d -s, or together (-cds), or spelt out
        files = [a for a in args if not a.startswith("-") or a == "-"]
        long = {"--stdout": "c", "--decode": "d", "--silent": "s", "--totally-silent": "s"}
        letters = "".join(long.get(a, "?" if a.startswith("--") else a[1:]) for a in args if a not in files)
        return (files[0], None) if len(files) == 1 and "d" in letters and set(letters) <= set("cdsf") else None
    takes = {  # each option with the values it may take (None: any): those that leave the audio as it is
        "sph2pipe": {"-f": ("wav", "rif"), "-c": ("1", "2"), "-p": ()},
        "sox": {"-t": None, "-r": None, "-b": None, "-e": None, "-c": ("1",), "-q": (), "-V0": (), "-V1": ()},
        "ffmpeg": {"-i": None, "-threads": None, "-ar": None, "-ac": ("1",), "-f": ("wav",), "-map_channel": None,
                   "-y": (), "-nostdin": (), "-hide_banner": (), "-loglevel": None, "-v": None, "-acodec": ("pcm_s16le",),
                   "-c:a": ("pcm_s16le",)},
    }.get(program)
    if takes is None:
        return None
    given, plain = {}, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in takes and takes[arg] == ():  # a flag
            i += 1
            continue
        if arg in takes:  # an option and its value
            if i + 1 >= len(args) or (takes[arg] is not None and args[i + 1] not in takes[arg]):
                return None
            given[arg] = args[i + 1]
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            return None  # sph2pipe -t b:e (a time range), -u (mu-law), ffmpeg -af (a filter)…: not the audio as it is
        plain.append(arg)
        i += 1
    if program == "sph2pipe":  # sph2pipe [options] FILE [options] (lhotse puts the file first): to stdout
        return (plain[0], int(given["-c"]) if "-c" in given else None) if len(plain) == 1 else None
    if program == "sox":  # sox INPUT … OUTPUT, the output stdout ("-"); anything after it would be an effect
        return (plain[0], None) if len(plain) == 2 and plain[1] == "-" and args[-1] == "-" else None
    # ffmpeg -i INPUT … OUTPUT: stdout (pipe:1 or -); pipe:0 or - is what it reads
    source, channel = given.get("-i"), given.get("-map_channel")
    if source is None or len(plain) != 1 or plain[0] not in ("pipe:1", "-") or (
            channel is not None and not re.fullmatch(r"0\.0\.\d+", channel)):
        return None
    return ("-" if source in ("pipe:0", "pipe:", "-") else source), (int(channel.split(".")[-1]) + 1 if channel else None)


def _probe(entry: str, base: Path, where: str) -> tuple[str, int, float, int | None] | Skip:
    channel = None
    if entry.rstrip().endswith("|"):
        piped = piped_file(entry)
        if piped is None:
            return Skip(where, "wav.scp entry is a command (not run)", f"{entry!r}: convert this audio to a file first")
        entry, channel = piped
    elif len(entry.split()) > 1:
        return Skip(where, "wav.scp entry is not a file path", repr(entry))
    elif ":" in entry and Path(entry.rsplit(":", 1)[0]).suffix == ".ark":
        return Skip(where, "wav.scp entry is an archive offset (not read)", f"{entry!r}: extract it to a file first")
    path = Path(os.path.abspath(entry))
    found = probe(path, base)
    if isinstance(found, Skip):
        return Skip(where, found.reason, found.detail or str(path))
    sr, seconds = found
    index = file_channel(path, channel)
    if isinstance(index, str):
        return Skip(where, "wav.scp entry picks a channel the file lacks", index)
    return os.path.relpath(path, base).replace(os.sep, "/"), sr, seconds, index


def file_channel(path: Path, channel: int | None) -> int | None | str:
    """The manifest's ``channel`` (0-based) for a command that picks ``channel`` (1-based) of ``path``: None where
    it picks none or the file has one, or why the file cannot give it."""
    from ... import audio

    if channel is None or (channels := audio.channels(path)) == 1 and channel == 1:
        return None
    if channel > channels:
        return f"channel {channel} of a {channels}-channel file"
    return channel - 1
