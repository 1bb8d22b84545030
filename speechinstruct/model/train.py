"""``speechinstruct train``: SpeechGPT's three stages on any causal LM (LLaMA, Qwen, GPT-2, …).

1. modality-adaptation pre-training: causal LM on ``pretrain`` unit text, packed into blocks;
2. cross-modal instruction fine-tuning: full fine-tune on ``cross_modal``;
3. chain-of-modality fine-tuning: LoRA on ``chain_of_modality``.

As SpeechGPT's released scripts (``ma_pretrain.py``, ``cm_sft.py``, ``com_sft.py``) do, by default:

* the vocabulary gains ``<0>``…``<K-1>``, ``<sosp>``, ``<eosp>``, ``[Human]``, ``[SpeechGPT]``, ``<eoh>``,
  ``<eos>`` (K from the dataset's ``speechinstruct.json``) as single tokens; ``<eoa>`` stays plain text.
  New embedding rows start at the mean of the old ones (SpeechGPT: transformers' default init);
* stages 2 and 3 tokenise ``prefix + plain_text`` as ONE string (BOS first, EOS appended when it fits) and
  set the labels to -100 over the prefix only (``mask="prefix"``): the ``[Human]`` turn is trained on.
  ``mask="prompt"`` (loss on the ``[SpeechGPT]`` answer only), ``mask="assistant"`` (loss on every
  ``[SpeechGPT]`` turn of a multi-turn dialogue, up to the next ``[Human]``) and ``mask="none"`` are options;
  the boundaries are found from the tokenizer's character offsets, never by tokenising the parts separately;
* stage 3 reads ``chain_of_modality``; ``configs`` adds others (``dialogue``: multi-turn spoken dialogues);
* stage 1 puts BOS before each line, no EOS, and keeps the short last block;
* gradients are clipped at 1.0 (Hugging Face Trainer's default, which SpeechGPT trained with).

The loop is plain PyTorch driven by ``accelerate`` (devices, bf16, gradient accumulation, multi-GPU,
checkpoint state): read it top to bottom. Batches come from a permutation drawn from ``seed + epoch``, so a
resumed run replays exactly the batches an uninterrupted run would see; each process takes its share of
every global batch and the LR schedule steps once per optimizer step, whatever the number of processes.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import importlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..io import read_json, sha256_json, write_json, write_text
from ..memory import OutOfMemory, attempt, first_line, free_cached, halving, is_out_of_memory
from ..recipe import Train
from ..speechgpt import RESPONSE_MARK, with_bos

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eos>")  # SpeechGPT's; not <eoa>
CONFIG_FOR_STAGE = {1: "pretrain", 2: "cross_modal", 3: "chain_of_modality"}
HUMAN_MARK = "[Human]:"


TrainConfig = Train  # the training settings, declared with the recipe's sections (recipe.Train)


def settings_for_stage(stage: int) -> dict:
    """SpeechGPT's settings for a stage, shipped in the package (``recipes/train-stage{N}.yaml``)."""
    from importlib import resources

    import yaml

    name = f"train-stage{stage}.yaml"
    checkout = Path(__file__).resolve().parents[2] / "recipes" / name  # speechinstruct/model/train.py
    text = checkout.read_text() if checkout.is_file() else resources.files("speechinstruct.recipes").joinpath(name).read_text()
    return yaml.safe_load(text) or {}


# ---------------------------------------------------------------------------------------------- vocabulary
def unit_vocabulary(k: int) -> list[str]:
    return [f"<{i}>" for i in range(k)] + list(SPECIAL_TOKENS)


def add_unit_tokens(tokenizer, k: int) -> int:
    """Add the unit and turn tokens the tokenizer lacks (idempotent); a missing pad token becomes EOS."""
    vocab = tokenizer.get_vocab()
    added = tokenizer.add_tokens([t for t in unit_vocabulary(k) if t not in vocab])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return added


def expand_vocabulary(model, tokenizer, k: int) -> int:
    """Add unit and turn tokens (idempotent); new embedding rows = mean of the existing rows."""
    added = add_unit_tokens(tokenizer, k)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
                emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    return added


def dataset_k(data: str | Path) -> int:
    from ..shardfiles import folder_k

    meta = Path(data) / "speechinstruct.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing: --data must be a dataset written by `speechinstruct publish`")
    k = folder_k(data)
    if not k:
        raise ValueError(f"{meta}: no K recorded")
    return int(k)


# ------------------------------------------------------------------------------------------------ examples
def loss_spans(prefix: str, plain_text: str, mask: str) -> list[tuple[int, int]] | None:
    """The character ranges of ``prefix + plain_text`` that get the loss (None: ``mask`` finds no answer)."""
    end = len(prefix) + len(plain_text)
    if mask == "none":
        return [(0, end)]
    if mask == "prefix":
        return [(len(prefix), end)]
    cut = plain_text.find(RESPONSE_MARK)
    if cut < 0:
        return None
    if mask == "prompt":
        return [(len(prefix) + cut + len(RESPONSE_MARK), end)]
    spans = []  # assistant: each [SpeechGPT] turn, up to the next [Human] turn
    while cut >= 0:
        start = cut + len(RESPONSE_MARK)
        human = plain_text.find(HUMAN_MARK, start)
        stop = human if human >= 0 else len(plain_text)
        spans.append((len(prefix) + start, len(prefix) + stop))
        cut = plain_text.find(RESPONSE_MARK, stop)
    return spans


def supervised_example(tokenizer, prefix: str, plain_text: str, max_length: int, mask: str = "prefix") -> dict | None:
    """input_ids and labels for one record, as SpeechGPT's ``cm_sft.py`` builds them: the whole text
    tokenised once, BOS first, EOS appended when it fits, truncated at ``max_length``; a token gets the loss when
    it starts inside one of the ``loss_spans`` (BOS with the first character, EOS with the last)."""
    text = prefix + plain_text
    spans = loss_spans(prefix, plain_text, mask)
    if spans is None:
        return None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [start for start, _ in enc["offset_mapping"]]
        trained = [any(a <= start < b for a, b in spans) for start in starts]
    elif len(spans) == 1 and spans[0][1] == len(text):
        # slow tokenizers have no offsets: count the tokens of the masked text, as SpeechGPT does
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut = spans[0][0]
        n_masked = len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) if cut else 0
        trained = [i >= n_masked for i in range(len(ids))]
    else:
        raise ValueError(f"mask {mask!r} needs a fast tokenizer (one with character offsets)")
    full = with_bos(tokenizer, ids)
    if len(full) > len(ids):
        trained = [spans[0][0] == 0] + trained  # BOS: trained only when the first character is
    if tokenizer.eos_token_id is not None and len(full) < max_length:
        full = full + [tokenizer.eos_token_id]
        trained = trained + [spans[-1][1] == len(text)]
    full, trained = full[:max_length], trained[:max_length]
    labels = [token if keep else -100 for token, keep in zip(full, trained)]
    if all(label == -100 for label in labels):
        return None  # truncated before anything to learn
    return {"input_ids": full, "labels": labels}


def packed_blocks(tokenizer, texts: list[str], block_size: int) -> list[dict]:
    """Stage 1, as SpeechGPT's ``ma_pretrain.py``: each line tokenised with BOS and no EOS, concatenated,
    cut into blocks of ``block_size`` tokens; the shorter last block is kept."""
    stream: list[int] = []
    for text in texts:
        stream += with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    if not stream:
        raise ValueError("the pretrain data holds no tokens")
    return [{"input_ids": stream[i : i + block_size], "labels": stream[i : i + block_size]}
            for i in range(0, len(stream), block_size)]


def load_split(data: str | Path, config: str, split: str):
    """One split of a published dataset's config with ``datasets``, or None for a missing eval split. A card
    whose recorded sizes no longer match the files (a user filtered the Parquet files) loads without the size
    check, with a warning saying which split and how to refresh the card, instead of ``datasets``' error."""
    import datasets
    from datasets.exceptions import DatasetGenerationError, NonMatchingSplitsSizesError

    said = _HeldErrors("datasets.packaged_modules.parquet.parquet")  # its "Failed to read file": our line says it
    try:
        try:
            with said:
                return datasets.load_dataset(str(data), config, split=split)
        except NonMatchingSplitsSizesError as e:
            found = re.findall(r"SplitInfo\(name='(\w+)'", str(e))
            log.warning(f"{data}: the card's sizes of {config} ({', '.join(dict.fromkeys(found)) or 'a split'}) no "
                        "longer match its data files; loading without the size check (run `speechinstruct publish` "
                        "again to refresh the card)")
            with said:
                return datasets.load_dataset(str(data), config, split=split, verification_mode="no_checks")
    except DatasetGenerationError as e:  # datasets names the file only in its log line: find it
        raise ValueError(_faulty_file(data, config, split) or f"{data}: datasets could not load {config} ({split}): "
                         f"{(said.messages or [str(e.__cause__ or e)])[0].splitlines()[0]}") from None
    except ValueError as e:
        if split != "train" and "Unknown split" in str(e):
            return None
        raise


class _HeldErrors(logging.Filter):
    """Within ``with``: the ERROR records of logger ``name`` kept in ``messages`` instead of printed (the others
    pass as before)."""

    def __init__(self, name: str):
        super().__init__()
        self.logger, self.messages = logging.getLogger(name), []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.messages.append(record.getMessage())
        return False

    def __enter__(self):
        self.logger.addFilter(self)

    def __exit__(self, *exc):
        self.logger.removeFilter(self)


def _faulty_file(data: str | Path, config: str, split: str) -> str | None:
    """One line naming the first of a published config's ``split`` files that is unreadable (raised) or holds other
    columns than the config's records, or None."""
    import pyarrow.parquet as pq

    from .. import records
    from ..io import naming

    expected = records.arrow_schema(config).names if config in records.KINDS else None
    for path in sorted((Path(data) / "data" / config).glob(f"{split}-*.parquet")) if expected else []:
        with naming(path):
            names = pq.read_schema(path).names
        missing, extra = [c for c in expected if c not in names], [c for c in names if c not in expected]
        if missing or extra:
            said = "; ".join(f"{word} {', '.join(cs)}" for word, cs in (("no", missing), ("extra", extra)) if cs)
            return f"{path}: not {config} records ({said}); run `speechinstruct validate {data}`"
    return None


def build_examples(stage: int, data: str | Path, tokenizer, cfg: TrainConfig, split: str = "train") -> list[dict]:
    """Examples of one split of the stage's config (an empty list when the dataset has no such split)."""
    configs = cfg.configs or [CONFIG_FOR_STAGE[stage]]
    from ..shardfiles import read_dataset_meta

    published = read_dataset_meta(data)["counts"]
    missing = [c for c in configs if c not in published]
    if missing:
        raise ValueError(f"{data}: no {', '.join(missing)} config (it has {', '.join(published) or 'none'})")
    if stage == 1:
        ds = load_split(data, configs[0], split)
        return packed_blocks(tokenizer, ds["text"], cfg.block_size) if ds is not None and len(ds) else []
    examples = []
    for config in configs:
        ds = load_split(data, config, split)
        for r in ds if ds is not None else []:
            example = supervised_example(tokenizer, r["prefix"], r["plain_text"], cfg.max_length, cfg.mask)
            if example is not None:
                examples.append(example)
    if not examples and split == "train":
        raise ValueError(f"{data}: no usable {' or '.join(configs)} examples")
    return examples


def collate(examples: list[dict], pad_id: int, pack: int = 0) -> dict:
    """A batch of examples padded to the longest; or with ``pack`` (a row length in tokens) laid end to end in
    rows of at most ``pack`` tokens (first fit, in order), the rows padded to the longest, the position ids
    starting again at each example and no attention mask: transformers then keeps attention inside each example
    (it builds that mask from the position ids when there is no attention mask and no cache; padding comes last
    in a row, where causal attention never reads it). No loss on an example's first token (the example before
    would predict it): the loss is over the same tokens as the padded batch's."""
    if pack:
        rows: list[list[dict]] = []
        for e in examples:
            row = next((r for r in rows if sum(len(x["input_ids"]) for x in r) + len(e["input_ids"]) <= pack), None)
            rows.append([e]) if row is None else row.append(e)
        width = max(sum(len(x["input_ids"]) for x in r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            flat = [t for x in row for t in x["input_ids"]]
            ids[i, :len(flat)] = torch.tensor(flat)
            labels[i, :len(flat)] = torch.tensor([-100 if j == 0 else t for x in row for j, t in enumerate(x["labels"])])
            positions[i, :len(flat)] = torch.tensor([j for x in row for j in range(len(x["input_ids"]))])
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def loss_tokens(batch: dict) -> int:
    """How many tokens a batch's loss is the mean over: transformers' causal LM loss predicts each label from the
    token before it (labels shifted by one), and -100 is no label."""
    return int((batch["labels"][:, 1:] != -100).sum())


def example_loss_tokens(example: dict) -> int:
    """How many tokens of one example the loss is over, in a padded batch or a packed row alike (:func:`collate`)."""
    return sum(label != -100 for label in example["labels"][1:])


def backward(model, accelerator, items: list[dict], pad_id: int, pack: int, size: int, norm: float,
             passes: int = 0) -> torch.Tensor:
    """The summed token losses of one micro-batch (``items``) over ``norm`` (train()'s, the same for every
    micro-batch), its gradient added to the model's, run ``size`` examples at a time: each part's mean loss weighted
    by its loss tokens over ``norm``, so that the parts' gradients add up to the whole micro-batch's; train() scales
    the step's summed gradients once they are all in (:func:`step_scale`). ``passes``: at least that many (FSDP,
    where every pass gathers the weights from all processes: a process whose share makes fewer parts than another's
    runs the rest over its first example, weighted zero)."""
    parts = [collate(items[i: i + size], pad_id, pack) for i in range(0, len(items), size)]
    tokens = [loss_tokens(p) for p in parts]
    parts += [collate(items[:1], pad_id, pack)] * (passes - len(parts))
    tokens += [0] * (len(parts) - len(tokens))
    loss = torch.zeros((), device=accelerator.device)
    alone = is_ddp(model)  # DDP: no part all-reduces; all_reduce_gradients does, once the step's parts have all run
    for i, (part, n) in enumerate(zip(parts, tokens)):
        batch = {key: v.to(accelerator.device) for key, v in part.items()}
        # FSDP: only the last part's backward pass reduces the gradients (every process runs as many parts)
        with accelerator.no_sync(model) if alone or i < len(parts) - 1 else contextlib.nullcontext():
            weighted = model(**batch, use_cache=False).loss * (n / norm)  # no cache: packed rows need none
            accelerator.backward(weighted)
        loss += weighted.detach()
    return loss


def step_scale(norm: float, step_tokens: int, accelerator) -> float:
    """What the summed gradients of a step are multiplied by to make them the gradient of its mean loss over all its
    loss tokens (``step_tokens``, every micro-batch's on every process), as one pass over the whole batch would take
    it and as transformers' Trainer does since 4.46 (``average_tokens_across_devices``; huggingface/transformers#34242):
    each micro-batch's parts were weighted by their tokens over ``norm``, accelerate divided each backward pass by the
    accumulation steps and the gradients were averaged over the processes. Each micro-batch's mean loss, averaged
    over micro-batches and processes (as DDP and accelerate leave it, and as SpeechGPT trained with transformers 4.2x),
    weighs the tokens of a micro-batch or process share of short examples more."""
    return norm * accelerator.gradient_accumulation_steps * accelerator.num_processes / max(1, step_tokens)


def is_ddp(model) -> bool:
    """Whether ``model`` is DDP's wrapper (a whole copy per process)."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def all_reduce_gradients(model, bucket_bytes: int = 25 << 20) -> None:
    """Each trained weight's gradient replaced by its mean over the processes, as DDP's all-reduce leaves it, in
    buckets of about 25 MB (DDP's size) in the weights' order. Called once a step's passes have all run, each
    without DDP's all-reduce (``no_sync``): DDP all-reduces during the last backward pass, which a process that runs
    out of memory in it cannot leave and join again, and the others would wait in it for good; here the others wait
    in this call while that process halves its passes and runs the step's share again. The reduction no longer
    overlaps the last backward pass (its cost on GPUs is not measured: none was lent)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # a weight no pass of this process used: its share of the mean is zero
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    bucket: list[torch.Tensor] = []

    def reduce():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))
        bucket.clear()

    filled = 0
    for g in grads:
        size = g.numel() * g.element_size()
        if bucket and (g.dtype != bucket[0].dtype or filled + size > bucket_bytes):
            reduce()
            filled = 0
        bucket.append(g)
        filled += size
    if bucket:
        reduce()


def local_module(model):
    """``model`` without DDP's wrapper (its own forward, autocast included): a pass through it makes no collective
    call (DDP's buffer broadcast, its gradient all-reduce), so one process may run more passes than another.
    Under FSDP the model itself, whose every pass gathers the weights' shards from all processes."""
    return model.module if is_ddp(model) else model


def fitting_size(model, optimizer, accelerator, examples: list[dict], size: int, pad_id: int,
                 pack: int) -> tuple[int, int]:
    """Examples per forward pass for several processes (DDP), found before the first step: each process tries a
    forward and backward pass over the ``size`` longest examples (its whole share of a batch), with memory the size
    of the optimizer's state held as the steps will hold it (AdamW: two tensors the size of each trained weight),
    halving until one fits, and all take the smallest size that fitted everywhere. (size, halvings). A process that
    runs out of memory later, mid-step, halves its passes and runs its share of the step again while the others
    wait for it in :func:`all_reduce_gradients`; the tries find the size before the first step, with the optimizer's
    state (which the first step makes) counted, so that it is not found one failed pass at a time.
    Under FSDP every pass is collective and ``size`` is kept: a batch that does not fit is one line (:func:`_halve`)."""
    if accelerator.num_processes == 1 or accelerator.distributed_type.value == "FSDP":
        return size, 0
    inner, start = local_module(model), size
    longest = sorted(examples, key=lambda e: len(e["input_ids"]), reverse=True)
    said = ""
    state = [torch.empty_like(p) for group in optimizer.param_groups for p in group["params"]
             if p not in optimizer.state for _ in range(2)]  # none when resumed: the state is loaded
    kind = accelerator.device.type
    while True:
        fits = size
        try:  # each try leaves the random state as it found it: dropout's masks stay those of a run without tries
            with torch.random.fork_rng(devices=[] if kind == "cpu" else [accelerator.device],
                                       device_type="cuda" if kind == "cpu" else kind):
                batch = {key: v.to(accelerator.device) for key, v in collate(longest[:size], pad_id, pack).items()}
                inner(**batch, use_cache=False).loss.backward()
                del batch
        except Exception as e:  # noqa: BLE001  only running out of memory is handled; the rest go on up
            if not is_out_of_memory(e):
                raise
            fits, said = 0, first_line(e)
        inner.zero_grad(set_to_none=True)
        free_cached()  # here, not in the except block, whose error holds the failed try's tensors
        if fits or size == 1:
            break
        log.warning("out of memory with %d examples a pass on process %d: trying %d (%s)", size,
                    accelerator.process_index, size // 2, said)
        size //= 2
    del state
    everywhere = int(accelerator.gather(torch.tensor([fits], device=accelerator.device)).min())
    if not everywhere:
        raise OutOfMemory(f"out of memory with one example a pass on {'another' if fits else 'this'} process: lower "
                          f"--max-length (stage 1: block_size){f' ({said})' if said and not fits else ''}")
    return everywhere, int(math.log2(start // everywhere)) if everywhere < start else 0


def _halve(first: str, size: int, batch: int, accelerator) -> int:
    """The examples per forward pass after running out of memory (the error's ``first`` line) with ``size`` of a
    micro-batch of ``batch``: half as many, or one line that says what to do when there can be no fewer."""
    if min(size, batch) == 1:
        raise OutOfMemory(f"out of memory with one example a pass: lower --max-length (stage 1: block_size) "
                          f"({first})") from None
    size = min(size, batch)
    where = (f" on process {accelerator.process_index} of {accelerator.num_processes}"
             if accelerator.num_processes > 1 else "")
    log.warning("out of memory with %d examples a pass%s: %d from now on (%s)", size, where, size // 2, first)
    return size // 2


# Under FSDP every pass gathers the weights' shards from all processes: a process that runs out of memory mid-pass
# cannot run that pass again alone (the others wait in another gather). It notes half its passes' size here and the
# run stops; run again (by hand, or by the launcher: `accelerate launch --max_restarts N --rdzv_backend c10d` with
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, see the README), it resumes from its last checkpoint with passes of that size
# on every process.
RESTART_NOTE = "out-of-memory.json"  # in OUT/checkpoints, beside run.json


def restart_note(out: Path, identity: dict) -> dict:
    """The note an FSDP run of ``identity`` left when it ran out of memory ({"examples_a_pass", "halvings"}), or {}."""
    path = out / "checkpoints" / RESTART_NOTE
    try:
        note = read_json(path, dict) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    fits = note.get("run") == sha256_json(identity)[:16]
    return note if fits and isinstance(note.get("examples_a_pass"), int) and note["examples_a_pass"] >= 1 else {}


def stop_for_a_restart(first: str, size: int, batch: int, accelerator, out: Path, identity: dict, halvings: int):
    """Under FSDP, after running out of memory (the error's ``first`` line) with ``size`` examples a pass of a
    micro-batch of ``batch``: note half as many for the run's restart (:data:`RESTART_NOTE`) and stop, in one line."""
    size = min(size, batch)
    where = f"on process {accelerator.process_index} of {accelerator.num_processes}"
    if size == 1:
        raise OutOfMemory(f"out of memory with one example a pass {where}: lower --max-length (stage 1: block_size) "
                          f"({first})") from None
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(out / "checkpoints" / RESTART_NOTE, {"run": sha256_json(identity)[:16], "examples_a_pass": size // 2,
                                                  "halvings": halvings + 1, "error": first})
    raise OutOfMemory(f"out of memory {where} with {size} examples a pass ({first}); under FSDP the others wait for "
                      f"it in their passes, so the run stops: run it again and it resumes from its last checkpoint "
                      f"with {size // 2} examples a pass (a launch with --max_restarts does so by itself: see the "
                      f"README)") from None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed + epoch).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def process_share(index: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's examples of one global batch. A batch smaller than the number of processes (the last
    of an epoch) is topped up by repeating its examples, as accelerate's ``even_batches`` does, so no
    process gets an empty batch."""
    if len(index) < world:
        index = np.resize(index, world)
    return index[rank::world]


def evaluate(model, examples: list[dict], batch_size: int, pad_id: int, accelerator, max_batches: int | None = None) -> dict:
    """Mean token loss and perplexity over validation examples (each process its share, then gathered); a batch
    that runs out of memory is halved (:func:`memory.halving`; its parts' sums are the batch's). Under FSDP every
    pass gathers the weights' shards from all processes, so each process runs one pass a batch: one with no share
    of it (a last batch smaller than the processes) runs the batch's first example and counts nothing (it skipped
    the pass, and the others waited for it for good), and a pass that runs out of memory is one line (halved on
    one process, its passes would gather with the others' passes of another batch)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # summed loss, token count
    batches = [np.arange(i, min(i + batch_size, len(examples))) for i in range(0, len(examples), batch_size)]
    counts: collections.Counter[str] = collections.Counter()
    fsdp = accelerator.distributed_type.value == "FSDP"

    forward = local_module(model)  # DDP: no collective call, so a process may halve a batch, or have none to run

    def sums(part: list[dict]) -> list[tuple[float, int]]:
        batch = {k: v.to(accelerator.device) for k, v in collate(part, pad_id).items()}
        n = loss_tokens(batch)
        return [(forward(**batch).loss.float().item() * n, n)] if n or fsdp else []

    def collective(part: list[dict]) -> list[tuple[float, int]]:
        results, said = attempt(lambda: sums(part))
        if said is not None:
            raise OutOfMemory(f"out of memory on process {accelerator.process_index} of {accelerator.num_processes} "
                              f"with {len(part)} validation examples a pass: lower --batch-size, which validation "
                              f"batches are made of ({said})")
        return results

    with torch.no_grad():
        for index in batches[:max_batches]:
            mine = index[accelerator.process_index :: accelerator.num_processes]
            if fsdp:
                ran = collective([examples[i] for i in mine] or [examples[index[0]]])
                found = [(loss_sum, n) for loss_sum, n in ran if len(mine) and n]
            else:
                found = halving(sums, [examples[i] for i in mine], counts) if len(mine) else []
            for loss_sum, n in found:
                total += torch.tensor([loss_sum, n], device=accelerator.device)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    loss = float(total[0] / total[1]) if total[1] else float("nan")
    return {"eval_loss": round(loss, 5), "eval_perplexity": round(math.exp(min(loss, 50)), 4), "eval_tokens": int(total[1]),
            **({"eval_batches_halved": counts["batches_halved"]} if counts else {})}


# ----------------------------------------------------------------------------------------------- the loop
def _embedding_module_names(model) -> list[str]:
    names = []
    for target in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, module in model.named_modules():
            if module is target and name:
                names.append(name.rsplit(".", 1)[-1])
                break
    return sorted(set(names))


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "progress.json").is_file())


def require_train_extra(module: str):
    """``module`` (peft, accelerate), or one clear line saying how to install the training extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"training needs {module}, which the data-only install leaves out: "
                         "pip install 'speechinstruct[train]'") from None


def require_packing(model) -> None:
    """``pack`` needs transformers to build the attention mask from the position ids (``masking_utils``' packed
    sequences, transformers 4.54 and later) and a model that uses it; an older one would let every example
    attend to the ones before it in the row, silently. One line otherwise."""
    import transformers

    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        raise ValueError(f"pack: transformers {transformers.__version__} cannot keep packed examples apart "
                         "(its masks do not follow position ids); upgrade transformers or train without pack") from None
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # stage 3: under the adapters
    modeling = importlib.import_module(type(model).__module__)
    if not hasattr(modeling, "create_causal_mask"):
        raise ValueError(f"pack: {type(model).__name__} does not build its attention mask from position ids in "
                         f"transformers {transformers.__version__}; train it without pack")


def load_model(stage: int, base_model: str | Path, k: int, cfg: TrainConfig):
    """(tokenizer, model, tokens added): the base model with SpeechGPT's unit tokens added for ``k`` units; for
    stage 3 wrapped in LoRA adapters (with the embeddings trained too when the tokens were new)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(base_model).is_dir()
    if not local and (Path(base_model).exists() or str(base_model).startswith((".", "/", "~")) or str(base_model).count("/") > 1):
        raise FileNotFoundError(f"{base_model}: not a model folder (config.json, weights and tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=local)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_model), local_files_only=local,
                                                     attn_implementation=cfg.attention)
    except (ValueError, ImportError) as e:  # an attention kernel this model or machine does not have
        raise ValueError(f"{base_model}: attention {cfg.attention!r}: {str(e).splitlines()[0]}") from None
    added = expand_vocabulary(model, tokenizer, k)
    if cfg.gradient_checkpointing:  # transformers 5.24 renamed it (the old name warns that v6 removes it)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if stage == 3:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets, task_type="CAUSAL_LM",  # None: peft's for this model
                          # a base without the unit tokens must also learn (and save) their embeddings
                          modules_to_save=_embedding_module_names(model) if added else None)
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise ValueError(f"LoRA on {model.config.model_type}: {str(e).splitlines()[0]} "
                             "(name the layers with --lora-targets, e.g. q_proj,v_proj or c_attn)") from None
    return tokenizer, model, added


def save_checkpoint(accelerator, out: Path, progress: dict, keep: int) -> None:
    """``out/checkpoints/step-NNNNNNN``: every process writes its part of the state into one temporary folder;
    the main process alone prepares, renames and prunes folders (keeping the last ``keep``), between barriers."""
    final = out / "checkpoints" / f"step-{progress['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "progress.json").write_text(json.dumps(progress))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_final(model, tokenizer, out: Path, stage: int, cfg: TrainConfig, settings: dict) -> None:
    """``out/model`` (stage 3: ``out/adapter``, and with ``merge`` ``out/merged``) and ``train_config.json``."""
    final = out / ("adapter" if stage == 3 else "model")
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    if stage == 3 and cfg.merge:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    (out / "train_config.json").write_text(json.dumps(settings, indent=2))


def make_accelerator(cfg: TrainConfig):
    """An ``Accelerator`` in bf16 where the GPU has it (or as ``cfg.bf16`` says), seeded.
    cpu=True on machines without a GPU, so that torchrun / accelerate launch over CPU processes really distributes
    (gloo) instead of running N independent copies. accelerate keeps one AcceleratorState per process and refuses
    another precision than the first Accelerator's (a TRL trainer with bf16 earlier in a notebook, say): ours
    starts from a fresh one; the distributed environment (PartialState) stays."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if bf16 else "no",
                              cpu=not torch.cuda.is_available())
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type.value != "FSDP":
        # accelerate shards with FSDP over GPU processes only: over CPU processes it runs DDP instead (cpu=True)
        # or N unconnected copies writing the same files (cpu=False); both seen in a test
        raise ValueError("accelerate launch --use_fsdp: accelerate runs FSDP on GPUs only, and this machine has none; "
                         "launch without --use_fsdp to train over CPU processes (DDP over gloo: each holds the whole model)")
    set_seed(cfg.seed)
    return accelerator


# the parameter names Trainer decays no weight of (Trainer.get_decay_parameter_names), besides LayerNorm's
NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    """(AdamW over the trainable parameters, its learning-rate schedule over ``total_steps``: a warm-up of
    ``ceil(warmup_ratio * total_steps)`` steps), as Trainer makes them: weight decay on every weight but biases
    and norms (its ``get_decay_parameter_names``; one group, as before, when there is no decay, so that
    checkpoints of earlier runs load)."""
    from transformers import get_scheduler

    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.weight_decay:
        from transformers.trainer_pt_utils import get_parameter_names

        decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY))
        groups = [{"params": [p for name, p in trained if name in decayed], "weight_decay": cfg.weight_decay},
                  {"params": [p for name, p in trained if name not in decayed], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in trained], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


# What a rerun into the same OUT may change and still continue the run from its checkpoints: how long it runs, how
# often it saves, logs and evaluates, whether it merges, gradient clipping, and how it computes (precision,
# attention kernel, activation checkpointing). Any other setting, the stage, the base model or the data makes it
# another run: the batches would not be the ones the run saw, and a new lr, schedule or weight decay would not even
# take effect (the optimizer's and scheduler's saved state brings back the old ones).
RESUMABLE = ("epochs", "max_steps", "save_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches", "merge",
             "max_grad_norm", "bf16", "attention", "gradient_checkpointing")


# Keys of run.json that an earlier version did not write: checkpoints whose run.json lacks them are this run's when
# everything else agrees (run.json gains them).
ADDED_KEYS = ("base_weights",)


def run_identity(stage: int, base_model: str | Path, data: str | Path, k: int, cfg: TrainConfig) -> dict:
    """What makes a run the same run (``OUT/checkpoints/run.json``): paths resolved, the published dataset by the
    digest of its ``speechinstruct.json`` (its counts, sources and vocabulary), a local base model also by its
    weight files' names, sizes and modification times (rsync's quick check: a base trained again in place, such as
    stage 1's ``s1/model`` under a stage-2 run, is another run; hashing the weights would take about a second per
    GiB at each start)."""
    from ..io import sha256_file

    meta, base = Path(data) / "speechinstruct.json", Path(base_model)
    weights = sorted(p for p in base.iterdir() if p.suffix in (".safetensors", ".bin")) if base.is_dir() else []
    return json.loads(json.dumps({
        "stage": stage, "base_model": str(base.resolve()) if base.exists() else str(base_model),
        "base_weights": sha256_json([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights])[:16]
        if weights else None,
        "data": str(Path(data).resolve()), "dataset": sha256_file(meta)[:16] if meta.is_file() else None, "k": k,
        **cfg.model_dump(exclude=set(RESUMABLE))}))


def claim_run(accelerator, out: Path, identity: dict, resume: bool) -> None:
    """Refuse (one line) to resume from checkpoints of another run (``identity`` differs from the one in
    ``OUT/checkpoints/run.json``), or to start afresh (``resume`` False) where checkpoints are: this run's would mix
    with them, and a later resume would take the newest of either. Else write ``identity`` there."""
    path, found = out / "checkpoints" / "run.json", _checkpoints(out)
    if found and not resume:
        raise ValueError(f"{found[-1]}: {out} holds checkpoints of an earlier run, which this run's would mix with (a "
                         f"later resume takes the newest of either); resume it, remove {out / 'checkpoints'}, or give "
                         "another --out")
    old = read_json(path, dict, "; remove it to resume from these checkpoints") if found and path.is_file() else None
    if old is not None and old != identity and old == {k: v for k, v in identity.items() if k not in ADDED_KEYS}:
        old = None  # an earlier version's run.json: this run's, written again with the keys it lacked
    if old is not None and old != identity:
        diff = {key: (old.get(key), identity.get(key)) for key in sorted(set(old) | set(identity))
                if old.get(key) != identity.get(key)}
        raise ValueError(f"{path}: {out} holds checkpoints of another run {diff}; give another --out (or remove "
                         f"{out / 'checkpoints'} to start this one there)")
    if old is None and accelerator.is_main_process:  # a fresh start, or checkpoints an earlier version left
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, identity)


def resume_state(accelerator, out: Path, resume: bool) -> tuple[int, int, int]:
    """(step, epoch, batch in epoch) of the newest checkpoint in ``out``, its state loaded; (0, 0, 0) without one."""
    checkpoints = _checkpoints(out) if resume else []
    if not checkpoints:
        return 0, 0, 0
    accelerator.load_state(str(checkpoints[-1]))
    progress = json.loads((checkpoints[-1] / "progress.json").read_text())
    if accelerator.is_main_process:
        log.info(f"resuming from {checkpoints[-1]} (step {progress['step']})")
    return progress["step"], progress["epoch"], progress["batch_in_epoch"]


def keep_log_until(path: Path, step: int) -> None:
    """``log.jsonl`` without its records of steps after ``step``, where this run starts: a run that ended after
    logging steps it had not saved (killed, out of memory) makes them again, and logged each twice. A line that is
    no record of a step (the half-written last line of a killed run) goes too."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and 0 < _logged_step(line) <= step]
    if len(kept) < len(lines):
        write_text(path, "".join(kept))
        log.info("%s: %d records of steps after step %d left out; this run makes those steps again", path,
                 len(lines) - len(kept), step)


def _logged_step(line: str) -> int:
    """The step a line of ``log.jsonl`` records, 0 for a line that records none."""
    try:
        record = json.loads(line)
    except ValueError:
        return 0
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else 0


def write_log(accelerator, path: Path, record: dict) -> None:
    """One line of ``log.jsonl`` (and of the log, which ``-q`` keeps quiet), from the main process."""
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(json.dumps(record))


# Settings that some stages only read. One set for another stage changes nothing, and is easily taken for one that
# works (`--lora-targets` on stage 2, for a LoRA that is never made): the run says so.
STAGES_OF = {"block_size": (1,), "max_length": (2, 3), "mask": (2, 3), "lora_r": (3,), "lora_alpha": (3,),
             "lora_dropout": (3,), "lora_targets": (3,), "merge": (3,)}


def unused_settings(stage: int, cfg: TrainConfig) -> list[str]:
    """The settings given (in a settings file or as options) that ``stage`` does not read."""
    return sorted(key for key in cfg.model_fields_set if stage not in STAGES_OF.get(key, (stage,)))


def train(stage: int, base_model: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig | None = None,
          resume: bool = True) -> dict:
    require_train_extra("accelerate")
    if stage == 3:
        require_train_extra("peft")  # stage 3 trains LoRA adapters
    if stage not in CONFIG_FOR_STAGE:
        raise ValueError(f"--stage must be 1, 2 or 3, got {stage}")
    cfg = cfg or TrainConfig()
    out = Path(out)
    accelerator = make_accelerator(cfg)
    unused = unused_settings(stage, cfg)
    if unused and accelerator.is_main_process:
        log.warning("stage %d does not use %s: they change nothing", stage,
                    ", ".join(f"{key} (stage {' and '.join(map(str, STAGES_OF[key]))})" for key in unused))
    k = dataset_k(data)
    identity = run_identity(stage, base_model, data, k, cfg)
    claim_run(accelerator, out, identity, resume)  # before the model loads
    tokenizer, model, added = load_model(stage, base_model, k, cfg)
    examples = build_examples(stage, data, tokenizer, cfg)
    pack = cfg.max_length if cfg.pack and stage != 1 else 0  # rows of max_length
    if pack:
        require_packing(model)
    elif cfg.pack:
        log.info("pack: stage 1's examples are packed blocks already; nothing to change")
    eval_examples = build_examples(stage, data, tokenizer, cfg, split="validation")
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    # The scheduler is stepped by hand once per optimizer step: prepared by accelerate, it would step once per
    # process (batches are split by hand here, not by accelerate), and the schedule would run N times too fast.
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_ddp(model):  # no buffer broadcast before a forward pass: a collective call, which a pass run again after
        # running out of memory made on one process only (that hung); a causal LM's buffers (rotary frequencies) are
        # the same everywhere, and DDP's wrapper still copied them from the first process when it was made
        model.broadcast_buffers = False  # newer torch calls it forward_sync_buffers, with this name as its setter
    # how the model is spread: NO, MULTI_CPU / MULTI_GPU (DDP: a copy per process), FSDP (parameters sharded)
    distributed = {"type": accelerator.distributed_type.value, "processes": accelerator.num_processes}
    log.info("training on %d process(es), %s, mixed precision %s", accelerator.num_processes,
             distributed["type"], accelerator.mixed_precision)
    accelerator.register_for_checkpointing(scheduler)
    step, epoch, batch_in_epoch = resume_state(accelerator, out, resume)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        keep_log_until(out / "log.jsonl", step)
    history: list[dict] = []
    model.train()
    # size: examples per forward pass
    size, halved = fitting_size(model, optimizer, accelerator, examples, math.ceil(cfg.batch_size / accelerator.num_processes),
                                tokenizer.pad_token_id, pack)
    fsdp = distributed["type"] == "FSDP"
    noted = restart_note(out, identity) if fsdp else {}
    if noted and noted["examples_a_pass"] < size:  # this run's restart after running out of memory (FSDP)
        size, halved = noted["examples_a_pass"], int(noted.get("halvings") or 1)
        if accelerator.is_main_process:
            log.warning("%d examples a pass from step %d on: the run ran out of memory with more (%s)", size, step,
                        out / "checkpoints" / RESTART_NOTE)
    # tokens: every process's since this start; cycle: this step's micro-batches; halved_here: this process's halvings
    tokens, started, running, cycle, halved_here = 0, time.perf_counter(), [], [], 0
    grad_norms: list[float] = []  # the gradients' norm of each step since the last log line, before clipping
    # the loss of a step: the sum of its micro-batches' token losses over ``token_norm`` (the mean loss tokens of a
    # global batch: gradients of a usual size), made the mean over the step's loss tokens (on every process) at its end
    counts = [example_loss_tokens(e) for e in examples]
    token_norm = max(1.0, sum(counts) / math.ceil(len(examples) / cfg.batch_size))
    step_tokens, step_loss = 0, 0.0

    while step < total_steps:
        batches = epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch)
        while batch_in_epoch < len(batches) and step < total_steps:
            mine = process_share(batches[batch_in_epoch], accelerator.process_index, accelerator.num_processes)
            cycle.append([examples[i] for i in mine])
            step_tokens += sum(counts[i] for rank in range(accelerator.num_processes)
                               for i in process_share(batches[batch_in_epoch], rank, accelerator.num_processes))
            with accelerator.accumulate(model):
                redo: list[list[dict]] = []  # after running out of memory: the step's earlier micro-batches again
                while True:
                    try:
                        for earlier in redo:
                            backward(model, accelerator, earlier, tokenizer.pad_token_id, pack, size, token_norm)
                        # FSDP: every process as many passes as the largest share (the first process's) needs
                        passes = math.ceil(len(process_share(batches[batch_in_epoch], 0, accelerator.num_processes))
                                           / size) if fsdp else 0
                        loss = backward(model, accelerator, cycle[-1], tokenizer.pad_token_id, pack, size,
                                        token_norm, passes)
                        break
                    except Exception as e:  # noqa: BLE001  only running out of memory is handled; the rest go on up
                        if not is_out_of_memory(e):
                            raise
                        if fsdp:  # every pass gathers from all processes: none can run one again alone
                            stop_for_a_restart(first_line(e), size, max(map(len, cycle)), accelerator, out, identity,
                                               halved)
                        size = _halve(first_line(e), size, max(map(len, cycle)), accelerator)
                    halved_here += 1  # the step's gradients again from nothing, in parts of ``size``
                    model.zero_grad(set_to_none=True)  # an out-of-memory in the backward pass left some added
                    free_cached()  # here, not in the except block, whose error holds the failed try's tensors
                    redo = cycle[:-1]
                if accelerator.sync_gradients:
                    if is_ddp(model):  # the others may have waited here for this one
                        all_reduce_gradients(model)
                    scale = step_scale(token_norm, step_tokens, accelerator)
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.mul_(scale)
                    if cfg.max_grad_norm:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                            grad_norm = grad_norm.full_tensor()
                        grad_norms.append(float(grad_norm))
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                cycle = []
            batch_in_epoch += 1
            # the global batch's summed token losses over token_norm, and its tokens (shares may differ by one example)
            ours = torch.stack([loss.detach().float(), loss.new_tensor(float(sum(len(examples[i]["input_ids"]) for i in mine)))])
            summed, global_tokens = accelerator.reduce(ours, reduction="sum").tolist()
            step_loss += summed
            tokens += int(global_tokens)
            if not accelerator.sync_gradients:
                continue
            running.append(step_loss * token_norm / max(1, step_tokens))  # the step's mean loss over its loss tokens
            step_tokens, step_loss = 0, 0.0
            step += 1
            evaluate_now = eval_examples and (step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0))
            if step % cfg.log_every == 0 or step == total_steps or step == 1 or evaluate_now:
                record = {"step": step, "epoch": epoch, "loss": round(float(np.mean(running)), 5),
                          "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": round(tokens / max(time.perf_counter() - started, 1e-9), 1)}
                if grad_norms:  # the mean over the steps since the last line, as the loss
                    record["grad_norm"] = round(float(np.mean(grad_norms)), 5)
                if evaluate_now:
                    record.update(evaluate(model, eval_examples, cfg.batch_size, tokenizer.pad_token_id,
                                           accelerator, cfg.eval_batches))
                history.append(record)
                running, grad_norms = [], []
                write_log(accelerator, out / "log.jsonl", record)
            if step % cfg.save_every == 0 or step == total_steps:
                save_checkpoint(accelerator, out, {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch},
                                cfg.keep_checkpoints)
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0

    # the halvings: the tries' (the same on every process) and each process's own in the loop
    halved += int(accelerator.reduce(torch.tensor(halved_here, device=accelerator.device), reduction="sum"))
    accelerator.wait_for_everyone()
    # FSDP holds a shard of each weight per process: the whole state is gathered by every process together
    state = accelerator.get_state_dict(model) if distributed["type"] == "FSDP" else None
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if state is not None:
            # the unwrapped model's weights are still shards (LoRA's merge on them waits for the other processes
            # and fails): the main process saves (and merges) a whole copy on the CPU, the gathered weights in it
            final = load_model(stage, base_model, k, cfg)[1]
            final.load_state_dict(state, assign=True)
        save_final(final, tokenizer, out, stage, cfg,
                   {"stage": stage, "base_model": str(base_model), "data": str(data), "k": k, **cfg.model_dump(),
                    "distributed": distributed})
    # Every process ends its process group, as accelerate asks: one left to the interpreter's exit can abort
    # the process there (gloo's threads still hold work, pytorch/pytorch#179291: "terminate called without an
    # active exception", seen once on a 2-process FSDP run in CI), and the launcher counts the run as failed.
    accelerator.wait_for_everyone()
    # DDP's reducer holds the process group too: dropped after the group ended, its destructor joined gloo's worker
    # thread holding Python's lock, while that thread waited for the lock to free a tensor of the last collective
    # calls (a run that had saved its model never exited: seen once in CI, with py-spy). Dropped before, the group's
    # last holder is Python's own, whose destructor lets go of the lock.
    accelerator.free_memory()  # its own references to the model and the optimizer
    model = optimizer = None
    gc.collect()  # a reference cycle through the wrapper would keep it for the interpreter's next collection
    accelerator.end_training()
    return {"stage": stage, "steps": step, "distributed": distributed, "examples": len(examples),
            "eval_examples": len(eval_examples), "tokens_added": added, "tokens_this_run": tokens, "batches_halved": halved,
            "saved": str(out / ("adapter" if stage == 3 else "model")), **({"not_used": unused} if unused else {}),
            "history": history}
