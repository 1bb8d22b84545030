"""``speechinstruct compose dialogue``: multi-turn spoken dialogues from text conversations.

A conversation is a JSONL line (or a dataset row) in either of the two forms chat data ships in::

    {"id": ..., "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}  ShareGPT
    {"id": ..., "messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}

Every user turn is spoken (TTS → units) in one voice, every assistant turn in another (both drawn from the
seed and the conversation's id), and each exchange is written in the speech-speech chain-of-modality form,
one after another (``speechgpt.dialogue_text``)::

    [Human]: {units(q1)}<eoh>. [SpeechGPT]: {q1}; [ta] {a1}; [ua] {units(a1)}<eoa>. [Human]: {units(q2)}<eoh>. …

after the prefix once. The record also carries ``messages`` (system, user, assistant, …) for trainers that
read chat data through a chat template (TRL's ``SFTTrainer``). A leading system message of the source is not
spoken: the prefix takes its place. A conversation whose roles do not alternate (user first, assistant
last), with an empty turn, a turn with record markup, or a turn too long to speak is skipped whole, named
and counted; the rest of the file goes on.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from .. import recipe as settings
from ..audio import AudioError
from ..io import sha256_json, write_json
from ..judges import ScoreError
from ..recipe import default
from ..speechgpt import DEFAULT_PREFIX, dialogue_messages, dialogue_text, markers_balanced
from .common import RecordRefused, finish, write_chunks
from .speech import SpeechRejected, Speaker, rewrite_for_speech, speakable, unfit_text, worst
from .texts import decontaminated, read_objects, unique_items

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}


def read_conversations(source: str | Path, id_column: str | None = "id", split: str = "train",
                       ) -> Iterator[dict | tuple[str, str]]:
    """Conversations ``{id, exchanges: [(user, assistant), …], where}`` from the shipped sample (``builtin``),
    a JSONL file, a Parquet file or an HF dataset; what cannot be used comes as (where, reason)."""
    for where, fallback_id, obj in read_objects(source, "dialogues_sample.jsonl", split):
        if isinstance(obj, str):
            yield where, obj
            continue
        exchanges = exchanges_of(obj)
        if isinstance(exchanges, str):
            yield where, exchanges
            continue
        uid = str(obj.get(id_column) or fallback_id) if id_column else fallback_id
        yield {"id": uid, "exchanges": exchanges, "where": where}


def exchanges_of(obj: dict) -> list[tuple[str, str]] | str:
    """The (user, assistant) exchanges of one conversation object, or why it has none."""
    if isinstance(obj.get("messages"), list):
        turns, role_key, text_key = obj["messages"], "role", "content"
    elif isinstance(obj.get("conversations"), list):
        turns, role_key, text_key = obj["conversations"], "from", "value"
    else:
        return "no 'conversations' or 'messages' list"
    roles, texts = [], []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            return f"a turn without text ({text_key!r} at turn {n})"
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            return f"unknown role ({turn.get(role_key)!r} at turn {n})"
        if role == "system":
            if n == 1:
                continue  # the prefix takes its place
            return f"a system message inside the conversation (turn {n})"
        roles.append(role)
        texts.append(turn[text_key])
    if not roles:
        return "no turns"
    for n, role in enumerate(roles):
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            return f"roles do not alternate (turn {n + 1 + (len(turns) - len(roles))} is {role}, expected {expected})"
    if roles[-1] != "assistant":
        return "ends with a user turn that has no answer"
    return list(zip(texts[0::2], texts[1::2]))


def speaker_keys(tts, seed: int, uid: str, tries: int = 8) -> dict[str, str]:
    """The TTS voice keys of a conversation's user and assistant: each speaker keeps one voice for the whole
    dialogue, and the assistant's is redrawn (deterministically) while it is the user's voice."""
    keys = {"user": f"{seed}/user/{uid}", "assistant": f"{seed}/assistant/{uid}"}
    user_voice = tts.voice_for(keys["user"])[0]
    for attempt in range(1, tries):
        if tts.voice_for(keys["assistant"])[0] != user_voice:
            break
        keys["assistant"] = f"{seed}/assistant/{uid}/{attempt}"
    return keys


def _dialogue_record(conversation: dict, speaker: Speaker, llm, prefix: str, seed: int, corpus: str,
                     license: str) -> list[dict] | tuple[str, str]:
    """The record of one conversation, or (count key, reason) when it is dropped (whole)."""
    exchanges = []
    for n, (question, answer) in enumerate(conversation["exchanges"], 1):
        if llm is not None:
            rewritten = rewrite_for_speech(llm, question, answer)
            if isinstance(rewritten, str):
                return f"dropped: {rewritten}", f"exchange {n}: {rewritten}"
            question, answer = rewritten
        # checked as given (code fences, tables) and as spoken and written, markdown stripped (``<eo**a>`` is ``<eoa>``)
        for name, text, limit in (("user turn", question, "instruction"), ("assistant turn", answer, "response")):
            reason = unfit_text(name, text, limit) or unfit_text(name, speakable(text), limit)
            if reason:
                return f"dropped: {reason.split(' (')[0]}", f"exchange {n}: {reason}"
        exchanges.append((speakable(question), speakable(answer)))
    keys = speaker_keys(speaker.tts, seed, conversation["id"])
    spoken, voices, judged = [], {}, []
    try:
        for n, (question, answer) in enumerate(exchanges, 1):
            turn = []
            for role, text in (("user", question), ("assistant", answer)):
                units, voices[role], scores = speaker.units(text, keys[role])
                turn.append(units)
                judged.append(scores)
            spoken.append((question, answer, *turn))
    except ScoreError:  # a judge that cannot work at all stops the stage
        raise
    except SpeechRejected as e:
        return "dropped: quality: " + str(e).split(" (")[0], f"exchange {n}: synthesized speech: {e}"
    except (AudioError, ValueError) as e:
        return "dropped: cannot be spoken", f"exchange {n}: cannot be spoken ({str(e).split(': ')[-1][:80]})"
    try:
        return [finish({
            "id": f"dialogue/{conversation['id']}", "prefix": prefix, "plain_text": dialogue_text(spoken),
            "messages": dialogue_messages(prefix, spoken), "turns": len(spoken),
            "user_texts": [q for q, _, _, _ in spoken], "assistant_texts": [a for _, a, _, _ in spoken],
            "user_units": [qu for _, _, qu, _ in spoken], "assistant_units": [au for _, _, _, au in spoken],
            "voice": f"{voices['user']},{voices['assistant']}",
            "source_id": conversation["id"], "corpus": corpus, "license": license, **worst(judged),
        })]
    except RecordRefused as e:
        return e.key, str(e)


def dialogue(source: str | Path, out: str | Path, tokenizer, tts, cfg: settings.Dialogue | None = None, llm=None,
             prefix: str = DEFAULT_PREFIX, seed: int = default(settings.Compose, "seed"), corpus: str | None = None,
             id_column: str | None = "id", chunk_size: int = 100, judge=None, gates=None, eval_texts=None) -> dict:
    """Dialogue records from text conversations (see the module docstring; ``cfg``: the recipe's
    ``compose.dialogue``, its ``max_dialogues`` and ``license``, its defaults when None); ``llm`` rewrites each
    exchange for speech, ``judge``/``gates`` score each synthesized turn as ``compose.chain_of_modality`` does.
    Written ``chunk_size`` conversations to a ``train-NNNNN.parquet`` file; a rerun skips the chunks already
    written."""
    cfg = cfg or settings.Dialogue()
    license, max_dialogues = cfg.license, cfg.max_dialogues
    if str(source) == "builtin":
        corpus, license = corpus or "speechinstruct-dialogues-sample", "Apache-2.0"
    corpus = corpus or Path(str(source)).stem
    out = Path(out)
    conversations, dropped = unique_items(read_conversations(source, id_column), max_dialogues)
    conversations, dropped = decontaminated(conversations, dropped, eval_texts, ("exchanges",))
    counts = collections.Counter("dropped: " + d["reason"].split(" (")[0] for d in dropped)
    speaker = Speaker(tts, tokenizer, judge, gates)
    made_with = {"conversations": sha256_json(conversations), "prefix": sha256_json(prefix), "seed": seed,
                 "corpus": corpus, "license": license, "llm": getattr(llm, "model", None) if llm else None, **speaker.spec()}
    write_chunks(conversations, out, "dialogue", chunk_size, counts, dropped,
                 lambda c: _dialogue_record(c, speaker, llm, prefix, seed, corpus, license),
                 count=lambda row: "records", settings=made_with)
    turns = collections.Counter()
    for part in sorted(out.glob("train-*.parquet")):
        turns.update(pq.read_table(part, columns=["turns"]).column("turns").to_pylist())
    summary = {"conversations": len(conversations), "records": counts.pop("records", 0),
               "turns": sum(n * c for n, c in turns.items()), "records_by_turns": {str(n): c for n, c in sorted(turns.items())},
               **dict(sorted(counts.items())), "tts_calls_this_run": getattr(tts, "calls", None),
               "llm_requests_this_run": getattr(llm, "requests", 0) if llm else 0, **speaker.tokenizer_spec(),
               "dropped_examples": dropped[:200]}
    write_json(out / "summary.json", summary)
    return summary


def record_errors(r: dict, k: int | None) -> list[tuple[str, str]]:
    """A dialogue's columns agree with each other, and its plain_text and messages are the ones they make."""
    errors = []
    for column in ("user_units", "assistant_units"):
        bad = [u for turn in r[column] for u in turn if k is not None and not 0 <= u < k]
        if bad:
            errors.append(("unit-range", f"{column} has ids outside [0, {k}): {bad[:5]}"))
    columns = (r["user_texts"], r["assistant_texts"], r["user_units"], r["assistant_units"])
    if any(len(c) != r["turns"] for c in columns):
        errors.append(("turns", f"turns is {r['turns']}, the per-turn columns have {[len(c) for c in columns]}"))
        return errors
    if errors:
        return errors
    exchanges = list(zip(*columns))
    if not markers_balanced(r["plain_text"]):
        errors.append(("unit-markers", "<sosp>/<eosp> unbalanced or nested in plain_text"))
    elif r["plain_text"] != dialogue_text(exchanges):
        errors.append(("shape", "plain_text is not the dialogue its per-turn columns make"))
    if r["messages"] != dialogue_messages(r["prefix"], exchanges):
        errors.append(("messages", "messages are not the dialogue its per-turn columns make"))
    return errors
