import json
import re

import pytest

from openai_server import FakeOpenAI
from speechinstruct.compose.speech import rewrite_for_speech
from speechinstruct.compose import templates
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
        assert rewrite_for_speech(llm, "What is 2+2?", "4") == ("hey, what is 2+2?", "Sure. 4")
        assert rewrite_for_speech(llm, "Write code", "x") == "LLM judged unfit for speech"
        assert rewrite_for_speech(llm, "garbled", "x") == "LLM answer not understood"


def test_error_messages_never_show_the_key(monkeypatch):
    from speechinstruct.llm import _scrub
    assert FAKE_KEY not in _scrub(f"Incorrect API key provided: {FAKE_KEY}", FAKE_KEY)
    assert "SECRET" not in _scrub("key sk-abcdefSECRETxyz rejected", None)


def test_openai_speech_endpoint_tts_is_cached(tmp_path):
    import io

    import numpy as np
    import soundfile as sf

    from conftest import speechlike
    from speechinstruct.sources.tts import make_tts

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


def test_openai_tts_draws_only_the_voices_it_is_given(tmp_path):
    """--voices for an OpenAI-compatible speech endpoint (Kokoro's voice names, say): only those are asked for."""
    import io

    import soundfile as sf

    from conftest import speechlike
    from speechinstruct.sources.tts import make_tts

    def speech(request):
        buf = io.BytesIO()
        sf.write(buf, speechlike(0.3, 24000), 24000, format="WAV")
        return buf.getvalue()

    with FakeOpenAI(speech=speech) as server:
        tts = make_tts("openai", None, llm=LLM(base_url=server.url, model="m"), model="kokoro", voices=["af_bella", "am_adam"])
        for n in range(6):
            tts.synthesize(f"sentence {n}", *tts.voice_for(f"utt-{n}"))
        assert {r["voice"] for r in server.requests} == {"af_bella", "am_adam"}


def test_key_from_key_file(tmp_path, monkeypatch):
    from speechinstruct.llm import api_key
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / "key").write_text(FAKE_KEY + "\n")
    monkeypatch.setenv("SPEECHINSTRUCT_API_KEY_FILE", str(tmp_path / "key"))
    assert api_key() == FAKE_KEY
    with FakeOpenAI(default=lambda r: "ok") as server:
        LLM(base_url=server.url, model="m").complete([{"role": "user", "content": "x"}])
        assert {k.lower(): v for k, v in server.headers[0].items()}["authorization"] == f"Bearer {FAKE_KEY}"


@pytest.mark.parametrize("speech,message", [
    (lambda request: b"<html>not audio</html>", r"/v1/audio/speech answered 200 with 22 bytes that are not audio \(audio/wav, starting b'<html>not audio<'\)"),
    (lambda request: 404, r"/v1/audio/speech answered HTTP 404 \(NotFoundError\): this server has no speech endpoint"),
])
def test_speech_endpoint_failures_are_one_clear_line(tmp_path, speech, message):
    from speechinstruct.sources.tts import TTSError, make_tts
    with FakeOpenAI(speech=speech) as server:
        tts = make_tts("openai", tmp_path / "cache", llm=LLM(base_url=server.url, model="m"))
        with pytest.raises(TTSError, match=message):
            tts.synthesize("hello there", "alloy", 1)
    assert not list((tmp_path / "cache").rglob("*.flac")) if (tmp_path / "cache").exists() else True


def test_a_full_disk_while_caching_speech_is_one_clear_line(tmp_path):
    """A real write failure: the process may write files of at most 2 kB (RLIMIT_FSIZE)."""
    import subprocess
    import sys
    code = """
import resource, signal, sys
from speechinstruct.sources.tts import CachedTTS, EspeakTTS, TTSError
tts = CachedTTS(EspeakTTS(), sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
try:
    tts.synthesize("a sentence long enough to need more than two kilobytes of flac", "en-us", 160)
except TTSError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"cannot write the TTS cache file {tmp_path / 'cache'}/") and "Traceback" not in out.stderr
    assert not list((tmp_path / "cache").rglob("*.flac")) and not list((tmp_path / "cache").rglob(".*tmp*"))


SOUP = json.dumps(["че quickExcelgy SettingvisedMapping", "ologyInst 反 Settingvised", "adultos qué tangent Excelgy"])


def test_templates_from_a_nonsense_model_fail_loudly(tmp_path):
    """A model answering token soup: nothing is called a template, and the last line says what happened."""
    from typer.testing import CliRunner
    from speechinstruct.cli import app
    good = json.dumps(["Please transcribe this recording.", "What is said in this clip?", "Write down the spoken words."])
    script = [("ok", SOUP), ("length", json.dumps(["Transcribe this", "Write"])), ("ok", good)] + [("ok", SOUP)] * 20
    with FakeOpenAI(script) as server:
        result = CliRunner().invoke(app, ["templates", "generate", str(tmp_path / "asr.json"), "--task", "asr", "--n", "20",
                                          "--base-url", server.url, "--model", "m", "--max-tokens", "300",
                                          "--timeout", "5"])
        assert all(r["max_tokens"] == 300 for r in server.requests)
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: asked 20, wrote 3 to ") and "1 answer cut off (max_tokens)" in line
    assert "--allow-fewer" in line and re.search(r"\d+ not real words", line)
    data = json.loads((tmp_path / "asr.json").read_text())
    assert [t["text"] for t in data["templates"]] == json.loads(good)
    assert data["source"]["requested"] == 20 and data["source"]["written"] == 3
    with FakeOpenAI([("ok", SOUP)] * 30) as server:  # only soup: nothing written at all
        result = CliRunner().invoke(app, ["templates", "generate", str(tmp_path / "soup.json"), "--task", "asr", "--n", "5",
                                          "--base-url", server.url, "--model", "m", "--allow-fewer"])
    assert result.exit_code == 2 and "no usable instructions" in result.stderr and not (tmp_path / "soup.json").exists()


def test_allow_fewer_accepts_a_short_set(tmp_path):
    from typer.testing import CliRunner
    from speechinstruct.cli import app
    good = json.dumps(["Please transcribe this recording.", "What is said in this clip?"])
    with FakeOpenAI([("ok", good)] + [("ok", SOUP)] * 20) as server:
        result = CliRunner().invoke(app, ["templates", "generate", str(tmp_path / "asr.json"), "--task", "asr", "--n", "5",
                                          "--base-url", server.url, "--model", "m", "--allow-fewer"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("asked 5, wrote 2 asr templates") and "not real words" in result.stdout


def test_a_cut_off_rewrite_drops_the_pair(tmp_path):
    from speechinstruct.compose.speech import rewrite_for_speech
    with FakeOpenAI([("length", '{"fit": true, "instruction": "Say hi.", "response": "Hel')]) as server:
        llm = LLM(base_url=server.url, model="m", cache_dir=tmp_path / "cache")
        assert rewrite_for_speech(llm, "Say hi.", "Hello.") == "LLM answer cut off (max_tokens)"
        assert rewrite_for_speech(llm, "Say hi.", "Hello.") == "LLM answer cut off (max_tokens)"  # cached, same
        assert len(server.requests) == 1


def test_a_speech_endpoint_failing_for_a_while_is_retried_and_nothing_failed_is_cached(tmp_path):
    """503, 503, then audio: the openai client's retries (backoff) ride it out; the audio is cached, the failures
    never are. An LLM or speech URL that carries credentials is refused before any request, without echoing it."""
    import io

    import soundfile as sf

    from conftest import speechlike
    from speechinstruct.sources.tts import make_tts

    answers = [503, 503]

    def speech(request):
        if answers:
            return answers.pop(0)
        buf = io.BytesIO()
        sf.write(buf, speechlike(0.5, 24000), 24000, format="WAV")
        return buf.getvalue()

    with FakeOpenAI(speech=speech) as server:
        tts = make_tts("openai", tmp_path / "cache", llm=LLM(base_url=server.url, model="m"), model="tts")
        wav, sr = tts.synthesize("hello there", "alloy", 1)
        assert sr == 24000 and wav.size and len(server.requests) == 3
        assert len(list((tmp_path / "cache").rglob("*.*"))) >= 1
    secret = "sk-abcdef0123456789secret"
    for url in (f"http://me:{secret}@127.0.0.1:9/v1", f"http://127.0.0.1:9/v1?key={secret}"):
        with pytest.raises(LLMError, match="carries credentials") as e:
            LLM(base_url=url, model="m")
        assert secret not in str(e.value)
