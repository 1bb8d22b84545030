"""SpeechGPT's record format, in one place: how each record kind is written, how it is read back, which text
counts as markup, and the prompts a trained model is asked with (see the README's Records section).

Writers: :func:`cross_modal_text` (ASR and TTS instructions), :func:`com_text` (the four chain-of-modality
formats) and :func:`dialogue_text` / :func:`dialogue_messages` (multi-turn dialogues), after :data:`SPEECHGPT_PREFIX`. Parsers: :data:`SHAPES`, one regular expression per task or format,
which ``validate`` holds every record to. :data:`MARKUP`: what no text field may carry. :data:`PROMPTS` and
:func:`parse_answer`: ``chat``'s side, as SpeechGPT's ``cli_infer.py`` builds and splits them;
:data:`RESPONSE_MARK` and :func:`with_bos`: ``train``'s side (where the loss starts, and the BOS token).
"""

from __future__ import annotations

import re

UNIT_RE = re.compile(r"<(\d+)>")

# SpeechGPT's system prompt, byte for byte as in its released records and cli_infer.py ("a intrinsic", two
# spaces after "University.", "with human" included): a model continued from SpeechGPT expects exactly this.
SPEECHGPT_PREFIX = (
    "You are an AI assistant whose name is SpeechGPT.\n"
    "- SpeechGPT is a intrinsic cross-modal conversational language model that is developed by Fudan University.  "
    "SpeechGPT can understand and communicate fluently with human through speech or text chosen by the user.\n"
    "- It can perceive cross-modal inputs and generate cross-modal outputs.\n"
)
DEFAULT_PREFIX = SPEECHGPT_PREFIX
FORMATS = ("speech-speech", "speech-text", "text-speech", "text-text")


# ------------------------------------------------------------------------------------------- unit string
def to_text(units) -> str:
    """``[661, 588]`` → ``<sosp><661><588><eosp>``."""
    return "<sosp>" + "".join(f"<{int(u)}>" for u in units) + "<eosp>"


def from_text(text: str) -> list[int]:
    """Inverse of ``to_text`` (``<sosp><eosp>`` is the empty sequence); raises ValueError for anything that
    is not one well-formed unit string."""
    if not (text.startswith("<sosp>") and text.endswith("<eosp>")):
        raise ValueError(f"not a unit string (must start with <sosp> and end with <eosp>): {text[:40]!r}")
    body = text[len("<sosp>") : -len("<eosp>")]
    units = [int(u) for u in UNIT_RE.findall(body)]
    if "".join(f"<{u}>" for u in UNIT_RE.findall(body)) != body:
        raise ValueError(f"malformed unit string: {text[:60]!r}")
    return units


# ------------------------------------------------------------------------------------------------ writers
def cross_modal_text(task: str, instruction: str, text: str, unit_text: str) -> str:
    if task == "asr":
        return f"[Human]: {instruction} This is input: {unit_text}<eoh> [SpeechGPT]: {text}<eoa>"
    return f"[Human]: {instruction} This is input: {text}<eoh> [SpeechGPT]: {unit_text}<eoa>"


def com_text(fmt: str, instruction: str, response: str, q_units: list[int], a_units: list[int]) -> str:
    if fmt == "speech-speech":
        return exchange_text(to_text(q_units), com_answer(instruction, response, a_units))
    if fmt == "speech-text":
        return f"[Human]: {to_text(q_units)}<eoh>. [SpeechGPT]: {instruction}; [ta] {response}<eoa>."
    if fmt == "text-speech":
        return f"[Human]: {instruction}<eoh>. [SpeechGPT]: [ta] {response}; [ua] {to_text(a_units)}<eoa>."
    if fmt == "text-text":
        return f"[Human]: {instruction}<eoh>. [SpeechGPT]: [ta] {response}<eoa>."
    raise ValueError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")


def com_answer(instruction: str, response: str, a_units: list[int]) -> str:
    """The assistant's side of a speech-speech exchange: what it heard, its text answer, then the answer spoken."""
    return f"{instruction}; [ta] {response}; [ua] {to_text(a_units)}"


# A dialogue is its exchanges in the speech-speech form one after another, one space apart (SpeechGPT released
# single-turn records only; this is our multi-turn form, the same markup repeated).
EXCHANGE_SEPARATOR = " "


def dialogue_text(exchanges: list[tuple[str, str, list[int], list[int]]]) -> str:
    """``(user text, assistant text, user units, assistant units)`` per exchange → the dialogue's plain_text."""
    return EXCHANGE_SEPARATOR.join(com_text("speech-speech", q, a, qu, au) for q, a, qu, au in exchanges)


def exchange_text(user_input: str, answer: str) -> str:
    """One exchange of a dialogue from what the user said (text or unit text) and the assistant's whole answer:
    for a speech-speech exchange this is :func:`com_text`'s ``speech-speech`` record."""
    return f"[Human]: {user_input}<eoh>. [SpeechGPT]: {answer}<eoa>."


def dialogue_messages(prefix: str, exchanges: list[tuple[str, str, list[int], list[int]]]) -> list[dict]:
    """The same dialogue as chat messages: the prefix as system message, the user's speech as unit text, the
    assistant's chain-of-modality answer (:func:`com_answer`)."""
    messages = [{"role": "system", "content": prefix.strip()}] if prefix.strip() else []
    for q, a, qu, au in exchanges:
        messages += [{"role": "user", "content": to_text(qu)}, {"role": "assistant", "content": com_answer(q, a, au)}]
    return messages


# ------------------------------------------------------------------------------------------------ parsers
U = r"<sosp>(?:<\d+>)+<eosp>"
SHAPES = {
    "asr": re.compile(rf"\[Human\]: (?P<instruction>.+?) This is input: (?P<units>{U})<eoh> \[SpeechGPT\]: (?P<text>.+)<eoa>", re.S),
    "tts": re.compile(rf"\[Human\]: (?P<instruction>.+?) This is input: (?P<text>.+)<eoh> \[SpeechGPT\]: (?P<units>{U})<eoa>", re.S),
    "speech-speech": re.compile(rf"\[Human\]: (?P<q_units>{U})<eoh>\. \[SpeechGPT\]: (?P<instruction>.+); \[ta\] (?P<response>.+); \[ua\] (?P<a_units>{U})<eoa>\.", re.S),
    "speech-text": re.compile(rf"\[Human\]: (?P<q_units>{U})<eoh>\. \[SpeechGPT\]: (?P<instruction>.+); \[ta\] (?P<response>.+)<eoa>\.", re.S),
    "text-speech": re.compile(rf"\[Human\]: (?P<instruction>.+)<eoh>\. \[SpeechGPT\]: \[ta\] (?P<response>.+); \[ua\] (?P<a_units>{U})<eoa>\.", re.S),
    "text-text": re.compile(r"\[Human\]: (?P<instruction>.+)<eoh>\. \[SpeechGPT\]: \[ta\] (?P<response>.+)<eoa>\.", re.S),
}

# Record markup (SpeechGPT's, and the interleaved records' [TEXT]/[SPEECH]), and the tokens tokenizers treat as special. A text field (transcript, instruction, response,
# template) that carries any of them could plant a fake turn or unit string in training data: such input is
# skipped and counted, never copied, and ``validate`` fails any record whose text fields hold one.
MARKUP = re.compile(r"\[(?:Human|SpeechGPT|ta|ua|tq|TEXT|SPEECH)\]|<(?:eoh|eoa|eos|sosp|eosp|\d+|/?s|unk|pad)>|<\|[^|<>]{1,40}\|>",
                    re.IGNORECASE)


def find_markup(text: str) -> str | None:
    """The first piece of record markup (or special-token text) in ``text``, or None."""
    match = MARKUP.search(text or "")
    return match.group(0) if match else None


# Characters no text field may hold: C0 controls but tab, newline and carriage return (a TTS engine stops at a
# NUL and speaks less than the record says), DEL, and lone surrogates (no UTF-8 file can hold them).
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
# The text columns of every record kind: written from its input, so checked for markup and controls.
TEXT_COLUMNS = ("transcript", "instruction", "response", "user_texts", "assistant_texts", "segment_texts", "main_text",
                "other_text")


def text_problem(text: str) -> tuple[str, str] | None:
    """(rule, what) when ``text`` holds record markup or a control character; None when it may be written."""
    mark = find_markup(text)
    if mark:
        return "markup", f"record markup {mark!r}"
    control = CONTROL.search(text or "")
    if control:
        return "control-character", f"control character U+{ord(control.group(0)):04X}"
    return None


def text_fields(record: dict):
    """(label, text) of each text a record carries in :data:`TEXT_COLUMNS`, a list's items as ``column turn N``."""
    for column in TEXT_COLUMNS:
        value = record.get(column)
        if isinstance(value, str):
            yield column, value
        elif isinstance(value, list):
            for n, text in enumerate(value, 1):
                if isinstance(text, str):
                    yield f"{column} turn {n}", text


def record_problems(record: dict) -> list[tuple[str, str]]:
    """(rule, message) for every text of ``record`` that holds markup or a control character, and for any string
    field no UTF-8 file can hold (a lone surrogate in an id): what compose refuses to write and validate fails."""
    out = []
    for label, text in text_fields(record):
        problem = text_problem(text)
        if problem:
            out.append((problem[0], f"{label} holds {problem[1]}"))
    for column, value in record.items():
        if isinstance(value, str) and column not in TEXT_COLUMNS and re.search(r"[\ud800-\udfff]", value):
            out.append(("control-character", f"{column} holds a lone surrogate"))
    return out


# ------------------------------------------------------------------------------------- prompts and answers
PROMPTS = {
    "chain_of_modality": "[Human]: {input}<eoh>. [SpeechGPT]:",
    "cross_modal": "[Human]: {input}<eoh> [SpeechGPT]:",
    "speechgpt-cli": "[Human]: {input} <eoh>. [SpeechGPT]: ",
}
UNIT_SPAN = re.compile(r"<sosp>(?:<\d+>)*(?:<eosp>|$)")
RESPONSE_MARK = "[SpeechGPT]:"  # training's loss starts after it (mask "human")


def _between(text: str, start: str | None, end: str | None) -> str:
    """The text after ``start`` (or from the beginning) up to ``end`` (or the end)."""
    if start is not None:
        i = text.find(start)
        if i < 0:
            return ""
        text = text[i + len(start):]
    if end is not None and end in text:
        text = text[: text.index(end)]
    return text.strip()


def parse_answer(generated: str) -> dict:
    """The model's answer split as SpeechGPT's ``cli_infer.py`` splits it."""
    answer = generated.split("<eoa>")[0].strip()
    has_ta, has_ua = "[ta]" in answer, "[ua]" in answer
    unit_answer = _between(answer, "[ua]", None) if has_ua else ""
    return {
        "answer": answer,
        "text_question": _between(answer, None, "; [ta]") if "; [ta]" in answer else "",
        "text_answer": _between(answer, "[ta]", "; [ua]") if has_ta else "",
        "unit_answer": unit_answer,
        "units": [int(u) for u in UNIT_RE.findall(unit_answer or (UNIT_SPAN.search(answer) or [""])[0])],
        "raw": generated,
    }


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` with the tokenizer's BOS token in front, once (none when it has no BOS token)."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def markers_balanced(text: str) -> bool:
    depth = 0
    for m in re.finditer(r"<sosp>|<eosp>", text):
        depth += 1 if m.group(0) == "<sosp>" else -1
        if depth not in (0, 1):
            return False
    return depth == 0


def shape_errors(r: dict, shape: str) -> tuple[list[tuple[str, str]], re.Match | None]:
    """A cross-modal or chain-of-modality record's prompt/completion and the shape of its plain_text: the
    errors, and the match of its shape (None when the shape does not hold)."""
    errors = []
    text = r["plain_text"]
    if (r["prompt"], r["completion"]) != (r["prefix"], text):
        errors.append(("prompt-completion", "prompt/completion are not prefix/plain_text"))
    if not markers_balanced(text):
        errors.append(("unit-markers", "<sosp>/<eosp> unbalanced or nested in plain_text"))
        return errors, None
    m = SHAPES[shape].fullmatch(text)
    if not m:
        errors.append(("shape", f"plain_text does not have the {shape} shape"))
    return errors, m
