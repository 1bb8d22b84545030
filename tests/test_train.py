import json

import pytest
import torch
import yaml

from speechinstruct import train as T
from speechinstruct.pipeline import run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    recipe = {"name": "tiny", "workdir": str(tmp / "work"), "demo_corpus": {"sentences": 16, "seed": 2},
              "kmeans": {"k": 12, "max_frames": 20000},
              "compose": {"pretrain": {"dev_fraction": 0.0}, "chain_of_modality": {"max_pairs": 6}}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert run(tmp / "r.yaml", quiet=True)["valid"]
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


def test_labels_masked_exactly_over_prompt(base_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_model)
    T.add_unit_tokens(tok, 12)
    plain = "[Human]: Please read this text aloud. This is input: THE OLD SAILOR<eoh> [SpeechGPT]: <sosp><3><11><eosp><eoa>"
    ex = T.supervised_example(tok, "PREFIX ", plain, 512, train_on_inputs=False)
    n_prompt = 1 + len(tok("PREFIX " + plain[: plain.index("[SpeechGPT]:") + len("[SpeechGPT]:")], add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    learned = tok.decode(ex["input_ids"][n_prompt:])
    assert learned.replace(" ", "") == "<sosp><3><11><eosp><eoa></s>"
    assert tok.decode(ex["input_ids"][n_prompt - 2 : n_prompt]) == "[SpeechGPT]:"  # the last masked tokens
    full = T.supervised_example(tok, "PREFIX ", plain, 512, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    assert T.supervised_example(tok, "PREFIX ", plain, 5, train_on_inputs=False) is None  # cut before the response


def test_stage1_packs_blocks(base_model, dataset):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base_model)
    T.add_unit_tokens(tok, 12)
    blocks = T.build_examples(1, dataset, tok, T.TrainConfig(block_size=64))
    assert blocks and all(len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks)


def fast(**kw):
    return T.TrainConfig(**{"lr": 3e-3, "batch_size": 4, "epochs": 100, "warmup_ratio": 0.0, "scheduler": "constant",
                            "save_every": 2, "log_every": 1, "block_size": 64, **kw})


def test_three_stages_loss_decreases_and_chain(base_model, dataset, tmp_path):
    s1 = T.train(1, base_model, dataset, tmp_path / "s1", fast(max_steps=25), quiet=True)
    losses = [h["loss"] for h in s1["history"]]
    assert losses[-1] < losses[0] * 0.8
    s2 = T.train(2, tmp_path / "s1" / "model", dataset, tmp_path / "s2", fast(max_steps=25), quiet=True)
    assert s2["tokens_added"] == 0  # stage 1's vocabulary carried over
    assert s2["history"][-1]["loss"] < s2["history"][0]["loss"]
    s3 = T.train(3, tmp_path / "s2" / "model", dataset, tmp_path / "s3", fast(max_steps=6, merge=True, max_length=1024), quiet=True)
    assert s3["steps"] == 6 and s3["tokens_added"] == 0
    assert (tmp_path / "s3" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "s3" / "merged" / "config.json").is_file()
    cfg = json.loads((tmp_path / "s3" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    # the adapter loads back and generates
    from speechinstruct.chat import Chat
    bot = Chat(tmp_path / "s2" / "model", lora=tmp_path / "s3" / "adapter")
    reply = bot.reply("<sosp><1><2><3><eosp>", max_new_tokens=8)
    assert isinstance(reply["text"], str) and isinstance(reply["units"], list)
    merged = Chat(tmp_path / "s3" / "merged").reply("<sosp><1><2><3><eosp>", max_new_tokens=8)
    assert merged["raw"] == reply["raw"]


def test_resume_continues_from_saved_step(base_model, dataset, tmp_path):
    straight = T.train(2, base_model, dataset, tmp_path / "a", fast(max_steps=6), quiet=True)
    T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=4), quiet=True)
    resumed = T.train(2, base_model, dataset, tmp_path / "b", fast(max_steps=6), quiet=True)
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    from safetensors.torch import load_file
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert straight["history"][-1]["loss"] == pytest.approx(resumed["history"][-1]["loss"], rel=1e-4)


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
    assert set(json.loads(result.stdout)) == {"text", "units", "raw"}
    result = runner.invoke(app, ["train", "--stage", "4", "--base-model", str(base_model), "--data", str(dataset), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--stage must be 1, 2 or 3" in result.stderr
