"""Text-to-speech engines for chain-of-modality dialogues and the demo corpus.

* ``EspeakTTS``: the embedded default. libespeak-ng and its voice data come in the ``espeakng-loader``
  wheel and are driven in-process through ctypes: no apt, no network. Several voices (accents and voice
  variants) and speaking rates give variety.
* ``OpenAITTS``: any OpenAI-compatible ``/audio/speech`` endpoint (Kokoro, CosyVoice and others serve it).
* ``VitsTTS``: a transformers ``VitsModel`` folder (MMS-TTS and other VITS models), its speakers as voices.

Each engine draws a voice (and rate) per key from its ``voices``, which a recipe's ``compose.voices`` or
``--voices`` can set; every voice is checked when the engine is made, so a misspelt one is one line.

``CachedTTS`` wraps either and keeps every synthesis as FLAC under a cache folder, keyed by a hash of
engine, voice, rate and text, so a rerun synthesizes nothing twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import logging
import os
import signal
from pathlib import Path

import numpy as np
import soundfile as sf

from ..io import atomic_path

log = logging.getLogger(__name__)

# Voices that ship in espeakng-loader's data (accent + voice variant).
ESPEAK_VOICES = ("en-us", "en-us+f3", "en", "en+f2", "en-029+m3", "en-gb-scotland+f4", "en-us+m7", "en-gb-x-rp+f5", "en-us-nyc")
ESPEAK_RATES = (150, 165, 180)  # words per minute
PUNCTUATION = ".,;:!?\"'()[]"


class TTSError(RuntimeError):
    pass


class EspeakTTS:
    """espeak-ng. ``synthesize(text, voice, rate) -> (float32 samples in [-1, 1], sample rate)``.

    libespeak-ng keeps state from one utterance to the next that no API call resets (its pitch flutter
    runs on), so the same text would sound slightly different depending on what was said before. Each
    utterance is therefore spoken in a fresh process (forked where the platform allows): the same (text,
    voice, rate) always gives the same samples, which keeps datasets byte-identical. One process per call,
    not a ``multiprocessing.Pool(maxtasksperchild=1)``: such a pool waits forever for the result of a worker
    that died (seen once in the test suite, two pools alive in one process), where a lone process's death is
    seen at once and is one line."""

    name = "espeak-ng"
    fork_limit = 60.0  # seconds a forked process may answer in (360 words, 107 s of audio: 0.28 s, 2-core machine)

    def __init__(self, voices: tuple[str, ...] | None = None, rates: tuple[int, ...] = ESPEAK_RATES):
        import multiprocessing as mp

        self.voices, self.rates = tuple(voices or ESPEAK_VOICES), tuple(rates)
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise TTSError("espeak-ng TTS needs the espeakng-loader package (pip install espeakng-loader)") from e
        if not Path(espeakng_loader.get_library_path()).is_file():
            raise TTSError(f"libespeak-ng missing at {espeakng_loader.get_library_path()}")
        self._context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._spawn = mp.get_context("spawn")
        if voices:  # the defaults are known to exist (a test)
            missing = [v for v in self.voices if not self._fresh(_espeak_has_voice, v)]
            if missing:
                raise TTSError(f"espeak-ng has no voice {', '.join(map(repr, missing))} (voices are a language such as "
                               "en-us, optionally +variant such as en-us+f3)")

    def voice_for(self, key: str) -> tuple[str, int]:
        """A (voice, rate) chosen deterministically from ``key``."""
        h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        return self.voices[h % len(self.voices)], self.rates[(h // len(self.voices)) % len(self.rates)]

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 165) -> tuple[np.ndarray, int]:
        return self._fresh(_espeak_once, _said(text), voice, int(rate))

    def synthesize_words(self, text: str, voice: str = "en-us", rate: int = 165) -> tuple[np.ndarray, int, list[dict]]:
        """:meth:`synthesize`, and when espeak-ng spoke each word: {word, start, end} in seconds, from its own
        word events. A word lasts until the next event (the last until the audio ends). espeak-ng sends no event
        for some unstressed words it speaks with the next or previous one ("for the"): the text up to the next
        event is then one entry, so the entries, in order, hold every word of the text (punctuation left out)."""
        text = _said(text)
        wav, sr, events = self._fresh(_espeak_once, text, voice, int(rate), True)
        positions = [pos - 1 for pos, _, _ in events] + [len(text)]  # espeak-ng counts characters from 1
        words = []
        positions[0] = 0  # text before the first event (none seen) goes with the first word
        for (_, _, ms), start_pos, end_pos, next_event in zip(events, positions, positions[1:], [*events[1:], None]):
            label = " ".join(w.strip(PUNCTUATION) for w in text[start_pos:end_pos].split() if w.strip(PUNCTUATION))
            end = next_event[2] / 1000 if next_event else wav.size / sr
            if label:
                words.append({"word": label, "start": ms / 1000, "end": end})
        return wav, sr, words

    def _fresh(self, fn, *args):
        """``fn(*args)`` in a new process: its result, its exception raised here, or one line when it died.

        A forked process killed by a signal, or silent for ``fork_limit`` seconds (then killed: a forked child of
        a process with other threads may wait for good on a lock one of them held), is tried again spawned.
        Spoken there, it died of what it inherited from this one, not of its text (seen in CI: SIGSEGV, in a test
        process that had run other tests first; a process whose Ray runtime was shut down keeps 11 of Ray's
        threads, against 1 before ``ray.init``): every later utterance of this engine is spoken in a spawned
        process, and a warning says so. Killed spawned too, the text is to blame: one line, and the next utterance
        is forked again."""
        forked = self._context is not self._spawn and not _fork_unsafe()
        result, exitcode, silent = _in_new_process(self._context if forked else self._spawn, fn, args,
                                                   self.fork_limit if forked else None)
        if forked and exitcode < 0 and result is None:  # the process was joined: an exit code
            what = (f"gave no answer in {self.fork_limit:g} s" if silent
                    else f"was killed (signal {_signal_name(-exitcode)})")
            result, exitcode, _ = _in_new_process(self._spawn, fn, args)
            if exitcode == 0 or result is not None:
                log.warning("a forked espeak-ng process %s, a spawned one did not: speaking in spawned processes "
                            "from now on (slower: each imports Python afresh)", what)
                self._context = self._spawn
        if exitcode != 0 and result is None:
            raise TTSError(f"the espeak-ng process died (exit code {exitcode})")
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self):  # nothing is kept between calls
        pass


def _said(text: str) -> str:
    """``text`` as espeak-ng is given it: whitespace runs as one space; an empty text is one TTSError."""
    text = " ".join(text.split())
    if not text:
        raise TTSError("nothing to say: empty text")
    return text


def _in_new_process(context, fn, args, limit: float | None = None):
    """(what ``fn(*args)`` returned or raised, or None when it sent nothing; the process's exit code; whether it
    was killed here for sending nothing and not ending within ``limit`` seconds)."""
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(send, receive, fn, args, os.getpid()), daemon=True)
    process.start()
    send.close()
    silent = False
    try:
        if limit is not None and not receive.poll(limit):
            silent = True
            process.kill()
            raise EOFError
        result = receive.recv()
    except EOFError:
        result = None
    finally:
        receive.close()
        process.join()
    return result, process.exitcode, silent


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _fork_unsafe() -> bool:
    """Whether this process is connected to Ray (``run`` with a ``ray`` section, ``extract_ray``): its gRPC
    threads make a forked child crash now and then (seen: the espeak-ng process died, exit code -11, in a test
    of a recipe on Ray), so children are spawned then (slower: each imports Python afresh)."""
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def _die_with(parent: int) -> None:
    """End this (forked) process when ``parent`` does, as Linux's PR_SET_PDEATHSIG does: a process left behind
    by a killed run would hold what it inherited, the workdir's lock among them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1 (linux/prctl.h)
    except (OSError, AttributeError):  # not Linux: the parent's daemon flag still ends it at a normal exit
        return
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


def _run_and_send(connection, parents_end, fn, args, parent: int) -> None:
    _die_with(parent)
    parents_end.close()  # forked with both ends: holding the reading end, a write to a dead parent would block forever
    try:
        connection.send(fn(*args))
    except BaseException as e:  # sent back to the caller, which raises it
        connection.send(e)
    finally:
        connection.close()


def _espeak_library():
    """libespeak-ng, initialised in this (fresh) process: (library, sample rate)."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    data_parent = os.path.dirname(espeakng_loader.get_data_path())
    sample_rate = lib.espeak_Initialize(2, 0, data_parent.encode(), 0)  # 2 = AUDIO_OUTPUT_SYNCHRONOUS
    if sample_rate <= 0:
        raise TTSError(f"espeak-ng failed to initialise with data in {data_parent}")
    return lib, sample_rate


def _espeak_has_voice(voice: str) -> bool:
    lib, _ = _espeak_library()
    return lib.espeak_SetVoiceByName(voice.encode()) == 0


class _EspeakEvent(ctypes.Structure):
    """``espeak_EVENT`` of speak_lib.h (the union ``id`` is 8 bytes: an int, a pointer or char[8])."""
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


EVENT_LIST_TERMINATED, EVENT_WORD = 0, 1


def _espeak_once(text: str, voice: str, rate: int, with_words: bool = False):
    """Initialise libespeak-ng in this (fresh) process and speak one utterance: (samples, rate), and with
    ``with_words`` its word events as (character position, length, milliseconds into the audio)."""
    lib, sample_rate = _espeak_library()
    chunks: list[np.ndarray] = []
    word_events: list[tuple[int, int, int]] = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
    def callback(wav, n, events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events and events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_WORD:
                word_events.append((events[i].text_position, events[i].length, events[i].audio_position))
            i += 1
        return 0

    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise TTSError(f"espeak-ng has no voice {voice!r}")
    lib.espeak_SetParameter(1, rate, 0)  # espeakRATE, words per minute
    # Some voice variants add noise from espeak's own generator and from libc's rand(): seed both.
    if hasattr(lib, "espeak_ng_SetRandSeed"):
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed(0)
    ctypes.CDLL(ctypes.util.find_library("c")).srand(0)
    data = text.encode("utf-8")
    # position 0, POS_CHARACTER, no end position, flags espeakCHARS_UTF8
    if lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None) != 0:
        raise TTSError(f"espeak-ng could not synthesize {text[:40]!r}")
    lib.espeak_Synchronize()
    if not chunks:
        raise TTSError(f"espeak-ng produced no audio for {text[:40]!r}")
    wav = np.concatenate(chunks).astype(np.float32) / 32768.0
    return (wav, sample_rate, word_events) if with_words else (wav, sample_rate)


class OpenAITTS:
    """An OpenAI-compatible speech endpoint (``/audio/speech``), through an ``LLM`` (client, key, budget)."""

    name = "openai"

    def __init__(self, llm, model: str = "tts-1", voices: tuple[str, ...] = ("alloy", "echo", "fable", "nova", "onyx", "shimmer")):
        self.llm, self.model, self.voices, self.rates = llm, model, tuple(voices), (1,)

    def voice_for(self, key: str) -> tuple[str, int]:
        h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        return self.voices[h % len(self.voices)], 1

    def synthesize(self, text: str, voice: str = "alloy", rate: int = 1) -> tuple[np.ndarray, int]:
        import openai

        self.llm.charge()  # the run's --max-requests covers speech requests too
        endpoint = f"{self.llm.describe()['base_url'].rstrip('/')}/audio/speech"
        try:
            response = self.llm.client.audio.speech.create(model=self.model, voice=voice, input=text, response_format="wav")
        except openai.APIStatusError as e:
            hint = ": this server has no speech endpoint (use --tts espeak)" if e.status_code in (404, 405) else ""
            raise TTSError(f"{endpoint} answered HTTP {e.status_code} ({type(e).__name__}){hint}") from None
        except openai.APIError as e:
            raise TTSError(f"speech request to {endpoint} failed: {type(e).__name__}") from None
        data = response.read()
        try:
            wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, ValueError):
            kind = response.response.headers.get("content-type", "no content type")
            raise TTSError(f"{endpoint} answered 200 with {len(data)} bytes that are not audio ({kind}, "
                           f"starting {data[:16]!r})") from None
        return wav.mean(axis=1), sr


class VitsTTS:
    """A transformers ``VitsModel`` folder (saved with its ``VitsTokenizer``): MMS-TTS and other VITS models. Its
    voices are its speakers (``"0"``, ``"1"``, …; one, ``"0"``, for a single-speaker model). VITS draws noise for
    its durations and flow; it is seeded from the text and voice, so the same input always gives the same audio."""

    name = "vits"

    def __init__(self, folder: str | Path, voices: tuple[str, ...] | None = None, device: str = "cpu"):
        from transformers import AutoTokenizer, VitsModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise TTSError(f"{folder}: not a transformers VITS folder (no config.json); pass --tts-model FOLDER")
        try:
            self.model = VitsModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TTSError(f"{folder}: cannot load a VITS model ({str(e).splitlines()[0]})") from None
        self.model_dir, self.device = folder, device
        self.model_id = f"{folder.name}:{self._weights_digest()}"  # the cache key: another model, other audio
        speakers = max(1, int(self.model.config.num_speakers))
        self.voices, self.rates = tuple(voices or [str(i) for i in range(speakers)]), (1,)
        bad = [v for v in self.voices if not (v.isdigit() and int(v) < speakers)]
        if bad:
            raise TTSError(f"{folder}: no speaker {', '.join(map(repr, bad))}: its voices are 0..{speakers - 1}")

    def _weights_digest(self) -> str:
        from ..io import sha256_file

        weights = sorted(self.model_dir.glob("*.safetensors"))
        return sha256_file(weights[0])[:16] if weights else "unknown"

    def voice_for(self, key: str) -> tuple[str, int]:
        h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
        return self.voices[h % len(self.voices)], 1

    def synthesize(self, text: str, voice: str = "0", rate: int = 1) -> tuple[np.ndarray, int]:
        import torch

        inputs = self.tokenizer(" ".join(text.split()), return_tensors="pt").to(self.device)
        if inputs["input_ids"].shape[1] == 0:
            raise TTSError(f"nothing to say: {text[:40]!r} has no characters this VITS model knows")
        speaker = int(voice) if self.model.config.num_speakers > 1 else None
        seed = int(hashlib.sha256(f"{voice}\0{text}".encode()).hexdigest()[:8], 16)
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            wav = self.model(**inputs, speaker_id=speaker).waveform[0]
        return wav.float().cpu().numpy(), int(self.model.config.sampling_rate)


class CachedTTS:
    """Any engine, with each result stored as ``cache/ab/abcdef….flac`` keyed by engine, voice, rate, text."""

    def __init__(self, engine, cache_dir: str | Path | None):
        self.engine = engine
        self.name = engine.name
        self.cache = Path(cache_dir) if cache_dir else None
        self.calls = 0

    def voice_for(self, key: str) -> tuple[str, int]:
        return self.engine.voice_for(key)

    def synthesize(self, text: str, voice: str, rate: int) -> tuple[np.ndarray, int]:
        if self.cache is None:
            self.calls += 1
            return self.engine.synthesize(text, voice, rate)
        model = getattr(self.engine, "model_id", None) or getattr(self.engine, "model", "")
        key = hashlib.sha256(f"{self.engine.name}\0{model}\0{voice}\0{rate}\0{text}".encode()).hexdigest()
        path = self.cache / key[:2] / f"{key}.flac"
        if path.is_file():
            wav, sr = sf.read(path, dtype="float32")
            return wav, sr
        self.calls += 1
        wav, sr = self.engine.synthesize(text, voice, rate)
        try:
            with atomic_path(path) as tmp:
                sf.write(tmp, np.clip(wav, -1, 1), sr, format="FLAC")
        except (OSError, sf.LibsndfileError, RuntimeError) as e:  # a full disk, a read-only cache …
            raise TTSError(f"cannot write the TTS cache file {path}: {str(e).splitlines()[0]}") from None
        return sf.read(path, dtype="float32")  # the cached bytes, so first and later runs agree exactly


def make_tts(engine: str = "espeak", cache_dir: str | Path | None = None, llm=None, model: str = "tts-1",
             voices: list[str] | None = None) -> CachedTTS:
    """A cached TTS engine: ``espeak`` (embedded), ``openai`` (``model`` at the LLM's endpoint) or ``vits``
    (``model``: a VitsModel folder); ``voices`` to draw from (default: the engine's own list)."""
    voices = tuple(voices) if voices else None
    if engine == "espeak":
        return CachedTTS(EspeakTTS(voices), cache_dir)
    if engine == "openai":
        if llm is None:
            raise ValueError("--tts openai needs an endpoint (--base-url, or $OPENAI_API_KEY for OpenAI)")
        return CachedTTS(OpenAITTS(llm, model=model, **({"voices": voices} if voices else {})), cache_dir)
    if engine == "vits":
        return CachedTTS(VitsTTS(model, voices), cache_dir)
    raise ValueError(f"unknown TTS engine {engine!r}: choose espeak, openai or vits")
