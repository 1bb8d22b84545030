import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from speechinstruct.model import train as T
from speechinstruct.pipeline import run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    recipe = {"name": "tiny", "workdir": str(tmp / "work"), "demo_corpus": {"sentences": 16, "seed": 2},
              "kmeans": {"k": 12, "max_frames": 20000},
              "compose": {"pretrain": {"dev_fraction": 0.25}, "chain_of_modality": {"max_pairs": 6, "all_formats": True}},
              "output": {"vocoder": "none"}}  # the report's listening table is tested elsewhere (test_listen.py)
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run(tmp / "r.yaml")["valid"]
    return tmp / "work" / "dataset"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny LLaMA-style model and a BPE tokenizer trained here: no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["This is input: transcribe the speech please.", "Please read this text aloud.",
              "THE OLD SAILOR WALKED TO THE RED HOUSE", "You are an AI assistant whose name is SpeechGPT."] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2))
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_vocabulary_expansion_single_tokens_and_idempotent(base_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    old = model.get_input_embeddings().weight.detach().clone()
    assert T.expand_vocabulary(model, tok, 12) == 18
    ids = tok("<sosp><11><0><7><eosp>", add_special_tokens=False)["input_ids"]
    assert ids == tok.convert_tokens_to_ids(["<sosp>", "<11>", "<0>", "<7>", "<eosp>"]) and len(set(ids)) == 5
    for token in T.SPECIAL_TOKENS:
        assert tok(token, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(token)]
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == old.shape[0] + 18
    torch.testing.assert_close(emb[-1], old.mean(0))
    assert T.expand_vocabulary(model, tok, 12) == 0 and model.get_input_embeddings().weight.shape[0] == len(tok)


def speechgpt_cm_sft_example(tokenizer, prefix, plain_text, max_length):
    """SpeechGPT's cm_sft.py/com_sft.py preprocessing, re-derived from its behaviour (SPEC.md): prefix +
    plain_text as one string through a BOS-adding tokenizer, truncated, EOS appended when it fits; labels
    -100 over as many tokens as the prefix alone tokenises to."""
    def tokenize(text, add_eos):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:max_length]
        if ids[-1] != tokenizer.eos_token_id and len(ids) < max_length and add_eos:
            ids.append(tokenizer.eos_token_id)
        return ids
    full = tokenize(prefix + plain_text, True)
    n = len(tokenize(prefix, False))
    return {"input_ids": full, "labels": [-100] * n + full[n:]}


def test_labels_masks(base_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_model)
    T.add_unit_tokens(tok, 12)
    prefix = "PREFIX\n"
    plain = "[Human]: Please read this text aloud. This is input: THE OLD SAILOR<eoh> [SpeechGPT]: <sosp><3><11><eosp><eoa>"
    whole = [tok.bos_token_id] + tok(prefix + plain, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # SpeechGPT's mask: the prefix only; the [Human] turn is trained on
    ex = T.supervised_example(tok, prefix, plain, 512, mask="prefix")
    assert ex["input_ids"] == whole  # one tokenisation of the whole text, BOS first, EOS last
    n = 1 + len(tok(prefix, add_special_tokens=False)["input_ids"])
    assert ex["labels"] == [-100] * n + whole[n:]
    assert tok.decode(ex["labels"][n:n + 1]) == "[Human]"
    # answer-only loss: everything up to and including "[SpeechGPT]:" is masked
    ex = T.supervised_example(tok, prefix, plain, 512, mask="prompt")
    first = next(i for i, label in enumerate(ex["labels"]) if label != -100)
    assert tok.decode(ex["input_ids"][first - 2:first]) == "[SpeechGPT]:"
    assert tok.decode(ex["input_ids"][first:]).replace(" ", "") == "<sosp><3><11><eosp><eoa></s>"
    assert T.supervised_example(tok, prefix, plain, 512, mask="none")["labels"] == whole
    assert T.supervised_example(tok, prefix, plain, 5, mask="prompt") is None  # cut before the answer
    with pytest.raises(ValueError, match="mask must be one of prefix, prompt, assistant, none"):
        T.TrainConfig(mask="response")


@pytest.fixture(scope="module")
def llama_sentencepiece(tmp_path_factory):
    """A LLaMA tokenizer (SentencePiece, byte fallback, BOS added) trained here, and a tiny LLaMA."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from speechinstruct.speechgpt import SPEECHGPT_PREFIX
    folder = tmp_path_factory.mktemp("llama-sp")
    corpus = [SPEECHGPT_PREFIX, "This is input: transcribe the speech please. A cat sat on a mat.",
              "THE OLD SAILOR WALKED TO THE RED HOUSE", "Please read this text aloud. Answer: A good idea."] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=3)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("A")["input_ids"][0] == tok.bos_token_id == 1  # a LLaMA tokenizer adds BOS
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    return folder


def test_records_tokenise_and_mask_as_speechgpts_own_preprocessing(llama_sentencepiece, dataset):
    """Every published cross-modal and chain-of-modality record, through SpeechGPT's cm_sft/com_sft
    preprocessing and through ours (speechgpt profile), gives the same ids and labels on a LLaMA tokenizer."""
    import datasets
    from transformers import AutoTokenizer

    from speechinstruct.speechgpt import SPEECHGPT_PREFIX
    tok = AutoTokenizer.from_pretrained(llama_sentencepiece)
    T.add_unit_tokens(tok, 12)
    checked = 0
    for config, max_length in (("cross_modal", 512), ("chain_of_modality", 1024)):
        for r in datasets.load_dataset(str(dataset), config, split="train"):
            assert r["prefix"] == SPEECHGPT_PREFIX
            ours = T.supervised_example(tok, r["prefix"], r["plain_text"], max_length, mask="prefix")
            assert ours == speechgpt_cm_sft_example(tok, r["prefix"], r["plain_text"], max_length), r["id"]
            checked += 1
    assert checked >= 30


def test_speechgpt_prefix_is_byte_exact():
    from speechinstruct.speechgpt import DEFAULT_PREFIX
    assert DEFAULT_PREFIX == ("You are an AI assistant whose name is SpeechGPT.\n- SpeechGPT is a intrinsic cross-modal "
                              "conversational language model that is developed by Fudan University.  SpeechGPT can "
                              "understand and communicate fluently with human through speech or text chosen by the "
                              "user.\n- It can perceive cross-modal inputs and generate cross-modal outputs.\n")


def test_packaged_stage_settings_are_speechgpts():
    s1, s2, s3 = (T.settings_for_stage(n) for n in (1, 2, 3))
    assert (s1["lr"], s1["scheduler"], s1["block_size"], s1["epochs"]) == (5e-5, "linear", 1024, 3)
    assert (s2["lr"], s2["max_length"], s2["mask"], s2["epochs"], s2["scheduler"]) == (2e-5, 512, "prefix", 3, "cosine")
    assert (s3["epochs"], s3["max_length"], s3["lora_r"], s3["lora_alpha"], s3["lora_dropout"]) == (300, 1024, 8, 16, 0.05)
    assert all(s["max_grad_norm"] == 1.0 for s in (s1, s2, s3))
    for s in (s1, s2, s3):
        T.TrainConfig.from_dict(s)  # every key is a real setting


def test_the_warm_up_is_as_many_steps_as_trainers():
    """SpeechGPT's 3 % warm-up is Trainer's ``math.ceil(steps * warmup_ratio)`` steps: we took the floor (one step
    fewer for 50 or 110 steps), and none for a run of fewer than 34 steps. The schedule's LR at each step is
    Trainer's own scheduler's."""
    from transformers import TrainingArguments, get_scheduler

    for steps, ratio in ((50, 0.03), (110, 0.03), (20, 0.03), (1000, 0.03), (7, 0.5), (10, 0.0)):
        # transformers 5: a warmup_steps below 1 is the ratio (4.x's warmup_ratio, whose rule this is)
        expected = TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(steps)
        cfg = T.TrainConfig.from_dict({**T.settings_for_stage(2), "warmup_ratio": ratio})
        weight = torch.nn.Parameter(torch.zeros(1))
        ours = T.make_optimizer(torch.nn.Linear(1, 1), cfg, steps)[1]
        theirs = get_scheduler("cosine", torch.optim.AdamW([weight], lr=cfg.lr), num_warmup_steps=expected,
                               num_training_steps=steps)
        curve = []
        for _ in range(steps):
            curve.append((ours.get_last_lr()[0], theirs.get_last_lr()[0]))
            ours.optimizer.step(), ours.step(), theirs.optimizer.step(), theirs.step()
        assert [a for a, _ in curve] == [b for _, b in curve], (steps, ratio)


def test_weight_decay_leaves_biases_and_norms_as_trainers_does(base_model):
    """With weight decay (SpeechGPT's is 0), Trainer decays every weight but biases and norms; we decayed the
    norms' weights too. Our optimizer's groups are Trainer's own choice of names (GPT-2 has biases and LayerNorms,
    LLaMA RMSNorms); with no decay, one group as before (earlier runs' checkpoints hold one)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer

    models = [AutoModelForCausalLM.from_pretrained(base_model),
              GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300))]
    for model in models:
        model.lm_head.weight.requires_grad_(False)  # a frozen weight is in no group
        names = {id(p): name for name, p in model.named_parameters()}
        decayed = set(Trainer.get_decay_parameter_names(None, model))
        cfg = T.TrainConfig.from_dict({**T.settings_for_stage(2), "weight_decay": 0.1})
        groups = T.make_optimizer(model, cfg, 10)[0].param_groups
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {names[id(p)] for p in groups[0]["params"]} == trained & decayed
        assert {names[id(p)] for p in groups[1]["params"]} == trained - decayed
        assert {"model.norm.weight", "transformer.ln_f.weight", "transformer.h.0.attn.c_attn.bias"} & (trained - decayed)
        groups = T.make_optimizer(model, T.TrainConfig.from_dict(T.settings_for_stage(2)), 10)[0].param_groups
        assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_stage1_packs_blocks_as_ma_pretrain(base_model, dataset):
    """BOS before each line, no EOS, the short last block kept (SpeechGPT's ma_pretrain.py)."""
    import datasets
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_model)
    T.add_unit_tokens(tok, 12)
    lines = datasets.load_dataset(str(dataset), "pretrain", split="train")["text"]
    blocks = T.build_examples(1, dataset, tok, T.TrainConfig(block_size=64))
    stream = [t for line in lines for t in [tok.bos_token_id] + tok(line, add_special_tokens=False)["input_ids"]]
    assert [t for b in blocks for t in b["input_ids"]] == stream and tok.eos_token_id not in stream
    assert all(len(b["input_ids"]) == 64 for b in blocks[:-1]) and 0 < len(blocks[-1]["input_ids"]) <= 64
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert stream.count(tok.bos_token_id) == len(lines)


def fast(**kw):
    return T.TrainConfig(**{"lr": 3e-3, "batch_size": 4, "epochs": 100, "warmup_ratio": 0.0, "scheduler": "constant",
                            "save_every": 2, "log_every": 1, "block_size": 64, **kw})


def test_three_stages_loss_decreases_and_chain(base_model, dataset, tmp_path):
    s1 = T.train(1, base_model, dataset, tmp_path / "s1", fast(max_steps=25))
    losses = [h["loss"] for h in s1["history"]]
    assert losses[-1] < losses[0] * 0.8
    s2 = T.train(2, tmp_path / "s1" / "model", dataset, tmp_path / "s2", fast(max_steps=25))
    assert s2["tokens_added"] == 0  # stage 1's vocabulary carried over
    assert s2["history"][-1]["loss"] < s2["history"][0]["loss"]
    s3 = T.train(3, tmp_path / "s2" / "model", dataset, tmp_path / "s3", fast(max_steps=6, merge=True, max_length=1024))
    assert s3["steps"] == 6 and s3["tokens_added"] == 0
    assert (tmp_path / "s3" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "s3" / "merged" / "config.json").is_file()
    cfg = json.loads((tmp_path / "s3" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    # validation loss and perplexity are logged at the end (stage 1's pretrain validation split)
    last = json.loads((tmp_path / "s1" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 25 and last["eval_tokens"] > 0 and last["eval_perplexity"] > 1
    # the adapter loads back and generates
    from speechinstruct.model.chat import Chat
    bot = Chat(tmp_path / "s2" / "model", lora=tmp_path / "s3" / "adapter")
    reply = bot.reply("<sosp><1><2><3><eosp>", max_new_tokens=8)
    assert set(reply) == {"answer", "text_question", "text_answer", "unit_answer", "units", "raw"}
    merged = Chat(tmp_path / "s3" / "merged").reply("<sosp><1><2><3><eosp>", max_new_tokens=8)
    assert merged["raw"] == reply["raw"]


def test_accumulated_micro_batches_train_as_their_whole_batch(base_model, dataset, tmp_path):
    """A step's loss is the mean over all its loss tokens, as one pass over the whole batch takes it (transformers'
    Trainer since 4.46, huggingface/transformers#34242): batches of 4 accumulated twice train as batches of 8 (the
    same 8 examples a step). Each micro-batch's mean, averaged over the micro-batches, gave the tokens of short
    examples more weight: the logged losses differed by up to 1.5e-4 (2.7e-5 of the loss) in 3 steps."""
    whole = T.train(2, base_model, dataset, tmp_path / "whole", fast(max_steps=3, batch_size=8, seed=5))
    accumulated = T.train(2, base_model, dataset, tmp_path / "acc", fast(max_steps=3, batch_size=4, grad_accum=2, seed=5))
    assert [h["loss"] for h in accumulated["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "whole" / "model"), _weights(tmp_path / "acc" / "model"), stray=1e-3)


def test_resume_continues_from_saved_step(base_model, dataset, tmp_path):
    straight = T.train(2, base_model, dataset, tmp_path / "a", fast(max_steps=6))
    T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=4))
    resumed = T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=6))
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert straight["history"][-1]["loss"] == pytest.approx(resumed["history"][-1]["loss"], rel=1e-4)
    # another run's checkpoints (another lr, data, base model or stage) were resumed from without a word
    with pytest.raises(ValueError, match=r"run\.json: .* holds checkpoints of another run \{'lr': \(0\.003, 0\.001\)\}"):
        T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=8, lr=1e-3))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run, which this run's would mix with"):
        T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=8), resume=False)
    (tmp_path / "b" / "checkpoints" / "run.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"run\.json: must be a JSON object, got list; remove it to resume"):
        T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=7))
    # checkpoints an earlier version left (no run.json) are resumed from, as before
    (tmp_path / "b" / "checkpoints" / "run.json").unlink()
    assert [h["step"] for h in T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=7))["history"]] == [7]
    assert (tmp_path / "b" / "checkpoints" / "run.json").is_file()


def test_a_restart_note_counts_for_its_own_run_only(tmp_path):
    """The passes' size an FSDP run noted when it ran out of memory is taken by that run's restart, not by another
    run in the same folder (other settings, data or base model: its checkpoints are refused anyway)."""
    from speechinstruct.io import sha256_json

    identity = {"stage": 1, "lr": 0.001, "batch_size": 8}
    (tmp_path / "checkpoints").mkdir()
    note = tmp_path / "checkpoints" / T.RESTART_NOTE
    note.write_text(json.dumps({"run": sha256_json(identity)[:16], "examples_a_pass": 2, "halvings": 1}))
    assert T.restart_note(tmp_path, identity)["examples_a_pass"] == 2
    assert T.restart_note(tmp_path, {**identity, "batch_size": 16}) == {}
    for broken in ("[2]", "{", json.dumps({"run": sha256_json(identity)[:16], "examples_a_pass": 0})):
        note.write_text(broken)
        assert T.restart_note(tmp_path, identity) == {}


def test_a_resumed_run_logs_each_step_once(base_model, dataset, tmp_path):
    """A run that ended after logging step 5 but before saving it (killed, out of memory) resumes from step 4's
    checkpoint and makes step 5 again: its log had step 5 twice (a loss curve drawn from it went back on itself),
    and a record half written when it was killed ran into the next."""
    T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=5))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000005")  # as if it had ended before saving step 5
    first = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    with open(tmp_path / "b" / "log.jsonl", "a") as f:
        f.write('{"step": 6, "epoch": 0, "lo')  # and killed while writing step 6's record
    resumed = T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=6))
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[:4] == first[:4] and log[4:] == resumed["history"]


def test_resume_refuses_a_base_model_rewritten_in_place(base_model, dataset, tmp_path):
    """A stage-2 run whose base (``s1/model``) was trained again in place resumed as the same run: the identity
    held the base's path only. Its weight files' sizes and times are in it now (rsync's quick check)."""
    base = tmp_path / "base"
    shutil.copytree(base_model, base)
    T.train(2, base, dataset, tmp_path / "b", fast(max_steps=2))
    identity = json.loads((tmp_path / "b" / "checkpoints" / "run.json").read_text())
    # run.json of an earlier version (no base_weights): resumed from, and completed
    (tmp_path / "b" / "checkpoints" / "run.json").write_text(json.dumps(
        {k: v for k, v in identity.items() if k != "base_weights"}))
    assert [h["step"] for h in T.train(2, base, dataset, tmp_path / "b", fast(max_steps=3))["history"]] == [3]
    assert json.loads((tmp_path / "b" / "checkpoints" / "run.json").read_text()) == identity
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    with pytest.raises(ValueError, match=r"run\.json: .* holds checkpoints of another run \{'base_weights': "):
        T.train(2, base, dataset, tmp_path / "b", fast(max_steps=4))


def test_cli_train_and_chat(base_model, dataset, tmp_path):
    from typer.testing import CliRunner
    from speechinstruct.cli import app
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--stage", "2", "--base-model", str(base_model), "--data", str(dataset),
                                 "--out", str(tmp_path / "s2"), "--max-steps", "2", "--batch-size", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    result = runner.invoke(app, ["chat", "--model", str(tmp_path / "s2" / "model"), "--text", "hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"answer", "text_question", "text_answer", "unit_answer", "units", "raw"}
    result = runner.invoke(app, ["train", "--stage", "4", "--base-model", str(base_model), "--data", str(dataset), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--stage must be 1, 2 or 3" in result.stderr


def test_chat_samples_as_speechgpts_cli_infer_when_asked(base_model, tmp_path, monkeypatch):
    """chat decoded greedily, with no way to sample: SpeechGPT's cli_infer.py samples (temperature 0.7, top-p 0.8,
    top-k 50, at least 10 new tokens). `--sample` generates with those, `--temperature`/`--top-p`/`--top-k` change
    one (and imply `--sample`, said in a note), `--seed` gives the same answer again; greedy stays the default."""
    from transformers import GenerationMixin
    from typer.testing import CliRunner

    from speechinstruct.cli import app

    asked = []
    generate = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", lambda self, *a, **k: asked.append(k) or generate(self, *a, **k))
    runner = CliRunner()
    chat = ["chat", "--model", str(base_model), "--text", "hello", "--max-new-tokens", "12"]
    greedy = runner.invoke(app, chat)
    assert greedy.exit_code == 0, greedy.output
    assert asked[-1]["do_sample"] is False and "temperature" not in asked[-1]
    answers = []
    for _ in range(2):
        sampled = runner.invoke(app, [*chat, "--sample", "--seed", "3"])
        assert sampled.exit_code == 0, sampled.output
        answers.append(json.loads(sampled.stdout)["raw"])
        assert {k: asked[-1][k] for k in ("do_sample", "temperature", "top_p", "top_k", "min_new_tokens")} == \
            {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 50, "min_new_tokens": 10}
    assert answers[0] == answers[1]
    hotter = runner.invoke(app, [*chat, "--temperature", "1.3", "--top-k", "0"])
    assert hotter.exit_code == 0, hotter.output
    assert "note: --temperature, --top-k imply --sample" in hotter.stderr
    assert (asked[-1]["do_sample"], asked[-1]["temperature"], asked[-1]["top_p"], asked[-1]["top_k"]) == (True, 1.3, 0.8, 0)
    for option, value, said in (("--temperature", "0", "--temperature must be a finite number above 0"),
                                ("--temperature", "inf", "--temperature must be a finite number above 0"),
                                ("--top-p", "1.5", "--top-p must be above 0 and at most 1"),
                                ("--top-k", "-1", "--top-k must be 0 (off) or more")):
        bad = runner.invoke(app, [*chat, option, value])
        assert bad.exit_code == 2 and f"error: {said}, got {float(value) if option != '--top-k' else int(value)}" \
            in bad.stderr, bad.output
    bad = runner.invoke(app, [*chat, "--seed", "-1"])  # numpy's "Seed must be between 0 and 2**32 - 1", after loading
    assert bad.exit_code == 2 and "--seed" in bad.output and "Traceback" not in bad.output, bad.output


def _bytelevel_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["This is input: transcribe the speech please.", "Please read this text aloud.",
              "THE OLD SAILOR WALKED TO THE RED HOUSE", "You are an AI assistant whose name is SpeechGPT."] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def architectures(tmp_path_factory, llama_sentencepiece):
    """Tiny Qwen2 and GPT-2 (byte-level BPE, as theirs) beside the SentencePiece LLaMA."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
    tok = _bytelevel_tokenizer()
    torch.manual_seed(0)
    models = {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=4096,
                                           bos_token_id=1, eos_token_id=2)),
    }
    folders = {"llama": llama_sentencepiece}
    for name, model in models.items():
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("arch,lora_targets", [("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]),
                                               ("gpt2", ["c_attn"])])
def test_three_stages_on_llama_qwen2_and_gpt2(architectures, dataset, tmp_path, arch, lora_targets):
    """Any causal LM: LoRA targets come from peft's table for the architecture (GPT-2: c_attn)."""
    base = architectures[arch]
    T.train(1, base, dataset, tmp_path / "s1", fast(max_steps=2))
    T.train(2, tmp_path / "s1" / "model", dataset, tmp_path / "s2", fast(max_steps=2))
    s3 = T.train(3, tmp_path / "s2" / "model", dataset, tmp_path / "s3", fast(max_steps=2, max_length=1024))
    assert s3["steps"] == 2
    cfg = json.loads((tmp_path / "s3" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == lora_targets


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_batches_give_the_padded_batches_losses(architectures, dataset, tmp_path, arch):
    """``pack``: a batch's examples end to end in one row, no padding, position ids restarting per example: the
    same losses as the padded batches, step for step (stage 2, and stage 3's LoRA on LLaMA), so no example
    attends to another and no loss crosses from one to the next. Dropout off: its draws follow the tensors'
    shapes (GPT-2's 0.1 gave 1e-4 apart at the first step)."""
    base = architectures[arch]
    if arch == "gpt2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base)
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
        model.save_pretrained(tmp_path / "gpt2")
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "gpt2")
        base = tmp_path / "gpt2"
    padded = T.train(2, base, dataset, tmp_path / "a", fast(max_steps=3, max_length=2048))  # rows of 2048 tokens:
    packed = T.train(2, base, dataset, tmp_path / "b", fast(max_steps=3, max_length=2048, pack=True))  # all 4 in one
    assert [h["loss"] for h in packed["history"]] == pytest.approx([h["loss"] for h in padded["history"]], rel=1e-4)
    batch = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]},
             {"input_ids": [1, 8, 9, 4], "labels": [1, 8, 9, 4]}]
    rows = T.collate(batch, pad_id=0, pack=5)  # rows of at most 5 tokens, first fit
    assert rows["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 9, 4, 0]] and "attention_mask" not in rows
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert rows["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 8, 9, 4, -100]]
    # the loss tokens train() counts a step's loss over, example by example, are those of either batch
    assert sum(map(T.example_loss_tokens, batch)) == T.loss_tokens(rows) == T.loss_tokens(T.collate(batch, 0)) == 6
    if arch == "llama":
        padded = T.train(3, base, dataset, tmp_path / "c", fast(max_steps=2, max_length=2048, lora_dropout=0.0))
        packed = T.train(3, base, dataset, tmp_path / "d", fast(max_steps=2, max_length=2048, lora_dropout=0.0, pack=True))
        assert [h["loss"] for h in packed["history"]] == pytest.approx([h["loss"] for h in padded["history"]], rel=1e-4)


def test_unknown_lora_targets_are_one_clear_line(architectures, dataset, tmp_path):
    with pytest.raises(ValueError, match=r"LoRA on gpt2: .*--lora-targets"):
        T.train(3, architectures["gpt2"], dataset, tmp_path / "s3", fast(max_steps=1, lora_targets=["q_proj"]))


def test_process_share_never_empty():
    import numpy as np
    index = np.array([7, 3, 5])
    assert [T.process_share(index, r, 2).tolist() for r in range(2)] == [[7, 5], [3]]
    last = np.array([9])  # the last batch of an epoch, smaller than the number of processes
    assert [T.process_share(last, r, 4).tolist() for r in range(4)] == [[9], [9], [9], [9]]


def test_chat_prompt_is_the_training_format(base_model, dataset, tmp_path):
    """The prompt chat sends is exactly the beginning of the records the model was trained on, token for token."""
    import datasets
    from speechinstruct.model.chat import Chat
    T.train(2, base_model, dataset, tmp_path / "s2", fast(max_steps=1))
    for config, kind in (("chain_of_modality", "chain_of_modality"), ("cross_modal", "cross_modal")):
        bot = Chat(tmp_path / "s2" / "model", kind=kind)
        for r in datasets.load_dataset(str(dataset), config, split="train"):
            human = r["plain_text"][len("[Human]: "): r["plain_text"].index("<eoh>")]
            prompt = bot.prompt(human)
            assert (r["prefix"] + r["plain_text"]).startswith(prompt) and prompt.endswith("[SpeechGPT]:")
            example = T.supervised_example(bot.tokenizer, r["prefix"], r["plain_text"], 4096, mask="none")
            ids = bot.prompt_ids(human)
            assert example["input_ids"][: len(ids)] == ids, r["id"]


def cli_infer_postprocess(decoded: str) -> dict:
    """SpeechGPT's cli_infer.py answer split, re-derived: on the decoded sequence, text question between
    "[SpeechGPT] :" and "; [ta]", text answer between "[ta]" and "; [ua]", unit answer after "[ua]"."""
    import re

    def between(text, a, b):
        m = re.search(f"{re.escape(a)}(.*?){re.escape(b)}", text, re.S)
        return m.group(1) if m else ""
    return {"answer": between(decoded + "<eoa>", "[SpeechGPT] :", "<eoa>"),
            "tq": between(decoded, "[SpeechGPT] :", "; [ta]") if "[ta]" in decoded else "",
            "ta": between(decoded, "[ta]", "; [ua]") if "[ta]" in decoded else "",
            "ua": between(decoded + "<eoa>", "[ua]", "<eoa>") if "[ua]" in decoded else ""}


def test_answers_parse_like_cli_infer(dataset):
    import datasets
    from speechinstruct.model.chat import parse_answer
    from speechinstruct.units import from_text
    formats = set()
    for r in datasets.load_dataset(str(dataset), "chain_of_modality", split="train"):
        answer = r["plain_text"].split("[SpeechGPT]:", 1)[1]
        theirs = cli_infer_postprocess(r["plain_text"].replace("[SpeechGPT]:", "[SpeechGPT] :"))
        ours = parse_answer(answer)
        assert ours["answer"] == theirs["answer"].strip()
        if "[ua]" in answer:  # cli_infer finds a text answer only before "; [ua]"; we also read "[ta] …<eoa>"
            assert (ours["text_question"], ours["text_answer"], ours["unit_answer"]) == \
                tuple(x.strip() for x in (theirs["tq"], theirs["ta"], theirs["ua"].removesuffix("<eoa>."))), r["id"]
        else:
            assert (ours["text_question"], ours["unit_answer"]) == (theirs["tq"].strip(), "")
        if r["format"].endswith("speech"):
            assert ours["units"] == r["response_units"] == from_text(ours["unit_answer"])
        if r["format"].startswith("speech"):
            assert ours["text_question"] == r["instruction"]
        assert ours["text_answer"] == r["response"]
        formats.add(r["format"])
    assert formats == {"speech-speech", "speech-text", "text-speech", "text-text"}


def _processes(base_model, dataset, epochs: int, batch_size: int, stage: int = 2) -> tuple[int, dict, list[str]]:
    """A free loopback port, the environment and ``-m speechinstruct.cli train``'s arguments for runs over several
    CPU processes."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["-m", "speechinstruct.cli", "train", "--stage", str(stage), "--base-model", str(base_model), "--data", str(dataset),
            "--epochs", str(epochs), "--batch-size", str(batch_size), "--grad-accum", "1", "--lr", "1e-3",
            "--save-every", "4", "-q"]
    return port, {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}, args


def test_two_processes_follow_the_one_process_lr_curve_and_each_ends_its_process_group(base_model, dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo on loopback): the LR schedule steps once per optimizer step, as
    with one process, a last batch smaller than the number of processes (31 + 1 of 32 records) trains, and the
    losses and weights are one process's.

    A 2-process run left its process group to the interpreter's exit, where gloo's threads can abort the process
    after the training was saved (`terminate called without an active exception`, exit -6: seen once in CI); the
    launcher then counts the run as failed. Each process ends it now, when train() returns. And no DDP wrapper is
    left when it does: the wrapper's reducer, holding the group's last reference, joined gloo's worker thread with
    Python's lock held while that thread waited for the lock (a process that had saved the model hung for good:
    seen once in CI, py-spy showing both threads). The CLI runs as a user runs it, watched: the DDP wrappers alive
    when the group is ended, and whether a group is left when the CLI returns."""
    import sys

    from typer.testing import CliRunner

    from speechinstruct.cli import app

    port, env, args = _processes(base_model, dataset, epochs=3, batch_size=31)
    one = CliRunner().invoke(app, [*args[2:], "--out", str(tmp_path / "one")])  # one process: this one
    assert one.exit_code == 0, one.output[-2000:]
    watched = ("import gc, os, sys, torch.distributed as d\n"
               "from torch.nn.parallel import DistributedDataParallel as DDP\n"
               "destroy, alive = d.destroy_process_group, []\n"
               "def watched(*a, **k):\n"
               "    alive.append(sum(isinstance(o, DDP) for o in gc.get_objects()))\n"
               "    return destroy(*a, **k)\n"
               "d.destroy_process_group = watched\n"
               "from speechinstruct.cli import main\n"
               "sys.argv = ['speechinstruct', *sys.argv[1:]]\n"
               "try:\n    main()\n"
               "except SystemExit as e:\n    code = e.code\n"
               f"open({str(tmp_path)!r} + '/initialized-' + os.environ['RANK'], 'w').write(str(d.is_initialized()))\n"
               f"open({str(tmp_path)!r} + '/wrappers-' + os.environ['RANK'], 'w').write(str(alive))\n"
               "sys.exit(code)\n")
    two = _launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                     "127.0.0.1", "--master_port", str(port), "--no-python", sys.executable, "-c", watched, *args[2:],
                     "--out", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-2000:]

    def curve(out):
        return [(r["step"], r["lr"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    assert curve(tmp_path / "two") == curve(tmp_path / "one")  # one log, written once, same schedule
    assert curve(tmp_path / "one")[-1] == (6, 0.0)  # 2 batches per epoch x 3 epochs, cosine to zero
    # and the same training: a step's loss is its mean over the loss tokens of both processes' shares (16 and 15
    # examples), not the mean of the two shares' means (weights 2e-3 apart after 6 steps of lr 1e-3)
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
              for name in ("one", "two")}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model"), stray=1e-3)
    assert (tmp_path / "two" / "checkpoints" / "step-0000004" / "random_states_1.pkl").is_file()  # both ranks saved
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
    assert {p.name: p.read_text() for p in tmp_path.glob("initialized-*")} == {"initialized-0": "False",
                                                                               "initialized-1": "False"}
    assert {p.name: p.read_text() for p in tmp_path.glob("wrappers-*")} == {"wrappers-0": "[0]", "wrappers-1": "[0]"}


def _launch(port: int, *how: str) -> list[str]:
    """``accelerate launch`` over 2 CPU processes as a user runs it; ``how``: its options and the program."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", str(port), *how]


def _launched(command: list[str], env: dict, timeout: float = 300):
    """``subprocess.run`` of a launch over several processes (accelerate or torchrun), whose processes (the launcher's
    children too) are all ended when it hangs: a process left waiting in a collective call would outlive the test and
    hold its output open, and the test would wait for good (``subprocess.run``'s timeout kills the launcher alone)."""
    import subprocess

    import psutil

    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launch:
        try:
            out, err = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:  # the workers too: torchrun starts each in a session of its own
            for process in [*psutil.Process(launch.pid).children(recursive=True), psutil.Process(launch.pid)]:
                process.kill()
            out, err = launch.communicate()
            pytest.fail(f"the launch hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, launch.returncode, out, err)


FSDP = ("--use_fsdp", "--fsdp_version", "2")
FSDP_ON_CPU = str(Path(__file__).with_name("fsdp_on_cpu.py"))  # lets accelerate shard over CPU processes


def _weights(folder: Path, name: str = "model") -> dict:
    from safetensors.torch import load_file

    return load_file(folder / f"{name}.safetensors")


def _assert_same_weights(a: dict, b: dict, stray: float = 0.0) -> None:
    """Equal weights to float rounding; ``stray``: the share of each tensor's elements that may be further apart
    (up to 1e-4), for runs whose gradients were reduced in another order (DDP's all-reduce, FSDP's reduce-scatter).
    Adam divides each update by the root of its gradients' second moment, so where a gradient is near zero (a
    token of the vocabulary the batches hardly hold) that order shows: one element of 10,176 of lm_head ended
    2.4e-5 apart (relative 1.2e-3) on 2026-12-06, every other within 1e-5, and the losses equal."""
    assert sorted(a) == sorted(b)
    for key in a:
        close = torch.isclose(a[key], b[key], rtol=1e-5, atol=1e-6)
        assert (~close).float().mean() <= stray, f"{key}: {int((~close).sum())} of {close.numel()} elements apart"
        torch.testing.assert_close(a[key], b[key], rtol=1e-5 if not stray else 0.0, atol=1e-6 if not stray else 1e-4,
                                   msg=key)


def test_accelerate_launch_over_cpu_processes_ddp_and_fsdp(base_model, dataset, tmp_path):
    """``accelerate launch --num_processes 2`` over 2 CPU processes (gloo): DDP, recorded in train_config.json.
    FSDP (version 2, through the shim that lets accelerate shard over CPU processes) trains to DDP's weights,
    writes sharded checkpoints, and a run stopped after its first checkpoint resumes from it to the same weights.
    ``--use_fsdp`` without the shim, as a user on a machine without GPUs runs it: accelerate ran DDP instead or two
    unconnected copies writing the same log (both seen): one line, nothing trained."""
    import shutil

    port, env, args = _processes(base_model, dataset, epochs=2, batch_size=8)
    args = args[2:]  # the program is in how

    def train(*how, out):
        done = _launched([*_launch(port, *how), *args, "--out", str(out)], env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    ddp = train("--multi_gpu", "-m", "speechinstruct.cli", out=tmp_path / "ddp")
    config = json.loads((tmp_path / "ddp" / "train_config.json").read_text())
    assert config["distributed"] == {"type": "MULTI_CPU", "processes": 2}
    steps = [r["step"] for r in ddp]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one log, written by one process

    fsdp = train(*FSDP, FSDP_ON_CPU, out=tmp_path / "fsdp")
    assert json.loads((tmp_path / "fsdp" / "train_config.json").read_text())["distributed"] == {"type": "FSDP", "processes": 2}
    assert [r["step"] for r in fsdp] == steps and fsdp[-1]["loss"] == pytest.approx(ddp[-1]["loss"], rel=1e-5)
    assert fsdp[-1]["grad_norm"] == pytest.approx(ddp[-1]["grad_norm"], rel=1e-4)  # the whole model's, not a shard's
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "step-0000004" / "pytorch_model_fsdp_0").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its shard
    _assert_same_weights(_weights(tmp_path / "ddp" / "model"), _weights(tmp_path / "fsdp" / "model"), stray=1e-3)

    # stopped after step 4's checkpoint: the rerun resumes there (no step 1 in its log) and ends where FSDP did
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-0000004", stopped / "checkpoints" / "step-0000004")
    assert [r["step"] for r in train(*FSDP, FSDP_ON_CPU, out=stopped)] == [8]
    _assert_same_weights(_weights(tmp_path / "fsdp" / "model"), _weights(stopped / "model"))

    refused = _launched([*_launch(port, *FSDP, "-m", "speechinstruct.cli"), *args, "--out", str(tmp_path / "refused")], env,
                        timeout=600)
    assert refused.returncode != 0 and "accelerate runs FSDP on GPUs only" in refused.stderr
    assert "Traceback" not in refused.stderr.split("accelerate runs FSDP")[0][-300:]
    assert not (tmp_path / "refused" / "log.jsonl").exists()


OOM_ON_CPU = str(Path(__file__).with_name("oom_on_cpu.py"))  # one process whose passes of many examples do not fit


def test_processes_where_one_runs_out_of_memory_halve_its_passes_before_the_first_step_and_mid_step(base_model, dataset,
                                                                                                  tmp_path):
    """Two DDP processes (gloo), the second of which runs out of memory on a pass of more than 2 examples (issue 38,
    item 6: "out of memory is never a crash"; it was one line, nothing trained, whatever the batch). Stage 1 in
    blocks of 32 tokens: 30 training examples in batches of 9, 6 validation examples. Before the first step each
    process tries a pass over its share of the longest examples (5 of a batch of 9), the second halves it, and both
    train in passes of 2: the same losses and weights as the run that fits, the halving counted once. The first
    process's share of 5 is then three passes where the second's 4 is two (every pass all-reducing hung). At the end
    the second process halves its share of the validation batch (3) alone: the same validation loss (it hung in
    DDP's buffer broadcast), as when a process has no validation example at all. Mid-training, a pass that runs out
    of memory once (in its forward or its backward pass, after the tries found the size) is halved on that process
    alone and the step's share run again: the same losses and weights (it was one line, and the other process's
    gloo traceback). A process that fits not even one example is one line from the launch, not a traceback or a
    hang."""
    port, env, args = _processes(base_model, dataset, epochs=1, batch_size=9, stage=1)
    args = [*args[2:], "--block-size", "32"]  # the program is in how

    def train(*how, out, above=2, at="0:"):
        env_oom = {**env, "OOM_RANK": "1", "OOM_ABOVE": str(above), "OOM_AT": at, "OOM_PASSES": str(tmp_path)}
        return _launched([*_launch(port, "--multi_gpu", *how), *args, "--out", str(out)], env_oom)

    fits = train("-m", "speechinstruct.cli", out=tmp_path / "fits")
    assert fits.returncode == 0, fits.stderr[-3000:]
    halved = train(OOM_ON_CPU, out=tmp_path / "halved")
    assert halved.returncode == 0, halved.stderr[-3000:]
    summary = json.loads(halved.stdout)  # one summary (each process printed its own: two JSON documents)
    assert (summary["examples"], summary["eval_examples"], summary["batches_halved"]) == (30, 6, 1), summary
    # every example once (one epoch): its tokens, though the processes' shares differ (the main process's share
    # times the processes counted 5 + 5 of each batch of 9)
    settings = T.TrainConfig.from_dict({**T.settings_for_stage(1), "block_size": 32})
    examples = T.build_examples(1, dataset, T.load_model(1, base_model, T.dataset_k(dataset), settings)[0], settings)
    assert summary["tokens_this_run"] == json.loads(fits.stdout)["tokens_this_run"] == \
        sum(len(e["input_ids"]) for e in examples)
    assert "out of memory with 5 examples a pass on process 1: trying 2" in halved.stderr
    passes = {rank: [int(n) for n in (tmp_path / f"passes-{rank}.txt").read_text().split()] for rank in (0, 1)}
    # the tries before the first step, then 3 batches of 9 (shares of 5 and 4) and one of 3 (2 and 1), in passes of 2
    assert passes == {0: [5, *[2, 2, 1] * 3, 2], 1: [5, 2, *[2, 2] * 3, 1]}, passes
    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("fits", "halved")}
    assert [r["loss"] for r in logs["halved"]] == pytest.approx([r["loss"] for r in logs["fits"]], rel=1e-5)
    assert logs["halved"][-1]["eval_loss"] == pytest.approx(logs["fits"][-1]["eval_loss"], rel=1e-5)
    assert logs["halved"][-1]["eval_tokens"] == logs["fits"][-1]["eval_tokens"] > 0
    _assert_same_weights(_weights(tmp_path / "fits" / "model"), _weights(tmp_path / "halved" / "model"), stray=1e-3)

    # mid-training, after the tries, the second process runs out of memory twice: in the forward pass of its first
    # step's share of 4 (the first pass through DDP's wrapper, which broadcasts the buffers before it), then in the
    # backward pass of its second step's second pass of 2 (halfway down the layers, some of this pass's gradients and
    # all of the step's first pass's already added); each time it halves its passes and runs the step's share again
    # while the first process waits (it was one line, the run lost)
    for rank in (0, 1):
        (tmp_path / f"passes-{rank}.txt").unlink()
    twice = train(OOM_ON_CPU, out=tmp_path / "twice", above=100, at="2:forward,6:backward")
    assert twice.returncode == 0, twice.stderr[-3000:]
    for size, half, where in ((4, 2, "forward"), (2, 1, "backward")):
        assert f"out of memory with {size} examples a pass on process 1 of 2: {half} from now on (CUDA out of memory. " \
               f"Tried to allocate 2.00 GiB (injected in a {where} pass))" in twice.stderr, twice.stderr[-3000:]
    assert json.loads(twice.stdout)["batches_halved"] == 2
    passes = {rank: [int(n) for n in (tmp_path / f"passes-{rank}.txt").read_text().split()] for rank in (0, 1)}
    assert passes == {0: [5, 5, 5, 5, 2], 1: [5, 4, 2, 2, 2, 2, *[1] * 9]}, passes
    log = [json.loads(line) for line in (tmp_path / "twice" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in logs["fits"]], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "fits" / "model"), _weights(tmp_path / "twice" / "model"), stray=1e-3)

    # one validation example (blocks of 1,024 tokens) for two processes: the second has none to run (that hung too)
    args += ["--block-size", "1024", "--max-steps", "1"]
    few = train("-m", "speechinstruct.cli", out=tmp_path / "few")
    assert few.returncode == 0, few.stderr[-3000:]
    assert json.loads(few.stdout)["eval_examples"] == 1 and json.loads(few.stdout)["last"][-1]["eval_tokens"] > 0

    never = train(OOM_ON_CPU, out=tmp_path / "never", above=0)
    assert never.returncode != 0 and "out of memory with one example a pass on this process: lower --max-length" \
        in never.stderr, never.stderr[-3000:]
    assert "Traceback" not in never.stderr.split("out of memory with one example")[0][-300:]
    assert not (tmp_path / "never" / "model").exists()


def test_fsdp_saves_and_merges_stage_3s_adapter_whole(base_model, dataset, tmp_path):
    """Stage 3 with ``--merge`` under FSDP (2 CPU processes through the shim): the adapter and the merged model
    equal DDP's. Merging the unwrapped model's sharded weights on the main process alone failed (gloo: connection
    closed by peer), after the training had been done."""

    port, env, args = _processes(base_model, dataset, epochs=1, batch_size=8, stage=3)
    args = [*args[2:], "--max-steps", "2", "--merge"]  # the program is in how
    for name, how in {"ddp": ("--multi_gpu", "-m", "speechinstruct.cli"), "fsdp": (*FSDP, FSDP_ON_CPU)}.items():
        done = _launched([*_launch(port, *how), *args, "--out", str(tmp_path / name)], env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_weights(_weights(tmp_path / "ddp" / "adapter", "adapter_model"),
                         _weights(tmp_path / "fsdp" / "adapter", "adapter_model"))
    _assert_same_weights(_weights(tmp_path / "ddp" / "merged"), _weights(tmp_path / "fsdp" / "merged"))


@pytest.mark.parametrize("config", ["cross_modal", "chain_of_modality"])
def test_trl_sfttrainer_trains_on_the_published_configs_unmodified(base_model, dataset, tmp_path, config):
    """TRL reads prompt/completion: it trains on prefix + plain_text with loss on plain_text only, which is
    SpeechGPT's mask, and never on the bare transcript."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    T.expand_vocabulary(model, tok, 12)
    train = datasets.load_dataset(str(dataset), config, split="train")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, max_length=1024, save_strategy="no", logging_steps=1, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    assert trainer.train().training_loss > 0
    first = trainer.train_dataset[0]
    record = train[0]
    ours = T.supervised_example(tok, record["prefix"], record["plain_text"], 1024, mask="prefix")
    n_prompt = len(tok(record["prefix"])["input_ids"])
    labels = first["labels"] if "labels" in first else [  # TRL builds labels, or a completion mask (older)
        i if m else -100 for i, m in zip(first["input_ids"], first["completion_mask"])]
    assert labels == [-100] * n_prompt + first["input_ids"][n_prompt:]
    body = tok(record["prefix"] + record["plain_text"])["input_ids"]
    assert first["input_ids"][: len(body)] == body  # the whole record, not the transcript alone
    assert ours["input_ids"][1:len(body) + 1] == body  # the same tokens our loop trains on (ours adds BOS)


def test_trl_sfttrainer_trains_on_the_pretrain_config_as_plain_text(base_model, dataset, tmp_path):
    """The pretrain config has no prompt/completion or messages: TRL takes its `text` column (the unit string,
    SpeechGPT's stage 1) as plain language-model data, every token trained on."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    T.expand_vocabulary(model, tok, 12)
    train = datasets.load_dataset(str(dataset), "pretrain", split="train")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, max_length=1024, save_strategy="no", logging_steps=1, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    assert trainer.train().training_loss > 0
    first, record = trainer.train_dataset[0], train[0]
    body = tok(record["text"])["input_ids"]
    assert first["input_ids"][: len(body)] == body and "<sosp>" in record["text"]
    assert first["labels"][: len(body)] == body  # no prompt: every token of the line is trained on


def test_a_checkout_that_is_not_installed_has_the_stage_settings():
    """Run from a source checkout on the path, not installed (no ``speechinstruct.recipes`` mapping, as the GPU
    check runs it), train finds SpeechGPT's per-stage settings in the checkout's recipes/ (it looked in
    speechinstruct/recipes/ once train.py had moved into model/, and stopped)."""
    import site
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    code = (f"import sys; sys.path[:0] = [{str(root)!r}, {site.getsitepackages()[0]!r}]; import json; "  # no .pth files
            "import speechinstruct.model.train as t; print(json.dumps([t.settings_for_stage(n) for n in (1, 2, 3)]))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert json.loads(done.stdout) == [yaml.safe_load((root / "recipes" / f"train-stage{n}.yaml").read_text()) or {}
                                       for n in (1, 2, 3)]


def test_a_wheel_install_has_the_stage_settings(tmp_path):
    """Installed from a wheel (no checkout beside it), train still finds SpeechGPT's per-stage settings."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("speechinstruct-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import json, speechinstruct.model.train as t; assert 'site' in t.__file__, t.__file__; "
            "print(json.dumps([t.settings_for_stage(n) for n in (1, 2, 3)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
                         check=True, capture_output=True, text=True, timeout=300).stdout
    assert json.loads(out) == [T.settings_for_stage(n) for n in (1, 2, 3)]


def test_train_after_another_accelerator_of_another_precision_in_the_process(base_model, dataset, tmp_path):
    """A TRL trainer (bf16) earlier in the same process left accelerate's state set: train still runs."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="bf16", cpu=True)
    result = T.train(2, base_model, dataset, tmp_path / "s2", fast(max_steps=1, bf16=False))
    assert result["steps"] == 1


@pytest.mark.filterwarnings("error::FutureWarning")  # transformers' deprecated name for it warned on every run
def test_gradient_checkpointing_and_the_attention_kernel_leave_the_losses_as_they_were(base_model, dataset, tmp_path,
                                                                                        monkeypatch):
    """Activations recomputed in the backward pass (torch's checkpoint really runs: counted), and eager attention
    instead of torch's SDPA: the same losses (the same arithmetic, in another order), on the CPU."""
    import transformers.modeling_utils as modeling

    calls = []
    real = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = T.train(2, base_model, dataset, tmp_path / "a", fast(max_steps=3))
    assert not calls
    checkpointed = T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=3, gradient_checkpointing=True))
    assert len(calls) >= 3 * 2  # every step, every layer of the tiny LLaMA
    eager = T.train(2, base_model, dataset, tmp_path / "c", fast(max_steps=3, attention="eager"))
    for other in (checkpointed, eager):
        assert [h["loss"] for h in other["history"]] == pytest.approx([h["loss"] for h in plain["history"]], rel=1e-4)
    with pytest.raises(ValueError, match="attention 'nonsense'"):
        T.train(2, base_model, dataset, tmp_path / "d", fast(max_steps=1, attention="nonsense"))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_batch_that_runs_out_of_memory_is_halved_to_the_same_weights(base_model, dataset, tmp_path, monkeypatch, where):
    """A CUDA out-of-memory stopped the run (issue 38, item 6). A pass of more than 2 examples now raises torch's
    OutOfMemoryError here: in the forward pass, or after the backward pass has added its gradients (the worst case,
    gradients left half made), in the second micro-batch of a step (grad_accum 2). The step's gradients are made
    again from nothing with 2 examples a pass, each part's loss weighted by its share of the loss tokens: the same
    losses and weights as a run that fits, to float32 rounding; the halvings are counted and later batches start
    at the size that fitted."""
    import weakref

    from accelerate import Accelerator
    from transformers import LlamaForCausalLM

    cfg = fast(max_steps=3, grad_accum=2, batch_size=4)
    fits = T.train(2, base_model, dataset, tmp_path / "fits", cfg)
    assert fits["batches_halved"] == 0
    real_forward, real_backward, passes, failed = LlamaForCausalLM.forward, Accelerator.backward, [], []

    def forward(self, *args, **kwargs):
        passes.append(kwargs["input_ids"].shape[0])
        assert not failed or failed[-1]() is None, "the failed try's tensors are still held on the retry"
        if where == "forward" and passes[-1] > 2 and len(passes) > 1:
            activations = torch.zeros(passes[-1], 4096)
            failed.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real_forward(self, *args, **kwargs)

    def backward(self, loss, **kwargs):
        real_backward(self, loss, **kwargs)
        if where == "backward" and passes[-1] > 2 and len(passes) > 1:
            failed.append(weakref.ref(loss))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    monkeypatch.setattr(Accelerator, "backward", backward)
    halved = T.train(2, base_model, dataset, tmp_path / "halved", cfg)
    assert halved["batches_halved"] == 1 and passes[0] == 4 and max(passes[2:]) == 2
    assert [h["loss"] for h in halved["history"]] == pytest.approx([h["loss"] for h in fits["history"]], rel=1e-5)
    # validation batches too (stage 1's validation split: evaluate's sums of the parts are the batch's)
    tokenizer, model, _ = T.load_model(1, base_model, T.dataset_k(dataset), cfg)
    held_out = T.build_examples(1, dataset, tokenizer, cfg, split="validation")
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(LlamaForCausalLM, "forward", real_forward)
    whole = T.evaluate(model, held_out, 4, tokenizer.pad_token_id, accelerator)
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    if where == "forward":
        parts = T.evaluate(model, held_out, 4, tokenizer.pad_token_id, accelerator)
        assert len(held_out) > 2 and parts.pop("eval_batches_halved") >= 1 and "eval_batches_halved" not in whole
        assert parts == pytest.approx(whole, rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "fits" / "model"), _weights(tmp_path / "halved" / "model"))
    # one example that does not fit alone is one line from the command, not a traceback
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory.")))
    from typer.testing import CliRunner
    from speechinstruct.cli import app

    result = CliRunner().invoke(app, ["train", "--stage", "2", "--base-model", str(base_model), "--data", str(dataset),
                                      "--out", str(tmp_path / "never"), "--max-steps", "1", "--batch-size", "2", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "out of memory with one example a pass: lower --max-length" in result.stderr
    # FSDP's processes would all have to split together: the run stops, noting the size for its rerun (one line
    # saying so; the whole path: test_fsdp_validates_…); a DDP process halves alone
    from types import SimpleNamespace
    fsdp = SimpleNamespace(num_processes=2, process_index=1, distributed_type=SimpleNamespace(value="FSDP"))
    with pytest.raises(T.OutOfMemory, match=r"process 1 of 2 with 3 examples a pass \(CUDA out of memory.\); under "
                                            r"FSDP .* resumes from its last checkpoint with 1 examples a pass"):
        T.stop_for_a_restart("CUDA out of memory.", 4, 3, fsdp, tmp_path / "fsdp", {"stage": 2}, 0)
    assert T.restart_note(tmp_path / "fsdp", {"stage": 2})["examples_a_pass"] == 1
    with pytest.raises(T.OutOfMemory, match="out of memory with one example a pass on process 1 of 2: lower --max-length"):
        T.stop_for_a_restart("CUDA out of memory.", 1, 3, fsdp, tmp_path / "fsdp", {"stage": 2}, 1)
    assert T._halve("CUDA out of memory.", 4, 3, SimpleNamespace(num_processes=2, process_index=1,
                                                                  distributed_type=SimpleNamespace(value="MULTI_GPU"))) == 1


def test_settings_another_stage_reads_are_said_to_change_nothing(base_model, dataset, tmp_path):
    """`train --stage 2 --lora-targets q_proj,v_proj --merge` fine-tuned every weight and said nothing: LoRA is
    stage 3's. The run still trains, and says on stderr and in its summary which settings it did not use; the
    packaged settings of each stage hold only what that stage reads."""
    from typer.testing import CliRunner
    from speechinstruct.cli import app

    result = CliRunner().invoke(app, ["train", "--stage", "2", "--base-model", str(base_model), "--data", str(dataset),
                                      "--out", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2", "-q",
                                      "--lora-targets", "q_proj,v_proj", "--merge", "--block-size", "64"])
    assert result.exit_code == 0, result.output
    assert "warning: stage 2 does not use block_size (stage 1), lora_targets (stage 3), merge (stage 3): they change " \
           "nothing" in result.stderr
    assert json.loads(result.stdout)["not_used"] == ["block_size", "lora_targets", "merge"]
    assert not (tmp_path / "o" / "adapter").exists() and (tmp_path / "o" / "model" / "model.safetensors").is_file()
    for stage in (1, 2, 3):
        assert T.unused_settings(stage, T.TrainConfig.from_dict(T.settings_for_stage(stage))) == []


def test_max_grad_norm_0_turns_clipping_off_as_the_help_says(base_model, dataset, tmp_path, monkeypatch):
    """`--max-grad-norm 0` ("0 turns it off", as in Hugging Face's Trainer) was refused: "Input should be greater
    than 0". It trains, unclipped; a settings file's 0 or null too; a negative norm is one line."""
    from accelerate import Accelerator
    from typer.testing import CliRunner

    from speechinstruct.cli import app

    clipped = []
    clip = Accelerator.clip_grad_norm_
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, params, norm, *a, **k: clipped.append(norm) or
                        clip(self, params, norm, *a, **k))
    common = ["train", "--stage", "2", "--base-model", str(base_model), "--data", str(dataset), "--max-steps", "1",
              "--batch-size", "2", "-q"]
    for norm, calls in (("0", []), ("0.5", [0.5])):
        clipped.clear()
        done = CliRunner().invoke(app, [*common, "--out", str(tmp_path / norm), "--max-grad-norm", norm])
        assert done.exit_code == 0, done.output
        assert clipped == calls
    # the gradients' norm before clipping is logged, as Trainer logs grad_norm (where it clips: it costs a pass)
    logged = [json.loads(line) for line in (tmp_path / "0.5" / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["grad_norm"] > 0.5 and "grad_norm" not in json.loads((tmp_path / "0" / "log.jsonl").read_text())
    for value in (0, None):
        assert T.TrainConfig.from_dict({**T.settings_for_stage(2), "max_grad_norm": value}).max_grad_norm == value
    done = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "o"), "--max-grad-norm", "-1"])
    assert done.exit_code == 2 and "max_grad_norm -1.0: Input should be greater than or equal to 0" in done.stderr


def test_training_settings_are_checked_as_a_recipe_section_is(tmp_path):
    """train's settings are a recipe section (recipe.Train): a wrong value in a settings file or an option is one
    line naming it, before any model is loaded; the packaged stage files hold only known, valid settings."""
    from typer.testing import CliRunner
    from speechinstruct.cli import app

    bad = tmp_path / "train.yaml"
    for text, said in (("lr: -1\n", "lr -1: Input should be greater than 0"),
                       ("batch_size: 0\n", "batch_size 0: Input should be greater than or equal to 1"),
                       ("mask: response\n", "mask 'response': mask must be one of prefix, prompt, assistant, none"),
                       ("seed: -1\n", "seed -1: Input should be greater than or equal to 0"),
                       ("lr_typo: 1\n", "unknown training settings ['lr_typo']")):
        bad.write_text(text)
        done = CliRunner().invoke(app, ["train", "--stage", "2", "--base-model", str(tmp_path / "none"), "--data",
                                        str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--config", str(bad)])
        assert done.exit_code == 2 and said in done.stderr and "Traceback" not in done.output, done.output
    assert not (tmp_path / "o").exists()
    assert T.TrainConfig.from_dict({"configs": "dialogue, pretrain"}).configs == ["dialogue", "pretrain"]


def test_gradients_are_averaged_over_the_processes_a_weight_without_one_counting_zero(tmp_path):
    """all_reduce_gradients (DDP's all-reduce, run once a step's passes have all run) over 2 gloo processes, in
    buckets smaller than a weight: each trained weight's gradient is the processes' mean; one the second process
    has no gradient for counts as zero there (its buckets would differ, and the processes wait for each other for
    good); a weight not trained is left alone."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import json, torch, torch.distributed as d; from speechinstruct.model.train import all_reduce_gradients\n"
            "d.init_process_group('gloo'); rank = d.get_rank()\n"
            "m = torch.nn.Linear(3, 2); m.register_parameter('frozen', torch.nn.Parameter(torch.ones(2), False))\n"
            "m.weight.grad = torch.full((2, 3), float(rank + 1))\n"
            "if rank == 0:\n    m.bias.grad = torch.tensor([2.0, 4.0])\n"
            "all_reduce_gradients(m, bucket_bytes=16)\n"
            f"open({str(tmp_path)!r} + f'/grads-{{rank}}.json', 'w').write(json.dumps("
            "{n: None if p.grad is None else p.grad.tolist() for n, p in m.named_parameters()}))\n"
            "d.destroy_process_group()\n")
    done = _launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(port), "--no-python", sys.executable, "-c", code],
                     {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = {"weight": [[1.5] * 3] * 2, "bias": [1.0, 2.0], "frozen": None}
    assert [json.loads((tmp_path / f"grads-{rank}.json").read_text()) for rank in (0, 1)] == [expected, expected]



def test_fsdp_validates_a_last_batch_smaller_than_the_processes_and_restarts_halved_after_running_out_of_memory(
        base_model, dataset, tmp_path):
    """Under FSDP every pass gathers the weights' shards from all processes. Stage 1 in blocks of 32 tokens has 6
    validation examples: in batches of 5, the second process has no share of the last one (1). It skipped that pass,
    and the first waited for it for good (the run hung after its training, nothing saved); it runs the pass over
    the batch's example now and counts nothing: DDP's validation loss and tokens. A validation pass that runs out of
    memory on one process is one line (halved there alone, its passes would have gathered with the other's).
    A training pass that runs out of memory mid-step (issue 38, item 6) was one line, the run lost: the process
    notes half its passes' size, the run stops, and the launcher's restart (``--max_restarts``) resumes from the
    last checkpoint with passes of that size on both processes (the one with the smaller share runs as many, the
    last over its first example, weighted zero): the same losses and weights as the run that fits."""
    port, env, args = _processes(base_model, dataset, epochs=1, batch_size=5, stage=1)
    args = [*args[2:], "--block-size", "32", "--max-steps", "4", "--save-every", "2", "--eval-every", "1"]  # program: in how
    both = tmp_path / "fsdp_and_oom_on_cpu.py"  # the two shims: FSDP over CPU processes, and running out of memory
    both.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport fsdp_on_cpu, oom_on_cpu\n"
                    "from speechinstruct.cli import main\nsys.exit(main())\n")
    env = {**env, "OOM_RANK": "1", "OOM_ABOVE": "100", "OOM_IN": "validation", "OOM_PASSES": str(tmp_path)}

    def launched(name, *how, env=env):
        return _launched([*_launch(port, *how), *args, "--out", str(tmp_path / name)], env, timeout=300)

    logs = {}
    for name, how in {"ddp": ("--multi_gpu", "-m", "speechinstruct.cli"), "fsdp": (*FSDP, str(both))}.items():
        done = launched(name, *how)
        assert done.returncode == 0, done.stderr[-3000:]
        logs[name] = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert logs["fsdp"][-1]["eval_tokens"] == logs["ddp"][-1]["eval_tokens"] > 150  # 6 blocks of up to 31 tokens
    assert logs["fsdp"][-1]["eval_loss"] == pytest.approx(logs["ddp"][-1]["eval_loss"], rel=1e-5)

    small = launched("small", *FSDP, str(both), env={**env, "OOM_ABOVE": "1"})
    said = "out of memory on process 1 of 2 with 2 validation examples a pass: lower --batch-size, which validation " \
           "batches are made of (CUDA out of memory. Tried to allocate 2.00 GiB (injected in a forward pass))"
    assert small.returncode != 0 and said in small.stderr, small.stderr[-3000:]
    assert "Traceback" not in small.stderr.split(said)[0][-300:]
    assert not (tmp_path / "small" / "model").exists()

    # the second process's third pass (step 3: shares of 3 and 2, after step 2's checkpoint) runs out of memory once
    for rank in (0, 1):
        (tmp_path / f"passes-{rank}.txt").unlink()
    # (as the README says to launch it: the store torchrun's agent shares with the processes held the last try's
    # addresses, and 6 of 10 restarts failed to connect or hung: pytorch/pytorch#135712, #167288)
    once = {**env, "OOM_AT": "3:forward", "OOM_ONCE_FILE": str(tmp_path / "injected"),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    restarted = launched("restarted", "--max_restarts", "1", "--rdzv_backend", "c10d", *FSDP, str(both), env=once)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "out of memory on process 1 of 2 with 2 examples a pass (CUDA out of memory. Tried to allocate 2.00 GiB " \
           "(injected in a forward pass)); under FSDP the others wait for it in their passes, so the run stops: run " \
           "it again and it resumes from its last checkpoint with 1 examples a pass" in restarted.stderr
    assert json.loads(restarted.stdout)["batches_halved"] == 1
    passes = {rank: [int(n) for n in (tmp_path / f"passes-{rank}.txt").read_text().split()] for rank in (0, 1)}
    # steps 1-3 in passes of the whole share; after the restart, steps 3 and 4 one example a pass, as many on each
    assert passes == {0: [3, 3, 3, 1, 1, 1, 1, 1, 1], 1: [2, 2, 2, 1, 1, 1, 1, 1, 1]}, passes
    log = [json.loads(line) for line in (tmp_path / "restarted" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in logs["fsdp"]]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in logs["fsdp"]], rel=1e-5)
    _assert_same_weights(_weights(tmp_path / "fsdp" / "model"), _weights(tmp_path / "restarted" / "model"), stray=1e-3)
