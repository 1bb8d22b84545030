"""``speechinstruct dedup UNITS OUT``: repeats and evaluation data out of the training utterances.

A stage between quantize and compose; it reads units folders (k-means or codec units alike) and writes units
folders of the same layout without the dropped rows, so compose reads them as it reads ``quantize``'s. Each
training row is checked, in this order (the first reason that holds is the one recorded):

1. **evaluation text**: its transcript shares a word n-gram (13 by default, as GPT-3's decontamination and
   datatrove's do) with an evaluation text, or equals a whole evaluation text shorter than n words (words:
   lower case, punctuation removed). Evaluation texts are the ``eval`` sources (text files, JSONL, manifest or
   units folders, or a corpus folder as ``NAME=PATH`` in any layout ``shard`` reads) and, always, the
   ``validation`` and ``test`` rows of every input folder, across corpora;
2. **evaluation audio**: its units are a near duplicate (below) of an evaluation utterance's;
3. **speaker** (with ``speaker_disjoint``): its speaker also speaks in an evaluation split of the same corpus
   (reported whether or not they are dropped);
4. **exact duplicate**: the same unit sequence as a row kept, or (``audio_hash``) the same 16 kHz samples;
5. **near duplicate**: MinHash of its unit n-grams (``ngram`` units, ``num_perm`` permutations; datasketch's
   ``MinHash``, and the bands of its ``MinHashLSH`` for ``threshold``, in :func:`candidate_pairs`) finds candidate
   rows whose estimated Jaccard similarity is at least ``threshold``, and each candidate pair counts as a duplicate when the two unit sequences are at least
   ``similarity`` alike by normalised Levenshtein similarity (rapidfuzz). Units of re-encoded audio share few
   exact n-grams but stay in order: on MFCC units (K=100) of espeak-ng sentences, MP3, Opus, resampled and 10 %
   shorter copies measured 0.78-1.0 while distinct sentences reached at most 0.61, where their n-gram Jaccard
   overlapped (copies from 0.27, distinct sentences up to 0.38). Each group of duplicates keeps one: the best
   DNSMOS when ``scores`` are given, else the smallest id;
6. **repeated transcript** (with ``max_per_transcript``): at most that many rows per normalised transcript,
   distinct speakers first.

Evaluation rows are never dropped. ``OUT/dropped-NNNNN.jsonl`` lists each dropped row with its reason and the id
it duplicates or matches; ``OUT/dedup.json`` has the counts per reason, what was checked against, example
groups, and the speakers found in both training and evaluation splits.

Memory: per row, its MinHash signature (``num_perm`` × 4 bytes), its units (2 bytes each below 65,536 units,
to verify candidates), what the decisions need of it (id, split, speaker, transcript) and one band's keys at a
time (8 bytes); the rows' other columns are read a shard at a time. Signatures are cached per shard (``OUT/.signatures``), so a rerun
(or one after a kill) does not compute them again; the output shards are written atomically, every run anew
(the decisions are global: a setting changed may change any shard), and an output shard whose input is gone is
removed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .. import recipe as settings
from ..io import atomic_path, iter_rows, read_json, write_json, write_parquet, write_text
from ..shardfiles import check_kind

EVAL_SPLITS = ("validation", "test")
COLUMNS = ("id", "text", "speaker", "corpus", "split", "units")
MAX_EXAMPLES = 20


# ------------------------------------------------------------------------------------------- texts
def words(text: str | None) -> list[str]:
    """A transcript as words for matching: lower case, punctuation and symbols removed (apostrophes kept)."""
    return re.sub(r"[^\w\s']|_", " ", (text or "").lower()).replace("'", "").split()


def _ngram_keys(tokens: list[str], n: int) -> set[str]:
    return {" ".join(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


class EvalTexts:
    """Evaluation texts as word n-grams: :meth:`match` says which evaluation text a training text shares an
    n-gram with (or equals, when that evaluation text is shorter than n words)."""

    def __init__(self, n: int = 13):
        self.n = n
        self.grams: dict[str, str] = {}   # n-gram → where it comes from
        self.short: dict[str, str] = {}   # a whole short text → where
        self.count = 0

    def add(self, text: str | None, where: str) -> None:
        tokens = words(text)
        if not tokens:
            return
        self.count += 1
        if len(tokens) < self.n:
            self.short.setdefault(" ".join(tokens), where)
        for gram in _ngram_keys(tokens, self.n):
            self.grams.setdefault(gram, where)

    def match(self, text: str | None) -> tuple[str, str] | None:
        """(the shared n-gram or text, where it comes from), or None."""
        tokens = words(text)
        if not tokens:
            return None
        whole = " ".join(tokens)
        if whole in self.short:
            return whole, self.short[whole]
        for gram in _ngram_keys(tokens, self.n):
            if gram in self.grams:
                return gram, self.grams[gram]
        return None


# ------------------------------------------------------------------------------------------- units
def ngram_hashes(units, n: int) -> np.ndarray:
    """32-bit hashes of the unit n-grams of one sequence (the whole sequence when it is shorter than n), each
    n-gram's units combined by a polynomial hash modulo 2**64, then folded to 32 bits."""
    u = np.asarray(units, dtype=np.uint64)
    if u.size == 0:
        return np.zeros(0, np.uint32)
    n = min(n, u.size)
    windows = np.lib.stride_tricks.sliding_window_view(u, n)
    powers = np.uint64(1_000_003) ** np.arange(n, dtype=np.uint64)  # wraps modulo 2**64, as intended
    with np.errstate(over="ignore"):
        h = (windows * powers).sum(axis=1, dtype=np.uint64)
    return np.unique(((h >> np.uint64(32)) ^ h).astype(np.uint32))


class Signer:
    """MinHash signatures of unit n-gram sets with datasketch (its affine32 scheme; one set of permutations for
    all, so equal sets give equal signatures)."""

    def __init__(self, ngram: int = 5, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash

        self.ngram, self.num_perm, self.seed = ngram, num_perm, seed
        self._permutations = MinHash(num_perm=num_perm, seed=seed).permutations

    def signature(self, units) -> np.ndarray:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=int, permutations=self._permutations,
                    scheme="affine32")
        m.update_batch(ngram_hashes(units, self.ngram).tolist())
        return m.hashvalues.astype(np.uint32)


def compact(units) -> np.ndarray:
    """A unit sequence in the fewest bytes that hold it (2 per unit below 65,536)."""
    u = np.asarray(units, dtype=np.int64)
    return u.astype(np.uint16 if (not u.size or u.max() < 65536) else np.uint32)


def unit_hash(units) -> bytes:
    return hashlib.sha1(np.asarray(units, dtype=np.int64).tobytes()).digest()[:12]


def candidate_pairs(matrix: np.ndarray, threshold: float, largest: int = 64):
    """(i, j) rows of a (rows, num_perm) signature matrix that LSH makes candidates at ``threshold``: the bands and
    rows per band datasketch's ``MinHashLSH`` chooses (its ``_optimal_param``), each band's values combined into
    one 64-bit key per row and the rows sorted by it, so equal keys sit together (8 bytes per row and band, one
    band at a time, where ``MinHashLSH`` keeps a dictionary entry per row and band: 10 kB per utterance measured).
    A bucket of more than ``largest`` rows pairs each with its neighbour and with the bucket's first row."""
    import itertools

    from datasketch.lsh import _optimal_param

    bands, per_band = _optimal_param(threshold, matrix.shape[1], 0.5, 0.5)
    seen: set[tuple[int, int]] = set()
    for band in range(bands):
        key = np.zeros(len(matrix), np.uint64)
        with np.errstate(over="ignore"):
            for column in range(band * per_band, (band + 1) * per_band):
                key = key * np.uint64(0x9E3779B97F4A7C15) + matrix[:, column].astype(np.uint64)
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], len(ordered)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = sorted(order[start:end].tolist())
            pairs = itertools.combinations(members, 2) if len(members) <= largest else \
                itertools.chain(zip(members, members[1:]), ((members[0], m) for m in members[2:]))
            for pair in pairs:
                if pair not in seen:
                    seen.add(pair)
                    yield pair


# ------------------------------------------------------------------------------------------- groups
class UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = collections.defaultdict(list)
        for a in self.parent:
            out[self.find(a)].append(a)
        return [sorted(g) for g in out.values() if len(g) > 1]


@dataclass(slots=True)
class Row:
    """What the decisions need of a row; the rest stays on disk."""

    id: str
    split: str
    corpus: str
    speaker: str | None
    text: str | None
    units_hash: bytes
    audio_hash: bytes | None = None
    dnsmos: float | None = None

    @property
    def is_eval(self) -> bool:
        return self.split in EVAL_SPLITS


# ------------------------------------------------------------------------------------------- inputs
def _unit_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("units-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no units-*.parquet files: dedup reads a quantize or extract --kmeans output")
    return [check_kind(f, "units", "quantize") for f in files]


def _checked_rows(path: Path, columns: tuple[str, ...]):
    """The ``columns`` of each row of a units file, each as the units schema has them; a row that is not (another
    tool's, or a hand edit: a null id or units, a negative unit, a split no corpus has) is one line naming the file
    and row, since dedup decides over every row together."""
    from .. import records

    for number, row in enumerate(iter_rows(path, columns=list(columns))):
        problem = records.columns_problem("units", row, columns)
        if problem:
            raise ValueError(f"{path} row {number}: not a units row ({problem}); dedup decides over every row "
                             "together: mend or remove it")
        yield row


def _signatures(path: Path, signer: Signer, cache: Path) -> dict[str, np.ndarray]:
    """id → signature of one units file, cached beside the output (keyed by the file's size, time and the
    signer's settings), so a rerun reads them back."""
    stat = path.stat()
    key = hashlib.sha1(json.dumps([path.name, stat.st_size, stat.st_mtime_ns, signer.ngram, signer.num_perm,
                                   signer.seed]).encode()).hexdigest()[:16]
    cached = cache / f"{path.stem}-{key}.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as data:
            return dict(zip(data["ids"].tolist(), data["signatures"]))
    ids, sigs = [], []
    for row in _checked_rows(path, ("id", "units")):
        ids.append(row["id"])
        sigs.append(signer.signature(row["units"]))
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.array(ids, dtype=str), signatures=np.array(sigs, dtype=np.uint32).reshape(len(ids), -1))
    for old in _cached(cache, re.escape(path.stem)):  # the file's signatures before it changed: never read again
        if old != cached:
            old.unlink(missing_ok=True)
    return dict(zip(ids, sigs))


def _cached(cache: Path, stem: str = r"[^/]+") -> list[Path]:
    """The signature files in ``cache`` (of the units file ``stem``: a regular expression)."""
    return [p for p in cache.glob("*.npz") if re.fullmatch(rf"{stem}-[0-9a-f]{{16}}\.npz", p.name)] if cache.is_dir() else []


def _dnsmos(scores: Path | None) -> dict[str, float]:
    if scores is None:
        return {}
    out = {}
    for path in sorted(Path(scores).glob("scores-*.parquet")):
        for row in iter_rows(path, columns=["id", "dnsmos_ovrl"]):
            if row["dnsmos_ovrl"] is not None:
                out[row["id"]] = float(row["dnsmos_ovrl"])
    return out


def _audio_hashes(path: Path, folder: Path) -> dict[str, bytes]:
    """id → sha1 of each row's decoded 16 kHz samples (``audio_hash``); a row whose audio cannot be used has
    none. Audio that storage failed to give for a while stops dedup (one line, nothing written): it decides over
    every row together, so a rerun does it all again once the storage is back."""
    from ..shardfiles import read_units_spec
    from ..sources.decoding import MayPass, audio_columns, check_root, decode_rows

    root = (read_units_spec(folder) or {}).get("root")
    if not root:
        raise ValueError(f"{folder / 'units.json'}: no corpus root recorded; --audio-hash decodes each row's audio")
    rows = list(iter_rows(path, columns=audio_columns(path)))
    hashes, passing = {}, []
    for row, wav in decode_rows(rows, check_root(Path(root), folder)):
        if isinstance(wav, MayPass):
            passing.append(wav)
        elif not isinstance(wav, str):
            hashes[row["id"]] = hashlib.sha1(np.asarray(wav, np.float32).tobytes()).digest()[:12]
    if passing:
        raise OSError(f"{path}: the audio of {len(passing)} utterance{'s' * (len(passing) > 1)} could not be read for a "
                      f"reason that may pass (first: {passing[0]}); dedup decides over every row together, so nothing "
                      "is written: run it again when the storage is back")
    return hashes


def eval_source(source: str) -> tuple[str, Path]:
    """(corpus name, path) of an evaluation source: ``NAME=PATH`` names a corpus folder in the layout ``shard`` reads
    as NAME, unless a file or folder of that whole name is there; anything else is a path, with no name."""
    name, _, folder = source.partition("=") if "=" in source and not Path(source).exists() else ("", "", source)
    return name, Path(folder)


def read_eval(sources: Iterable[str], texts: EvalTexts, signer: Signer | None) -> tuple[dict, dict, list[dict]]:
    """Evaluation texts into ``texts``, and (with a ``signer``) the signatures and units of evaluation units
    (``eval:SOURCE:ID``) from each source: a text file (a line each), a JSONL file (the text fields of each object), a manifest or
    units folder, or ``NAME=PATH``: a corpus folder in the layout ``shard`` reads as NAME. Returns also what was
    read from each source, for the summary."""
    import tempfile

    signatures: dict[str, np.ndarray] = {}
    sequences: dict[str, np.ndarray] = {}
    described = []
    for source in sources:
        before = texts.count
        name, path = eval_source(source)
        if name:
            from ..sources.shard import shard_corpus

            with tempfile.TemporaryDirectory() as tmp:
                shard_corpus(name, path, Path(tmp) / "m")
                for f in sorted((Path(tmp) / "m").glob("manifest-*.parquet")):
                    for row in iter_rows(f, columns=["id", "text"]):
                        texts.add(row["text"], f"{source}: {row['id']}")
        elif path.is_dir():
            units = sorted(path.glob("units-*.parquet"))
            signed = bool(units) and signer is not None
            for f in units or sorted(path.glob("manifest-*.parquet")):
                check_kind(f, "units" if units else "manifest", "quantize" if units else "shard")
                for row in iter_rows(f, columns=["id", "text", "units"] if signed else ["id", "text"]):
                    texts.add(row["text"], f"{path.name}: {row['id']}")
                    if signed:
                        signatures[f"eval:{path.name}:{row['id']}"] = signer.signature(row["units"])
                        sequences[f"eval:{path.name}:{row['id']}"] = compact(row["units"])
            if not units and not list(path.glob("manifest-*.parquet")):
                raise FileNotFoundError(f"{path}: no units-*.parquet or manifest-*.parquet: give an evaluation set as "
                                        "a text or JSONL file, a manifest or units folder, or NAME=PATH (a corpus)")
        elif path.is_file():
            _read_eval_file(path, texts)
        else:
            raise FileNotFoundError(f"{source}: no such evaluation file or folder")
        described.append({"source": source, "texts": texts.count - before,
                          "utterances": sum(1 for k in signatures if k.startswith(f"eval:{path.name}:"))})
    return signatures, sequences, described


def eval_texts(sources: Iterable[str], units_dirs: Iterable[str | Path] = (), n: int = 13) -> EvalTexts:
    """The evaluation texts composed instructions and dialogues are held to: ``sources`` (as ``dedup``'s ``eval``)
    and the validation and test rows of the units folders ``units_dirs``."""
    texts = EvalTexts(n)
    read_eval(sources, texts, None)
    for folder in units_dirs:
        for path in sorted(Path(folder).glob("units-*.parquet")):
            for row in iter_rows(path, columns=["id", "text", "split", "corpus"]):
                if row["split"] in EVAL_SPLITS:
                    texts.add(row["text"], f"{row['corpus']} {row['split']}: {row['id']}")
    return texts


EVAL_TEXT_KEYS = ("text", "transcript", "sentence", "instruction", "response", "question", "answer", "prompt",
                  "completion", "input", "output")


def _read_eval_file(path: Path, texts: EvalTexts) -> None:
    from ..io import parse_json_object

    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{path.name}:{lineno}"
        obj = parse_json_object(line) if path.suffix in (".jsonl", ".json") and line.strip().startswith("{") else line
        if isinstance(obj, str):  # a line of text, or one that is not JSON after all: its words are what is held out
            texts.add(line, where)
            continue
        for key in EVAL_TEXT_KEYS:
            if isinstance(obj.get(key), str):
                texts.add(obj[key], where)
        messages = obj.get("messages")
        for message in messages if isinstance(messages, list) else []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                texts.add(message["content"], where)


# ------------------------------------------------------------------------------------------- the stage
OWN_FILES = r"units-[^/]+\.parquet|dropped-[^/]+\.jsonl|units\.json|dedup\.json"  # in OUT (io.claim_outputs)


def dedup(inputs: list[str | Path] | str | Path, outs: list[str | Path] | str | Path, cfg: settings.Dedup | None = None,
          scores: list[str | Path | None] | str | Path | None = None, seed: int = 1, num_shards: int = 1,
          shard_index: int = 0) -> dict:
    """Deduplicate and decontaminate the units folders ``inputs`` together, each into its ``outs`` folder (see the
    module docstring; ``cfg``: the recipe's ``dedup`` section, its defaults when None); returns the summary (also
    ``OUT/dedup.json`` in each). With ``num_shards`` > 1 (job-array tasks) this task only computes and caches the
    signatures of its shards; one run without them then decides and writes, reading the cache."""
    cfg = cfg or settings.Dedup()
    inputs = [Path(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    outs = [Path(p) for p in (outs if isinstance(outs, (list, tuple)) else [outs])]
    scores = list(scores) if isinstance(scores, (list, tuple)) else [scores] * len(inputs)
    if len(outs) != len(inputs) or len(scores) != len(inputs):
        raise ValueError("dedup: one output folder (and one scores folder, or none) per units folder")
    used = {**cfg.model_dump(exclude={"eval"}), "eval": list(cfg.eval), "seed": seed}  # the order dedup.json had
    signer, texts = Signer(cfg.ngram, cfg.num_perm, seed), EvalTexts(cfg.eval_ngram)
    eval_signatures, eval_units, checked = read_eval(used["eval"], texts, signer)

    from ..io import claim_outputs, remove_stale_temps, wrote_before
    from ..shardfiles import select_shards

    for folder, out in zip(inputs, outs):  # never a file dedup did not write: not the input's, not the user's
        if out.resolve() == folder.resolve():
            raise ValueError(f"{out}: the output folder is the units folder; dedup writes the kept rows into a folder "
                             "of their own (over its input, the rows it drops would be lost)")
        claim_outputs(out, "dedup", OWN_FILES, wrote_before(out / "dedup.json", {"inputs", "settings", "kept"}))
    if num_shards > 1:
        mine = [(path, out) for folder, out in zip(inputs, outs) for path in select_shards(_unit_files(folder), num_shards, shard_index)]
        for path, out in mine:
            _signatures(path, signer, out / ".signatures")
        return {"signatures_of_shards": len(mine), "next": "run dedup without --num-shards to decide and write"}
    for out in outs:  # a killed run's half-written files
        if out.is_dir():
            remove_stale_temps(out)
    signatures: dict[str, np.ndarray] = dict(eval_signatures)
    sequences: dict[str, np.ndarray] = dict(eval_units)
    rows, files = read_inputs(inputs, outs, scores, signer, signatures, sequences, cfg.audio_hash)
    for r in rows.values():  # the inputs' own validation and test rows are evaluation texts, always
        if r.is_eval:
            texts.add(r.text, f"{r.corpus} {r.split}: {r.id}")

    dropped, examples, overlap = decide(rows, signatures, sequences, signer, texts, cfg.threshold, cfg.similarity,
                                        cfg.max_per_transcript, cfg.speaker_disjoint)
    counts = collections.Counter(reason for reason, _ in dropped.values())
    summary = {"inputs": [str(p.resolve()) for p in inputs], "settings": used,
               "checked_against": {"eval_sources": checked, "eval_split_rows": sum(r.is_eval for r in rows.values()),
                                   "eval_texts": texts.count},
               "utterances": len(rows), "kept": len(rows) - len(dropped), "dropped": dict(sorted(counts.items())),
               "speakers_in_train_and_eval": overlap, "examples": examples,
               "bytes_per_utterance": cfg.num_perm * 4 + round(sum(s.nbytes for s in sequences.values()) / max(1, len(sequences)))}
    for folder, out in zip(inputs, outs):  # the units' vocabulary and provenance, as quantize wrote them
        out.mkdir(parents=True, exist_ok=True)
        if (folder / "units.json").is_file():
            with atomic_path(out / "units.json") as tmp:
                shutil.copyfile(folder / "units.json", tmp)
    for path, _, out in files:
        _write_shard(path, out, dropped)
    for out in set(outs):  # shards of inputs no longer there, and their signatures
        made = {p.name for p, _, o in files if o == out}
        for old in [*out.glob("units-*.parquet"), *out.glob("dropped-*.jsonl")]:
            if old.name.replace("dropped-", "units-").replace(".jsonl", ".parquet") not in made:
                old.unlink()
        for old in _cached(out / ".signatures"):
            if old.name.rsplit("-", 1)[0] + ".parquet" not in made:
                old.unlink()
    for out in set(outs):
        write_json(out / "dedup.json", summary)
    return summary


class Decisions:
    """What ``decide`` finds: id → (reason, what it duplicates or matches) of each training row dropped (the first
    reason that holds), and a few examples per reason. Evaluation rows are never dropped."""

    def __init__(self, rows: dict[str, Row]):
        self.rows, self.dropped = rows, {}
        self.examples: dict[str, list] = collections.defaultdict(list)

    def drop(self, uid: str, reason: str, of: str) -> None:
        if uid not in self.dropped and not self.rows[uid].is_eval:
            self.dropped[uid] = (reason, of)
            if len(self.examples[reason]) < MAX_EXAMPLES:
                self.examples[reason].append({"id": uid, "of": of})


def read_inputs(inputs: list[Path], outs: list[Path], scores: list, signer: Signer, signatures: dict,
                sequences: dict, audio_hash: bool) -> tuple[dict[str, Row], list[tuple[Path, Path, Path]]]:
    """What the decisions need of every row of the units folders ``inputs`` (id → :class:`Row`, its signature into
    ``signatures``, its units into ``sequences``), and (input file, its folder, output folder) per shard."""
    from ..progress import progress

    rows: dict[str, Row] = {}
    files: list[tuple[Path, Path, Path]] = []
    for folder, out, score_dir in zip(inputs, outs, scores):
        dnsmos = _dnsmos(Path(score_dir) if score_dir else None)
        for path in progress(_unit_files(folder), desc=f"dedup {folder.name}", unit="shard"):
            files.append((path, folder, out))
            signatures.update(_signatures(path, signer, out / ".signatures"))
            audio = _audio_hashes(path, folder) if audio_hash else {}
            for r in _checked_rows(path, COLUMNS):
                if r["id"] in rows:
                    raise ValueError(f"{path}: id {r['id']!r} is in an earlier row too (of this file or another "
                                     "input): dedup needs unique ids")
                rows[r["id"]] = Row(r["id"], r["split"], r["corpus"], r.get("speaker"), r.get("text"),
                                    unit_hash(r["units"]), audio.get(r["id"]), dnsmos.get(r["id"]))
                sequences[r["id"]] = compact(r["units"])
    return rows, files


def decide(rows: dict[str, Row], signatures: dict[str, np.ndarray], sequences: dict[str, np.ndarray], signer: Signer,
           texts: EvalTexts, threshold: float, similarity: float, max_per_transcript: int | None, speaker_disjoint: bool):
    """id → (reason, what it duplicates or matches) for every training row dropped, example groups per reason,
    and the speakers found in training and evaluation splits of one corpus: the steps of the module docstring."""
    decisions = Decisions(rows)
    for uid in sorted(rows):  # 1. text shared with an evaluation text
        found = None if rows[uid].is_eval else texts.match(rows[uid].text)
        if found:
            decisions.drop(uid, "evaluation text", f"{found[1]} ({found[0]!r})")
    near, exact = duplicate_groups(rows, signatures, sequences, signer, threshold, similarity)
    shared = _speakers_in_both(rows, decisions if speaker_disjoint else None)  # 3., before the groups' keepers
    _resolve_groups(near, exact, rows, decisions)  # 2., 4. and 5.
    if max_per_transcript:  # 6.
        _cap_transcripts(rows, decisions, max_per_transcript)
    return decisions.dropped, dict(decisions.examples), [{"corpus": c, "speaker": s} for c, s in shared]


def duplicate_groups(rows: dict[str, Row], signatures: dict[str, np.ndarray], sequences: dict[str, np.ndarray],
                     signer: Signer, threshold: float, similarity: float) -> tuple[UnionFind, UnionFind]:
    """(near, exact): rows joined when their units (or decoded audio) are equal, and, in ``near`` also, when LSH
    makes them candidates and their unit sequences are at least ``similarity`` alike (Levenshtein)."""
    from rapidfuzz.distance import Levenshtein

    near, exact = UnionFind(), UnionFind()
    seen: dict[tuple[str, bytes], str] = {}
    for uid in sorted(rows):
        for kind, key in (("units", rows[uid].units_hash), ("audio", rows[uid].audio_hash)):
            if key is not None:
                first = seen.setdefault((kind, key), uid)
                if first != uid:
                    exact.union(uid, first)
                    near.union(uid, first)
    ids = sorted(signatures)
    matrix = np.stack([signatures[uid] for uid in ids]) if ids else np.zeros((0, signer.num_perm), np.uint32)
    for a, b in candidate_pairs(matrix, threshold):
        uid, other = ids[a], ids[b]
        if near.find(uid) != near.find(other) and \
                Levenshtein.normalized_similarity(sequences[uid], sequences[other]) >= similarity:
            near.union(uid, other)
    return near, exact


def _speakers_in_both(rows: dict[str, Row], decisions: Decisions | None) -> list[tuple[str, str]]:
    """(corpus, speaker) of the speakers in both training and evaluation splits of one corpus; with
    ``decisions``, their training rows are dropped."""
    eval_speakers = {(r.corpus, r.speaker) for r in rows.values() if r.is_eval and r.speaker not in (None, "", "unknown")}
    train = [r for r in rows.values() if not r.is_eval and (r.corpus, r.speaker) in eval_speakers]
    for r in sorted(train, key=lambda r: r.id) if decisions is not None else []:
        decisions.drop(r.id, "speaker in an evaluation split", f"{r.corpus}: {r.speaker}")
    return sorted({(r.corpus, r.speaker) for r in train})


def _resolve_groups(near: UnionFind, exact: UnionFind, rows: dict[str, Row], decisions: Decisions) -> None:
    """A group with an evaluation utterance drops its training rows; any other keeps one (the best DNSMOS, else
    the smallest id) of the rows still kept and drops the rest as exact or near duplicates of it."""
    for group in near.groups():
        evals = [g for g in group if g.startswith("eval:") or rows[g].is_eval]
        train = [g for g in group if g in rows and not rows[g].is_eval]
        if evals:
            for g in train:
                decisions.drop(g, "evaluation audio", evals[0])
            continue
        alive = [g for g in train if g not in decisions.dropped]
        if len(alive) < 2:
            continue
        keep = min(alive, key=lambda g: (-(rows[g].dnsmos if rows[g].dnsmos is not None else -1e9), g))
        for g in alive:
            if g != keep:
                decisions.drop(g, "exact duplicate" if exact.find(g) == exact.find(keep) else "near duplicate", keep)


def _cap_transcripts(rows: dict[str, Row], decisions: Decisions, limit: int) -> None:
    """At most ``limit`` kept training rows per normalised transcript, distinct speakers first."""
    by_text: dict[str, list[str]] = collections.defaultdict(list)
    for uid in sorted(rows):
        said = words(rows[uid].text) if uid not in decisions.dropped and not rows[uid].is_eval else []
        if said:
            by_text[" ".join(said)].append(uid)
    for group in by_text.values():
        for uid in _spread_over_speakers(group, rows)[limit:]:
            decisions.drop(uid, "repeated transcript", group[0])


def _spread_over_speakers(group: list[str], rows: dict[str, Row]) -> list[str]:
    """The rows of one transcript in the order they are kept: one per speaker in turn (speakers in order of first
    appearance), so the first N kept are N distinct speakers where there are N."""
    by_speaker: dict[str | None, list[str]] = {}
    for uid in group:
        by_speaker.setdefault(rows[uid].speaker, []).append(uid)
    queues = list(by_speaker.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def _write_shard(path: Path, out: Path, dropped: dict[str, tuple[str, str]]) -> None:
    """``out/units-NNNNN.parquet`` without the dropped rows (same schema), and ``dropped-NNNNN.jsonl`` beside it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..shardfiles import made_from

    suffix = path.stem.split("-", 1)[1]
    target = out / path.name
    gone = []
    kept = []
    table = pq.read_table(path)
    for i, uid in enumerate(table.column("id").to_pylist()):
        if uid in dropped:
            reason, of = dropped[uid]
            gone.append({"id": uid, "reason": reason, "duplicate_of": of})
        else:
            kept.append(i)
    write_text(out / f"dropped-{suffix}.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gone))
    write_parquet(target, table.take(pa.array(kept, pa.int64())), made_from(path))  # the input's metadata; its own record


def read_summary(folder: str | Path) -> dict | None:
    """``dedup.json`` of a units folder dedup wrote (for the card and the report), or None."""
    path = Path(folder) / "dedup.json"
    return read_json(path) if path.is_file() else None
