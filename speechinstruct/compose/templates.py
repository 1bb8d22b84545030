"""Task instructions for cross-modal records: the shipped offline sets, or sets an LLM writes.

A template file is JSON: ``{"format": "speechinstruct-templates", "version", "task", "source",
"templates": [{"id", "text"}, …]}``. The shipped sets (``data/templates_{asr,tts}.txt``, written by this
project) have ids ``builtin-asr-000`` ….
"""

from __future__ import annotations

import collections
import difflib
import functools
import hashlib
import json
import re
from importlib import resources
from pathlib import Path

from ..io import read_json, write_json
from ..speechgpt import find_markup

TASKS = ("asr", "tts")
BUILTIN_VERSION = "builtin-1"
FORMAT = "speechinstruct-templates"

_DESCRIPTIONS = {
    "asr": "speech recognition: the user gives a recording and asks for its transcript",
    "tts": "speech synthesis: the user gives a sentence and asks for it to be spoken aloud",
}


def builtin(task: str) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose asr or tts")
    lines = resources.files("speechinstruct.data").joinpath(f"templates_{task}.txt").read_text().splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    return {"format": FORMAT, "version": BUILTIN_VERSION, "task": task, "source": {"kind": "builtin"},
            "templates": [{"id": f"builtin-{task}-{i:03d}", "text": t} for i, t in enumerate(texts)]}


def load(source: str | Path | None, task: str) -> dict:
    """``None`` or ``"builtin"`` → the shipped set; otherwise a template file written by ``generate``."""
    if source in (None, "builtin"):
        return builtin(task)
    path = Path(source)
    try:
        data = read_json(path, dict, f"; not a {task} template file")
    except OSError as e:
        raise ValueError(f"{path}: not a readable template file ({e})") from None
    templates = data.get("templates")
    if data.get("format") != FORMAT or data.get("task") != task or not isinstance(data.get("version"), str) \
            or not isinstance(templates, list) or not templates:
        raise ValueError(f"{path}: not a {task} template file (format {FORMAT!r}, task {task!r}, a version, non-empty "
                         "templates)")
    for i, template in enumerate(templates):
        if not (isinstance(template, dict) and isinstance(template.get("id"), str)
                and isinstance(template.get("text"), str) and template["text"].strip()):
            raise ValueError(f"{path}: templates[{i}] is not an object with an id and a text (strings)")
    check_markup(data, path)
    return data


def check_markup(data: dict, where) -> None:
    """Refuse a template set any of whose texts holds record markup (it would end up in every record)."""
    for template in data["templates"]:
        mark = find_markup(str(template.get("text", "")))
        if mark:
            raise ValueError(f"{where}: template {template.get('id')} holds record markup {mark!r}; remove it")


def _normal(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower()).strip()


def is_near_duplicate(text: str, kept: list[str], threshold: float = 0.85) -> bool:
    n = _normal(text)
    return any(n == _normal(k) or difflib.SequenceMatcher(None, n, _normal(k)).ratio() >= threshold for k in kept)


def parse_instructions(answer: str) -> list[str]:
    """Instructions from an LLM answer: a JSON list (possibly inside a code fence or an object), or one
    per line with bullets, numbers and quotes stripped."""
    text = answer.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [])
        if isinstance(data, list):
            return [str(x.get("text", "") if isinstance(x, dict) else x).strip() for x in data if x]
    except (ValueError, RecursionError):
        pass
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*", "", line).strip().strip('"“”\'').strip()
        if line and not line.endswith(":") and len(line.split()) >= 2:
            out.append(line)
    return out


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def real_word_share(text: str, language: str = "en") -> float:
    """The share of ``text``'s words that are words of ``language``, by pyspellchecker's word list (kept
    with the package, offline)."""
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return 0.0
    return len(_spellchecker(language).known(words)) / len(set(words))


@functools.cache
def _spellchecker(language: str):
    from spellchecker import SpellChecker

    return SpellChecker(language=language)


MIN_REAL_WORDS = 0.8


def rejection(text: str, language: str = "en") -> str | None:
    """Why an instruction is not usable (a sentence of sensible length, no placeholders, no record markup,
    mostly real words of the language), or None."""
    words = text.split()
    if not 2 <= len(words) <= 40 or len(text) > 300:
        return "length"
    if "{" in text or "\n" in text:
        return "placeholder or line break"
    if find_markup(text):
        return "record markup"
    if real_word_share(text, language) < MIN_REAL_WORDS:
        return "not real words"
    return None


def generate(llm, task: str, n: int = 100, out: str | Path | None = None, max_rounds: int = 10,
             language: str = "en", allow_fewer: bool = False) -> dict:
    """Ask ``llm`` for ``n`` varied, distinct instructions for ``task``; write a versioned template file.
    Answers cut off at max_tokens count as failed; instructions that fail ``rejection`` or repeat one already
    kept are dropped. The result's ``source`` says how many were asked, written and dropped by reason; with
    fewer than ``n`` written, ``FewerThanAsked`` is raised (after writing the file) unless ``allow_fewer``."""
    from ..llm import TruncatedAnswer

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose asr or tts")
    kept: list[str] = []
    dropped: collections.Counter[str] = collections.Counter()
    for round_ in range(max_rounds):
        if len(kept) >= n:
            break
        want = min(50, n - len(kept) + 10)
        avoid = "\n".join(f"- {k}" for k in kept[-30:])
        messages = [
            {"role": "system", "content": "You write short, varied user instructions for a dataset. Answer with a JSON list of strings only."},
            {"role": "user", "content": (
                f"Write {want} different instructions a user might give an assistant for {_DESCRIPTIONS[task]}. "
                "Vary wording, politeness, length and sentence type. Do not include the input itself; it is appended "
                "after the instruction as 'This is input: …'."
                + (f"\nAlready have (do not repeat or paraphrase closely):\n{avoid}" if avoid else "")
            )},
        ]
        try:
            answer = llm.complete(messages, seed=round_)
        except TruncatedAnswer:
            dropped["answer cut off (max_tokens)"] += 1
            continue
        for text in parse_instructions(answer):
            reason = rejection(text, language) or ("near duplicate" if is_near_duplicate(text, kept) else None)
            if reason:
                dropped[reason] += 1
                continue
            kept.append(text)
            if len(kept) >= n:
                break
    source = {"kind": "llm", **llm.describe(), "requested": n, "written": len(kept), "dropped": dict(sorted(dropped.items()))}
    if not kept:
        raise FewerThanAsked(f"the LLM returned no usable instructions (asked {n}; dropped {reasons_line(dropped)})")
    version = "llm-" + hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]
    data = {"format": FORMAT, "version": version, "task": task, "source": source,
            "templates": [{"id": f"{version}-{task}-{i:03d}", "text": t} for i, t in enumerate(kept)]}
    if out:
        write_json(out, data)
    if len(kept) < n and not allow_fewer:
        raise FewerThanAsked(f"asked {n}, wrote {len(kept)}{f' to {out}' if out else ''}, dropped "
                             f"{reasons_line(dropped)}; rerun with --allow-fewer to accept fewer")
    return data


def reasons_line(dropped: dict) -> str:
    """``{"near duplicate": 2, "length": 1}`` → ``"1 length, 2 near duplicate"``."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())) or "none"


class FewerThanAsked(ValueError):
    """Fewer usable instructions than asked for (the message gives the counts)."""
