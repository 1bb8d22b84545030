import json

import pytest

from openai_server import FakeOpenAI
from speechinstruct import compose, templates
from speechinstruct.llm import LLM, BudgetExceeded, LLMError

FAKE_KEY = "sk-test-SECRET0123456789abcdef"


@pytest.fixture(autouse=True)
def fake_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)


def test_retries_429_then_succeeds(tmp_path):
    with FakeOpenAI([("status", 429), ("status", 503), ("ok", "hello")]) as server:
        llm = LLM(base_url=server.url, model="m", cache_dir=tmp_path / "cache")
        assert llm.complete([{"role": "user", "content": "hi"}]) == "hello"
        assert len(server.requests) == 3
        assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == f"Bearer {FAKE_KEY}"
        # cached: a second identical request does not reach the server
        assert llm.complete([{"role": "user", "content": "hi"}]) == "hello"
        assert len(server.requests) == 3


def test_timeout_becomes_clear_error(tmp_path):
    with FakeOpenAI([("sleep", 2.0, "late")] * 3) as server:
        llm = LLM(base_url=server.url, model="m", timeout=0.3, max_retries=1)
        with pytest.raises(LLMError, match="APITimeoutError"):
            llm.complete([{"role": "user", "content": "hi"}])


def test_budget(tmp_path):
    with FakeOpenAI(default=lambda r: "ok") as server:
        llm = LLM(base_url=server.url, model="m", max_requests=2)
        llm.complete([{"role": "user", "content": "1"}])
        llm.complete([{"role": "user", "content": "2"}])
        with pytest.raises(BudgetExceeded):
            llm.complete([{"role": "user", "content": "3"}])
        assert len(server.requests) == 2


def test_no_endpoint_is_clear(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(LLMError, match="no LLM endpoint"):
        LLM()


@pytest.mark.parametrize("answer,expected", [
    ('["Transcribe this.", "Write down the words."]', ["Transcribe this.", "Write down the words."]),
    ('Sure!\n```json\n{"instructions": ["Transcribe this.", "Write it out"]}\n```', ["Transcribe this.", "Write it out"]),
    ('Here you go:\n1. Transcribe this.\n2) "Write it out."\n- Please type it up', ["Transcribe this.", "Write it out.", "Please type it up"]),
])
def test_parse_instructions(answer, expected):
    assert templates.parse_instructions(answer) == expected


def test_generate_templates_against_local_server(tmp_path):
    answers = [
        json.dumps(["Please transcribe this recording.", "Please transcribe this recording!", "What is said here?"]),
        "not json at all {",
        "\n".join(f"{i}. Variant number {w} of a transcription request" for i, w in enumerate(
            ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])),
        json.dumps(["Write the words you hear in this clip.", "Convert the spoken input into text."]),
    ]
    with FakeOpenAI([("status", 429)] + [("ok", a) for a in answers]) as server:
        llm = LLM(base_url=server.url, model="local-model", cache_dir=tmp_path / "cache")
        data = templates.generate(llm, "asr", n=5, out=tmp_path / "asr.json")
    texts = [t["text"] for t in data["templates"]]
    assert len(texts) == 5 and len(set(texts)) == 5
    assert "Please transcribe this recording!" not in texts  # near-duplicate dropped
    loaded = templates.load(tmp_path / "asr.json", "asr")
    assert loaded["version"].startswith("llm-") and loaded["source"]["model"] == "local-model"
    with pytest.raises(ValueError, match="asr.json: not a tts template file"):
        templates.load(tmp_path / "asr.json", "tts")
    # the key is nowhere on disk
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert FAKE_KEY not in f.read_text(errors="ignore")


def test_rewrite_for_speech(tmp_path):
    def answer(request):
        pair = json.loads(request["messages"][-1]["content"])
        if "code" in pair["instruction"]:
            return '{"fit": false, "instruction": "", "response": ""}'
        if "garbled" in pair["instruction"]:
            return "I cannot answer in JSON, sorry"
        return json.dumps({"fit": True, "instruction": "hey, " + pair["instruction"].lower(), "response": "Sure. " + pair["response"]})

    with FakeOpenAI(default=answer) as server:
        llm = LLM(base_url=server.url, model="m")
        assert compose.rewrite_for_speech(llm, "What is 2+2?", "4") == ("hey, what is 2+2?", "Sure. 4")
        assert compose.rewrite_for_speech(llm, "Write code", "x") == "LLM judged unfit for speech"
        assert compose.rewrite_for_speech(llm, "garbled", "x") == "LLM answer not understood"


def test_error_messages_never_show_the_key(monkeypatch):
    from speechinstruct.llm import _scrub
    assert FAKE_KEY not in _scrub(f"Incorrect API key provided: {FAKE_KEY}", FAKE_KEY)
    assert "SECRET" not in _scrub("key sk-abcdefSECRETxyz rejected", None)


def test_openai_speech_endpoint_tts_is_cached(tmp_path):
    import io

    import numpy as np
    import soundfile as sf

    from conftest import speechlike
    from speechinstruct.tts import make_tts

    def speech(request):
        buf = io.BytesIO()
        sf.write(buf, speechlike(0.2 * len(request["input"].split()), 24000), 24000, format="WAV")
        return buf.getvalue()

    with FakeOpenAI(speech=speech) as server:
        llm = LLM(base_url=server.url, model="m", max_requests=2)
        tts = make_tts("openai", tmp_path / "cache", llm=llm, model="tts-test")
        voice, rate = tts.voice_for("utt-1")
        wav, sr = tts.synthesize("one two three four five", voice, rate)
        assert sr == 24000 and abs(wav.size - 24000) < 10
        again, _ = tts.synthesize("one two three four five", voice, rate)
        np.testing.assert_array_equal(wav, again)
        assert [r["model"] for r in server.requests] == ["tts-test"] and server.requests[0]["voice"] == voice
        tts.synthesize("six seven", voice, rate)  # the second request of a budget of two
        with pytest.raises(BudgetExceeded):
            tts.synthesize("eight nine", voice, rate)
        assert len(server.requests) == 2


def test_key_from_key_file(tmp_path, monkeypatch):
    from speechinstruct.llm import api_key
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / "key").write_text(FAKE_KEY + "\n")
    monkeypatch.setenv("SPEECHINSTRUCT_API_KEY_FILE", str(tmp_path / "key"))
    assert api_key() == FAKE_KEY
    with FakeOpenAI(default=lambda r: "ok") as server:
        LLM(base_url=server.url, model="m").complete([{"role": "user", "content": "x"}])
        assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == f"Bearer {FAKE_KEY}"
