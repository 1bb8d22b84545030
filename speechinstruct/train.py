"""``speechinstruct train``: SpeechGPT's three stages on any causal LM (LLaMA, Qwen, GPT-2, …).

1. modality-adaptation pre-training: causal LM on ``pretrain`` unit text, packed into blocks;
2. cross-modal instruction fine-tuning: full fine-tune on ``cross_modal``, loss on the response only;
3. chain-of-modality fine-tuning: LoRA on ``chain_of_modality``, loss on the response only.

The vocabulary gains ``<0>``…``<K-1>``, ``<sosp>``, ``<eosp>``, ``[Human]``, ``[SpeechGPT]``, ``<eoh>``,
``<eoa>`` (K from the dataset's ``speechinstruct.json``) as single tokens; new embedding rows start at the
mean of the old ones. The loop is plain PyTorch driven by ``accelerate`` (devices, bf16, gradient
accumulation, multi-GPU, checkpoint state): read it top to bottom. Batches come from a permutation drawn
from ``seed + epoch``, so a resumed run replays exactly the batches an uninterrupted run would see.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ("<sosp>", "<eosp>", "[Human]", "[SpeechGPT]", "<eoh>", "<eoa>")
CONFIG_FOR_STAGE = {1: "pretrain", 2: "cross_modal", 3: "chain_of_modality"}
RESPONSE_MARK = "[SpeechGPT]:"


@dataclass
class TrainConfig:
    """Defaults are SpeechGPT's published settings (``recipes/train-stage*.yaml`` set them per stage)."""

    epochs: float = 3
    lr: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    block_size: int = 1024            # stage 1 packing
    max_length: int = 512             # stages 2 and 3 (SpeechGPT: 512 and 1024)
    train_on_inputs: bool = False
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    merge: bool = False               # stage 3: also save base + adapter merged
    bf16: bool | None = None          # default: on when a GPU supports it
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


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
    meta = Path(data) / "speechinstruct.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing: --data must be a dataset written by `speechinstruct publish`")
    k = json.loads(meta.read_text()).get("k")
    if not k:
        raise ValueError(f"{meta}: no K recorded")
    return int(k)


# ------------------------------------------------------------------------------------------------ examples
def supervised_example(tokenizer, prefix: str, plain_text: str, max_length: int, train_on_inputs: bool) -> dict | None:
    """input_ids and labels; labels are -100 over the prefix and the [Human] turn (unless train_on_inputs)."""
    cut = plain_text.find(RESPONSE_MARK)
    if cut < 0:
        return None
    cut += len(RESPONSE_MARK)
    prompt = tokenizer(prefix + plain_text[:cut], add_special_tokens=False)["input_ids"]
    response = tokenizer(plain_text[cut:], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + prompt + response)[:max_length]
    labels = (list(ids[: len(bos) + len(prompt)]) if train_on_inputs else [-100] * (len(bos) + len(prompt))) + response
    labels = labels[:max_length]
    if all(label == -100 for label in labels):
        return None  # truncated before the response: nothing to learn
    return {"input_ids": ids, "labels": labels}


def packed_blocks(tokenizer, texts: list[str], block_size: int) -> list[dict]:
    """Stage 1: texts joined with EOS and cut into blocks of ``block_size`` tokens (the tail is dropped)."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"the pretrain data holds {len(stream)} tokens, fewer than one block of {block_size}; lower --block-size")
    return [{"input_ids": stream[i * block_size : (i + 1) * block_size], "labels": stream[i * block_size : (i + 1) * block_size]}
            for i in range(n)]


def build_examples(stage: int, data: str | Path, tokenizer, cfg: TrainConfig, split: str = "train") -> list[dict]:
    import datasets

    ds = datasets.load_dataset(str(data), CONFIG_FOR_STAGE[stage], split=split)
    if stage == 1:
        return packed_blocks(tokenizer, ds["text"], cfg.block_size)
    examples = [supervised_example(tokenizer, r["prefix"], r["plain_text"], cfg.max_length, cfg.train_on_inputs) for r in ds]
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ValueError(f"{data}: no usable {CONFIG_FOR_STAGE[stage]} examples")
    return examples


def collate(examples: list[dict], pad_id: int) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed + epoch).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


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


def train(stage: int, base_model: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig | None = None,
          resume: bool = True, quiet: bool = False) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    if stage not in CONFIG_FOR_STAGE:
        raise ValueError(f"--stage must be 1, 2 or 3, got {stage}")
    cfg = cfg or TrainConfig()
    out = Path(out)
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="bf16" if bf16 else "no")
    set_seed(cfg.seed)
    local = Path(base_model).is_dir()
    if not local and (Path(base_model).exists() or str(base_model).startswith((".", "/", "~")) or str(base_model).count("/") > 1):
        raise FileNotFoundError(f"{base_model}: not a model folder (config.json, weights and tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=local)
    model = AutoModelForCausalLM.from_pretrained(str(base_model), local_files_only=local)
    k = dataset_k(data)
    added = expand_vocabulary(model, tokenizer, k)
    if stage == 3:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_targets, task_type="CAUSAL_LM",
                          # a base without the unit tokens must also learn (and save) their embeddings
                          modules_to_save=_embedding_module_names(model) if added else None)
        model = get_peft_model(model, lora)
    examples = build_examples(stage, data, tokenizer, cfg)
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, batch_in_epoch = 0, 0, 0
    checkpoints = _checkpoints(out) if resume else []
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        progress = json.loads((checkpoints[-1] / "progress.json").read_text())
        step, epoch, batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        accelerator.print(f"resuming from {checkpoints[-1]} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    history: list[dict] = []
    model.train()
    tokens, started, running = 0, time.perf_counter(), []

    def save_checkpoint():
        final = out / "checkpoints" / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.save_state(str(tmp))
        (tmp / "progress.json").write_text(json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)

    while step < total_steps:
        batches = epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch)
        while batch_in_epoch < len(batches) and step < total_steps:
            index = batches[batch_in_epoch]
            mine = index[accelerator.process_index :: accelerator.num_processes]  # each process its share
            batch = {key: v.to(accelerator.device) for key, v in collate([examples[i] for i in mine], tokenizer.pad_token_id).items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            batch_in_epoch += 1
            tokens += int(batch["attention_mask"].sum())
            running.append(loss.item())
            if accelerator.sync_gradients:
                step += 1
                if step % cfg.log_every == 0 or step == total_steps or step == 1:
                    record = {"step": step, "epoch": epoch, "loss": round(float(np.mean(running)), 5),
                              "lr": scheduler.get_last_lr()[0],
                              "tokens_per_s": round(tokens / max(time.perf_counter() - started, 1e-9), 1)}
                    history.append(record)
                    running = []
                    if accelerator.is_main_process:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                        if not quiet:
                            print(json.dumps(record), flush=True)
                if step % cfg.save_every == 0 or step == total_steps:
                    save_checkpoint()
        if batch_in_epoch >= len(batches):
            epoch, batch_in_epoch = epoch + 1, 0

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        final = out / ("adapter" if stage == 3 else "model")
        unwrapped.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if stage == 3 and cfg.merge:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        (out / "train_config.json").write_text(json.dumps({"stage": stage, "base_model": str(base_model), "data": str(data),
                                                           "k": k, **asdict(cfg)}, indent=2))
    return {"stage": stage, "steps": step, "examples": len(examples), "tokens_added": added,
            "saved": str(out / ("adapter" if stage == 3 else "model")), "history": history}
