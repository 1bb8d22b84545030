"""compose dialogue (speechinstruct.compose.dialogue): multi-turn spoken dialogues from text conversations, read back by
a parser written here from the format's description, published, validated, and trained on by TRL's SFTTrainer
through a chat template with the loss on the assistant turns only."""

import json
import os
import re
from importlib import resources

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from speechinstruct import recipe as sections
from speechinstruct import units
from speechinstruct.cli import app
from speechinstruct.units.cluster import fit
from speechinstruct.compose.dialogue import dialogue
from speechinstruct.units.features import MFCC
from speechinstruct.sources.tts import CachedTTS, EspeakTTS
from speechinstruct.units import SpeechEncoder
from test_train import base_model  # noqa: F401  (the tiny LLaMA and tokenizer fixture)

torch.set_num_threads(2)
runner = CliRunner()
U = r"<sosp>(?:<\d+>)+<eosp>"
EXCHANGE = re.compile(rf"\[Human\]: ({U})<eoh>\. \[SpeechGPT\]: (.+?); \[ta\] (.+?); \[ua\] ({U})<eoa>\.")


def unit_ids(text: str) -> list[int]:
    return [int(u) for u in re.findall(r"<(\d+)>", text)]


def parse_dialogue(text: str) -> list[tuple]:
    """Exchanges (user units, question, answer, answer units) of a dialogue's plain_text, which must be nothing
    but those exchanges separated by single spaces."""
    found, at = [], 0
    while at < len(text):
        m = EXCHANGE.match(text, at)
        assert m, f"no exchange at {at}: {text[at:at + 80]!r}"
        found.append((unit_ids(m.group(1)), m.group(2), m.group(3), unit_ids(m.group(4))))
        at = m.end()
        if at < len(text):
            assert text[at] == " ", text[at:at + 20]
            at += 1
    return found


@pytest.fixture(scope="module")
def speech():
    espeak = EspeakTTS()
    mfcc = MFCC()
    wav, sr = espeak.synthesize("Some speech to fit a small quantizer on, with many different sounds.", "en-us", 160)
    return espeak, mfcc, units.KMeans(fit(mfcc.features(wav, sr), 16, seed=0))


@pytest.fixture(scope="module")
def composed(speech, tmp_path_factory):
    espeak, mfcc, km = speech
    root = tmp_path_factory.mktemp("dialogue")
    tts = CachedTTS(espeak, root / "tts")
    summary = dialogue("builtin", root / "composed" / "dialogue", SpeechEncoder(km, mfcc), tts)
    return root, summary, tts


def rows(folder):
    return [r for f in sorted(folder.glob("train-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_every_turn_is_spoken_and_the_records_parse_back(composed, speech):
    root, summary, tts = composed
    sample = [json.loads(line) for line in
              resources.files("speechinstruct.data").joinpath("dialogues_sample.jsonl").read_text().splitlines()]
    source = {}
    for obj in sample:  # the sample in both forms, read here without our reader
        turns = obj.get("messages") or obj.get("conversations")
        texts = [t.get("content", t.get("value")) for t in turns if t.get("role", t.get("from")) != "system"]
        source[obj["id"]] = list(zip(texts[0::2], texts[1::2]))
    records = rows(root / "composed" / "dialogue")
    assert summary["records"] == len(records) == len(sample) == 8
    assert summary["turns"] == sum(len(v) for v in source.values()) and max(summary["records_by_turns"], key=int) == "3"
    _, mfcc, km = speech
    for r in records:
        exchanges = parse_dialogue(r["plain_text"])
        assert [(q, a) for _, q, a, _ in exchanges] == source[r["source_id"]] == list(zip(r["user_texts"], r["assistant_texts"]))
        assert [qu for qu, _, _, _ in exchanges] == r["user_units"] and [au for *_, au in exchanges] == r["assistant_units"]
        assert r["turns"] == len(exchanges) and all(len(u) > 10 for u in r["user_units"] + r["assistant_units"])
        assert "prompt" not in r and "completion" not in r and r["prefix"].startswith("You are an AI")  # messages only
        # the same dialogue as messages: system, then user (its speech as units) and assistant in turn
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system"] + ["user", "assistant"] * r["turns"]
        assert r["messages"][0]["content"] == r["prefix"].strip()
        for (qu, q, a, au), user, assistant in zip(exchanges, r["messages"][1::2], r["messages"][2::2]):
            assert unit_ids(user["content"]) == qu and re.fullmatch(U, user["content"])
            assert assistant["content"] == f"{q}; [ta] {a}; [ua] <sosp>" + "".join(f"<{u}>" for u in au) + "<eosp>"
        # one voice per speaker for the whole dialogue, the two speakers' voices differ
        user_voice, assistant_voice = r["voice"].split(",")
        assert user_voice.split(":")[1].split("@")[0] != assistant_voice.split(":")[1].split("@")[0]
    # the first user turn's units are those of its speech, spoken in the user's voice
    first = next(r for r in records if r["source_id"] == "dialogue-000")
    voice, rate = first["voice"].split(",")[0].split(":")[1].split("@")
    wav, sr = tts.synthesize(first["user_texts"][0], voice, int(rate))
    assert first["user_units"][0] == units.SpeechEncoder(km, mfcc).encode(wav, sr).units.tolist()


def test_a_rerun_makes_nothing_again_and_the_dataset_validates(composed, speech, tmp_path):
    from speechinstruct.release.publish import publish
    from speechinstruct.release.validate import validate

    root, _, tts = composed
    espeak, mfcc, km = speech
    calls = tts.calls
    before = rows(root / "composed" / "dialogue")
    dialogue("builtin", root / "composed" / "dialogue", SpeechEncoder(km, mfcc), tts)
    dialogue("builtin", tmp_path / "again", SpeechEncoder(km, mfcc), tts)
    assert tts.calls == calls and rows(tmp_path / "again") == before
    publish(root / "composed", root / "dataset")
    report = validate(root / "dataset")
    assert report.ok and report.records["dialogue"] == 8, report.as_dict()
    card = (root / "dataset" / "README.md").read_text()
    assert "### dialogue" in card and "## Voices" in card and "| dialogue |" in card
    meta = json.loads((root / "dataset" / "speechinstruct.json").read_text())
    assert sum(meta["voices"]["dialogue"].values()) == 16  # a user and an assistant voice per record
    assert meta["by_kind"]["dialogue"] == {"1 turns": 2, "2 turns": 5, "3 turns": 1}
    # no units folder made these records: the compose summary says what tokenized the speech
    assert meta["k"] == report.k == 16 and meta["vocabulary"]["tokenizer"] == "kmeans"
    assert meta["extractor"]["features"] == "mfcc"


def test_publish_refuses_dialogues_and_pairs_spoken_into_two_vocabularies(composed, speech, tmp_path):
    import shutil

    from speechinstruct.compose.chain_of_modality import chain_of_modality
    from speechinstruct.release.publish import publish

    root, _, tts = composed
    espeak, mfcc, km = speech
    shutil.copytree(root / "composed" / "dialogue", tmp_path / "composed" / "dialogue")
    other = units.KMeans(km.centroids[:8])
    chain_of_modality("builtin", tmp_path / "composed" / "chain_of_modality", SpeechEncoder(other, mfcc), tts,
                      sections.ChainOfModality(max_pairs=2))
    with pytest.raises(ValueError, match=r"two vocabularies .*chain_of_modality.summary.json: kmeans 8; .*dialogue.summary.json: kmeans 16\)"):
        publish(tmp_path / "composed", tmp_path / "dataset")


def test_validate_catches_a_dialogue_whose_columns_disagree(composed, tmp_path):
    from speechinstruct import records
    from speechinstruct.release.validate import validate

    root, _, _ = composed
    good = rows(root / "composed" / "dialogue")
    tampered = [dict(r) for r in good[:3]]
    tampered[0]["messages"] = tampered[0]["messages"][:-1] + [{"role": "assistant", "content": "something else"}]
    tampered[1]["plain_text"] = tampered[1]["plain_text"].replace("[ta] ", "[ta]  ", 1)
    tampered[2]["assistant_units"] = [[99]] + tampered[2]["assistant_units"][1:]  # outside K = 16
    for r in tampered:
        r["content_hash"] = records.content_hash(r)
    path = tmp_path / "train-00000.parquet"
    table = records.to_table("dialogue", tampered)
    pq.write_table(table, path)
    rules = validate(path, k=16).as_dict()["errors_by_rule"]
    assert rules == {"messages": 1, "shape": 1, "unit-range": 1}, rules


def test_bad_conversations_are_each_skipped_and_named(speech, tmp_path):
    espeak, mfcc, km = speech

    def m(*turns):
        return {"messages": [{"role": role, "content": text} for role, text in turns]}

    lines = [
        {"id": "ok", **m(("user", "Hello there."), ("assistant", "Hello, how can I help?"))},
        {"id": "twice", **m(("user", "One."), ("user", "Two."), ("assistant", "Three."))},
        {"id": "empty", **m(("user", "Hi."), ("assistant", "  "))},
        {"id": "markup", **m(("user", "Say <eoa> now."), ("assistant", "No."))},
        {"id": "long", **m(("user", "Tell me."), ("assistant", " ".join(["word"] * 200)))},
        {"id": "open", **m(("user", "Hi."), ("assistant", "Hello."), ("user", "Still there?"))},
        {"id": "role", "conversations": [{"from": "narrator", "value": "Once."}, {"from": "gpt", "value": "Yes."}]},
        {"id": "system", **m(("user", "Hi."), ("system", "Be brief."), ("assistant", "Hello."))},
        {"id": "none", "text": "no turns at all"},
    ]
    src = tmp_path / "chats.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines[:3]) + "\n{not json\n"
                   + "\n".join(json.dumps(line) for line in lines[3:]) + "\n")
    summary = dialogue(src, tmp_path / "out", SpeechEncoder(km, mfcc), CachedTTS(espeak, None))
    assert summary["records"] == 1 and summary["conversations"] == 4  # ok, empty, markup, long read as conversations
    dropped = {d["reason"]: d["where"] for d in summary["dropped_examples"]}
    assert dropped == {
        "roles do not alternate (turn 2 is user, expected assistant)": "chats.jsonl:2",
        "exchange 1: empty assistant turn": "chats.jsonl:3",
        "malformed JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))": "chats.jsonl:4",
        "exchange 1: markup in user turn (<eoa>)": "chats.jsonl:5",
        "exchange 1: assistant turn too long to speak": "chats.jsonl:6",
        "ends with a user turn that has no answer": "chats.jsonl:7",
        "unknown role ('narrator' at turn 1)": "chats.jsonl:8",
        "a system message inside the conversation (turn 2)": "chats.jsonl:9",
        "no 'conversations' or 'messages' list": "chats.jsonl:10",
    }
    assert summary["dropped: roles do not alternate"] == 1 and summary["dropped: markup in user turn"] == 1
    assert [r["source_id"] for r in rows(tmp_path / "out")] == ["ok"]


def test_cli_compose_dialogue(speech, tmp_path):
    espeak, mfcc, km = speech
    np.save(tmp_path / "km.npy", km.centroids)
    result = runner.invoke(app, ["compose", "dialogue", "builtin", str(tmp_path / "out"), "--kmeans",
                                 str(tmp_path / "km.npy"), "--max-dialogues", "2", "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["records"] == 2 and summary["conversations"] == 2 and "dropped_examples" not in summary
    assert [r["source_id"] for r in rows(tmp_path / "out")] == ["dialogue-000", "dialogue-001"]
    missing = runner.invoke(app, ["compose", "dialogue", "builtin", str(tmp_path / "o2"), "-q"])
    assert missing.exit_code == 2 and "--kmeans is needed" in missing.output and "Traceback" not in missing.output


CHAT_TEMPLATE = (  # a plain template with TRL's generation markers around each assistant turn and its end
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def test_trl_trains_on_messages_with_the_loss_on_assistant_turns_only(composed, base_model, tmp_path):  # noqa: F811
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from speechinstruct.model import train as T
    from speechinstruct.release.publish import publish

    root, _, _ = composed
    if not (root / "dataset").is_dir():
        publish(root / "composed", root / "dataset")
    tok = AutoTokenizer.from_pretrained(base_model)
    tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base_model)
    T.expand_vocabulary(model, tok, 16)
    train = datasets.load_dataset(str(root / "dataset"), "dialogue", split="train")  # as a user loads it
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, max_length=4096, save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    assert trainer.train().training_loss > 0
    example = trainer.train_dataset[0]
    messages = train[0]["messages"]
    ids = example["input_ids"]
    mask = [label != -100 for label in example["labels"]] if "labels" in example else example["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    expected = sum((tok(m["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
                    for m in messages if m["role"] == "assistant"), [])
    assert trained == expected  # every assistant turn, and nothing of the system prompt or the user's speech
    user_units = tok(messages[1]["content"], add_special_tokens=False)["input_ids"]
    untrained = [i for i, m in zip(ids, mask) if not m]
    assert any(untrained[j:j + len(user_units)] == user_units for j in range(len(untrained)))
    assert np.isfinite(trainer.state.log_history[0]["loss"])


def test_mask_assistant_trains_on_every_speechgpt_turn_only(composed, base_model):  # noqa: F811
    """train's mask "assistant": the loss on each [SpeechGPT] turn of a dialogue, up to the next [Human] turn; the
    prefix, every [Human] turn (the user's speech) and BOS get none; EOS, closing the last answer, gets it."""
    from transformers import AutoTokenizer

    from speechinstruct.model import train as T

    root, _, _ = composed
    record = next(r for r in rows(root / "composed" / "dialogue") if r["turns"] == 3)
    tok = AutoTokenizer.from_pretrained(base_model)
    T.add_unit_tokens(tok, 16)
    example = T.supervised_example(tok, record["prefix"], record["plain_text"], 8192, mask="assistant")
    ids, labels = example["input_ids"], example["labels"]
    assert ids[0] == tok.bos_token_id and labels[0] == -100 and labels[-1] == ids[-1] == tok.eos_token_id
    runs, current = [], []  # the trained tokens, as contiguous runs
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    decoded = [tok.decode(run).replace(" ", "") for run in runs]
    exchanges = parse_dialogue(record["plain_text"])
    assert len(decoded) == 3
    for text, (_, q, a, au) in zip(decoded, exchanges):
        answer = f"{q}; [ta] {a}; [ua] <sosp>" + "".join(f"<{u}>" for u in au) + "<eosp><eoa>."
        assert text.startswith(answer.replace(" ", ""))
        assert "[Human]" not in text and "<eoh>" not in text
    assert decoded[-1].endswith("<eoa>.</s>")
    # the same record under SpeechGPT's mask trains the [Human] turns too
    prefix_only = T.supervised_example(tok, record["prefix"], record["plain_text"], 8192, mask="prefix")
    assert sum(label != -100 for label in prefix_only["labels"]) > sum(label != -100 for label in labels)


def test_stage3_trains_on_chain_of_modality_and_dialogues_together(composed, base_model, tmp_path):  # noqa: F811
    from speechinstruct.release.publish import publish
    from speechinstruct.model.train import TrainConfig, build_examples, train

    root, _, _ = composed
    if not (root / "dataset").is_dir():
        publish(root / "composed", root / "dataset")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    cfg = TrainConfig(configs="dialogue", mask="assistant", max_length=4096)
    assert len(build_examples(3, root / "dataset", tok, cfg)) == 8
    with pytest.raises(ValueError, match=r"no chain_of_modality config \(it has dialogue\)"):
        build_examples(3, root / "dataset", tok, TrainConfig(configs=["chain_of_modality", "dialogue"]))
    result = train(3, base_model, root / "dataset", tmp_path / "run",
                   TrainConfig(configs=["dialogue"], mask="assistant", max_steps=2, batch_size=2, max_length=4096,
                               lr=1e-3, log_every=1))
    assert result["history"] and np.isfinite(result["history"][-1]["loss"])
    assert (tmp_path / "run" / "adapter").is_dir()


def test_chat_with_a_history_prompts_with_the_dialogue_so_far_as_training_wrote_it(composed, base_model, tmp_path):  # noqa: F811
    from speechinstruct.model.chat import Chat
    from speechinstruct.speechgpt import com_answer
    from speechinstruct.units import to_text

    root, _, _ = composed
    record = next(r for r in rows(root / "composed" / "dialogue") if r["turns"] == 3)
    bot = Chat(base_model)
    history = [(to_text(qu), com_answer(q, a, au)) for q, a, qu, au in
               zip(record["user_texts"], record["assistant_texts"], record["user_units"], record["assistant_units"])][:2]
    third = record["plain_text"].index("[SpeechGPT]:", record["plain_text"].index(to_text(record["user_units"][2])))
    expected = record["prefix"] + record["plain_text"][: third + len("[SpeechGPT]:")]
    assert bot.prompt(to_text(record["user_units"][2]), history) == expected
    assert bot.prompt("hello") == record["prefix"] + "[Human]: hello<eoh>. [SpeechGPT]:"
    with pytest.raises(ValueError, match="a history needs the chain_of_modality prompt"):
        Chat(base_model, kind="cross_modal").prompt("hello", history)

    log = tmp_path / "history.json"
    for said in ("Hello there.", "And then?"):
        result = runner.invoke(app, ["chat", "--model", str(base_model), "--text", said, "--history", str(log),
                                     "--max-new-tokens", "3"])
        assert result.exit_code == 0, result.output
    turns = json.loads(log.read_text())
    assert [t["input"] for t in turns] == ["Hello there.", "And then?"] and all(isinstance(t["answer"], str) for t in turns)
    log.write_text('{"not": "a list"}')
    bad = runner.invoke(app, ["chat", "--model", str(base_model), "--text", "hi", "--history", str(log)])
    assert bad.exit_code == 2 and "history.json: a chat history is a JSON list" in bad.output and "Traceback" not in bad.output


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory):
    """A tiny random VitsModel of three speakers with a character VitsTokenizer, as save_pretrained writes them."""
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    folder = tmp_path_factory.mktemp("vits")
    vocab = {c: i for i, c in enumerate(["<pad>", *" abcdefghijklmnopqrstuvwxyz'.,?!"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = VitsTokenizer(str(folder / "vocab.json"), pad_token="<pad>", unk_token="<pad>", add_blank=True,
                        normalize=True, phonemize=False, is_uroman=False)
    torch.manual_seed(0)
    model = VitsModel(VitsConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, flow_size=16,
        spectrogram_bins=33, upsample_initial_channel=32, upsample_rates=[8, 8], upsample_kernel_sizes=[16, 16],
        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=2,
        duration_predictor_filter_channels=32, depth_separable_num_layers=2, num_speakers=3, speaker_embedding_size=8,
        sampling_rate=16000))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_voices_from_a_vits_model_folder_speak_dialogues_one_speaker_each(tiny_vits, speech, tmp_path):
    """--tts vits --tts-model FOLDER: the model's speakers are the voices; the same text and voice always give the
    same audio (VITS's noise is seeded), each speaker sounds different, and each record names its voices."""
    from transformers import VitsModel, VitsTokenizer

    from speechinstruct.sources.tts import TTSError, make_tts

    _, mfcc, km = speech
    tts = make_tts("vits", tmp_path / "cache", model=str(tiny_vits), voices=["0", "2"])
    assert tts.engine.voices == ("0", "2")
    first, sr = tts.engine.synthesize("hello there", "2")
    again, _ = tts.engine.synthesize("hello there", "2")
    other, _ = tts.engine.synthesize("hello there", "0")
    assert sr == 16000 and np.array_equal(first, again) and not (first.size == other.size and np.allclose(first, other))
    model, tok = VitsModel.from_pretrained(tiny_vits).eval(), VitsTokenizer.from_pretrained(tiny_vits)
    with torch.no_grad():  # the model's own output for that speaker, under the seed the engine drew
        import hashlib

        torch.manual_seed(int(hashlib.sha256("2\0hello there".encode()).hexdigest()[:8], 16))
        theirs = model(**tok("hello there", return_tensors="pt"), speaker_id=2).waveform[0].numpy()
    assert np.allclose(first, theirs, atol=1e-6)
    summary = dialogue("builtin", tmp_path / "out", SpeechEncoder(km, mfcc), tts, sections.Dialogue(max_dialogues=3))
    assert summary["records"] == 3
    for r in rows(tmp_path / "out"):
        assert sorted(r["voice"].split(",")) == ["vits:0@1", "vits:2@1"]  # two speakers, one voice each
    with pytest.raises(TTSError, match=r"no speaker '3': its voices are 0..2"):
        make_tts("vits", None, model=str(tiny_vits), voices=["3"])
    with pytest.raises(TTSError, match="not a transformers VITS folder"):
        make_tts("vits", None, model=str(tmp_path))


def test_espeak_voices_can_be_chosen_and_a_missing_one_is_one_line(speech, tmp_path):
    from speechinstruct.sources.tts import TTSError, make_tts

    _, mfcc, km = speech
    tts = make_tts("espeak", tmp_path / "cache", voices=["en-us", "en-gb-scotland+f4"])
    summary = dialogue("builtin", tmp_path / "out", SpeechEncoder(km, mfcc), tts, sections.Dialogue(max_dialogues=4))
    used = {v.split(":")[1].split("@")[0] for r in rows(tmp_path / "out") for v in r["voice"].split(",")}
    assert summary["records"] == 4 and used == {"en-us", "en-gb-scotland+f4"}
    with pytest.raises(TTSError, match=r"espeak-ng has no voice 'xx-nowhere'"):
        make_tts("espeak", None, voices=["en-us", "xx-nowhere"])
    result = runner.invoke(app, ["compose", "dialogue", "builtin", str(tmp_path / "o"), "--kmeans", str(tmp_path / "k.npy"),
                                 "--voices", "xx-nowhere"])
    assert result.exit_code == 2 and "espeak-ng has no voice 'xx-nowhere'" in result.output


def test_chat_keeps_the_recent_history_that_fits_and_names_bad_model_folders_at_once(base_model, tmp_path):  # noqa: F811
    """A history longer than the model's context: the earliest exchanges are left out of the prompt (and said
    so), not an IndexError. A missing, empty or dataset folder as --model: one line, before transformers (which
    would take the name for a hub id and retry the network)."""
    import shutil

    from transformers import AutoConfig

    small = tmp_path / "small"
    shutil.copytree(base_model, small)
    config = AutoConfig.from_pretrained(small)
    config.max_position_embeddings = 600
    config.save_pretrained(small)
    log = tmp_path / "long.json"
    log.write_text(json.dumps([{"input": f"Tell me story number {i}.", "answer": "Once upon a time " * 8}
                               for i in range(20)]))
    result = runner.invoke(app, ["chat", "--model", str(small), "--text", "And then?", "--history", str(log),
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "earliest exchanges of the history did not fit" in result.output
    answer = json.loads(result.stdout[result.stdout.index("{"):])
    assert 0 < answer["history_left_out"] < 20
    assert len(json.loads(log.read_text())) == 21  # the file keeps every exchange

    (tmp_path / "empty").mkdir()
    (tmp_path / "dataset" / "data").mkdir(parents=True)
    for folder, says in ((tmp_path / "missing" / "model", "no such folder"), (tmp_path / "empty", "not a model (empty)"),
                         (tmp_path / "dataset", "not a model (a dataset)")):
        bad = runner.invoke(app, ["chat", "--model", str(folder), "--text", "hi"])
        assert bad.exit_code == 2 and says in bad.output and "Traceback" not in bad.output, bad.output
    log.write_text("[" * 100_000)
    bad = runner.invoke(app, ["chat", "--model", str(base_model), "--text", "hi", "--history", str(log)])
    assert bad.exit_code == 2 and "nested too deeply" in bad.output


def test_the_dialogue_config_is_chat_data_to_trl_under_every_hash_seed(composed):
    """TRL's is_conversational pops one of prompt/completion/messages from a set: with string prompt/completion
    beside messages the answer changed with PYTHONHASHSEED (True for 2 of 16 seeds). The config has messages only,
    so TRL's own function says True in every process: checked in fresh interpreters under several seeds."""
    import subprocess
    import sys

    from speechinstruct.release.publish import publish

    root, _, _ = composed
    if not (root / "dataset").is_dir():
        publish(root / "composed", root / "dataset")
    script = ("import datasets, sys\nfrom trl.data_utils import is_conversational\n"
              "ds = datasets.load_dataset(sys.argv[1], 'dialogue', split='train')\n"
              "print(all(is_conversational(ds[i]) for i in range(len(ds))), sorted(set(ds.column_names) & "
              "{'prompt', 'completion', 'chosen', 'rejected', 'messages'}))\n")
    for seed in ("0", "1", "5"):  # with prompt/completion strings beside messages: False, False, False
        out = subprocess.run([sys.executable, "-c", script, str(root / "dataset")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed, "HF_DATASETS_OFFLINE": "1"}, timeout=120)
        assert out.stdout.split("\n")[0] == "True ['messages']", (seed, out.stdout, out.stderr[-2000:])


def test_the_report_shows_a_dialogue_of_each_length_and_counts_dialogues(composed, tmp_path):
    from speechinstruct.release.publish import publish
    from speechinstruct.release.report import report

    root, _, _ = composed
    if not (root / "dataset").is_dir():
        publish(root / "composed", root / "dataset")
    numbers = report(root / "dataset", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<td>dialogue: 2 turns</td>" in page and "<td>dialogue: 3 turns</td>" in page
    assert "records.png" in numbers["plots"]
    assert "- (text; its speech synthesized)" in page  # the shipped sample: no hours of its own, and not 0.000
