"""``speechinstruct chat``: talk to a trained model with text or an audio file.

Audio becomes units with the same extractor and k-means as the training data. The prompt is the record
format the model was trained on, up to the answer (``PROMPTS``): by default chain-of-modality's
``{prefix}[Human]: {input}<eoh>. [SpeechGPT]:``, or cross-modal's ``… {input}<eoh> [SpeechGPT]:``, or SpeechGPT's
``cli_infer.py`` template (``[Human]: {input} <eoh>. [SpeechGPT]: ``). The answer is split as ``cli_infer.py``
splits it: text question (before ``; [ta]``), text answer (between ``[ta]`` and ``; [ua]``) and unit answer
(after ``[ua]``), each up to ``<eoa>``. Decoding is greedy (the same answer each time), or sampled as
``cli_infer.py`` samples (:data:`SPEECHGPT_SAMPLING`).

Several turns: with ``history`` (earlier (input, answer) exchanges) the chain-of-modality prompt is the
dialogue so far, as ``compose dialogue`` writes it (``speechgpt.dialogue_text``: each exchange
``[Human]: {input}<eoh>. [SpeechGPT]: {answer}<eoa>.``, one space apart), then the new input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..speechgpt import (DEFAULT_PREFIX, EXCHANGE_SEPARATOR, PROMPTS, exchange_text, parse_answer, to_text, with_bos)  # noqa: F401 # (parse_answer: chat's API)


# how SpeechGPT's cli_infer.py generates (its GenerationConfig; max_new_tokens 2048): ``chat --sample``
SPEECHGPT_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 50, "min_new_tokens": 10}


def model_folder(path, option: str, marker: str = "config.json") -> Path:
    """``path`` when it is a folder holding ``marker``; else one line saying what it is (a missing folder, an empty
    one, a dataset): asked before transformers, which would take the name for a hub id and try the network."""
    path = Path(path)
    what = "trained model folder (model/ or merged/ of `speechinstruct train`)" if option == "--model" else \
        "adapter folder (adapter/ of `speechinstruct train --stage 3`)"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder: {option} takes a {what}; a model on the Hub as hf://ORG/NAME")
    if not (path / marker).is_file():
        found = "empty" if not any(path.iterdir()) else \
            "a dataset" if (path / "dataset_info.json").is_file() or (path / "data").is_dir() else f"no {marker}"
        raise ValueError(f"{path}: not a model ({found}): {option} takes a {what}")
    return path


class Chat:
    def __init__(self, model_dir: str | Path, lora: str | Path | None = None, device: str = "cpu",
                 prefix: str = DEFAULT_PREFIX, kind: str = "chain_of_modality"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if kind not in PROMPTS:
            raise ValueError(f"unknown prompt kind {kind!r}: choose {', '.join(PROMPTS)}")
        model_folder(model_dir, "--model")
        source = model_folder(lora, "--lora", "adapter_config.json") if lora else Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=source.is_dir())
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=Path(model_dir).is_dir())
        if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        if lora:
            from .train import require_train_extra

            PeftModel = require_train_extra("peft").PeftModel

            model = PeftModel.from_pretrained(model, str(lora))
        self.model = model.eval().to(device)
        self.device, self.prefix, self.kind = device, prefix, kind

    def prompt(self, user_input: str, history: list[tuple[str, str]] = ()) -> str:
        """The prompt for ``user_input`` after the exchanges of ``history`` ((input, answer) pairs; the answer as
        :func:`parse_answer` gives it, up to ``<eoa>``)."""
        if history and self.kind != "chain_of_modality":
            raise ValueError(f"a history needs the chain_of_modality prompt (dialogues); {self.kind} records are one turn")
        turns = [exchange_text(question, answer) for question, answer in history]
        return self.prefix + "".join(turn + EXCHANGE_SEPARATOR for turn in turns) + PROMPTS[self.kind].format(input=user_input)

    def prompt_ids(self, user_input: str, history: list[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the prompt exactly as training tokenised the record's beginning (BOS first)."""

        text = self.prompt(user_input, history)
        return with_bos(self.tokenizer, self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def context(self) -> int | None:
        """The most tokens the model attends to (its position table), or None when its config says no limit."""
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def fitting(self, user_input: str, history: list[tuple[str, str]], max_new_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids with the most recent exchanges of ``history`` that leave room for ``max_new_tokens``,
        and how many earlier exchanges were left out. Raises ValueError when the input alone does not fit."""
        limit = self.context()
        history = list(history)
        for dropped in range(len(history) + 1):
            ids = self.prompt_ids(user_input, history[dropped:])
            if limit is None or len(ids) + max_new_tokens <= limit:
                return ids, dropped
        raise ValueError(f"the system prompt and the input alone are {len(ids)} tokens, and the model reads at most {limit} "
                         f"with {max_new_tokens} to answer: shorten it or lower --max-new-tokens")

    @torch.inference_mode()
    def reply(self, user_input: str, max_new_tokens: int = 256, history: list[tuple[str, str]] = (),
              sampling: dict | None = None) -> dict:
        """The model's answer (:func:`parse_answer`), with ``history_left_out``: the earliest exchanges of
        ``history`` that did not fit the model's context beside the input and the answer (the most recent are kept).
        ``sampling``: ``generate``'s sampling settings (:data:`SPEECHGPT_SAMPLING`, say); None decodes greedily."""
        prompt, left_out = self.fitting(user_input, history, max_new_tokens)
        ids = torch.tensor([prompt], device=self.device)
        sampling = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
        output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                     stop_strings=["<eoa>"], tokenizer=self.tokenizer, **sampling)
        answer = parse_answer(self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True))
        return {**answer, "history_left_out": left_out} if left_out else answer


def audio_to_unit_text(path: str | Path, tokenizer) -> str:
    """A recording as unit text, by any speech tokenizer (tokenizer.py), decoded to its rate."""
    from .. import audio

    return to_text(tokenizer.encode(audio.load(path, target_sr=tokenizer.sample_rate), tokenizer.sample_rate).units)
