"""Recipes: the YAML that ``speechinstruct run`` reads, defined once as a typed schema (pydantic).

The whole recipe is checked before any stage runs: unknown keys at any depth (``kmeans.max_frams``), wrong
types (``demo_corpus: [1, 2]``, ``sentences: five``), out-of-range values, and references between sections
(a ``compose.cross_modal.corpora`` entry that names no corpus) each give one line naming the key path. A key
that looks like a secret (``llm.api_key``, ``token``, ``password`` …) or a value that looks like an API key is
refused: keys come from ``$OPENAI_API_KEY`` or a key file, so none can end up in a stamp, card or log.
``${VAR}`` in a string is read from the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .io import read_yaml
from .llm import URL_CREDENTIALS
from .sources.corpora import CHANNELS, SOURCES, option_problem, root_problem
from .sources.storage import is_hub_id, is_url
from .tokenizers import FEATURES, SSL_MODELS

SECRET_KEY = re.compile(r"(api[_-]?key|apikey|secret|token|password|passwd|credential|auth)", re.IGNORECASE)
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|hf_[A-Za-z0-9]{20,})\b")


class RecipeError(ValueError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoCorpus(Section):
    sentences: int = Field(300, ge=1, le=100_000)
    seed: int = 0


class CorpusOptions(Section):
    splits: Optional[Union[str, list[str]]] = None
    # a part's split where its name says none (dev: validation, as speechinstruct 0.2 named it)
    split_map: Optional[dict[str, Literal["train", "validation", "test", "dev"]]] = None
    subset: Optional[str] = None
    tsv: Optional[str] = None
    max_seconds: Optional[float] = Field(None, gt=0)
    license: Optional[str] = None
    follow_links: Optional[bool] = None  # read files through links that lead out of root (shard --follow-links)
    # hf: columns and one split of a Hugging Face audio dataset
    audio_column: Optional[str] = None
    text_column: Optional[str] = None
    id_column: Optional[str] = None
    speaker_column: Optional[str] = None
    split: Optional[str] = None
    config: Optional[str] = None  # the dataset card's config (load_dataset's name; the Hub's subset)
    # lhotse, kaldi: the folder manifest paths are relative to
    audio_root: Optional[str] = None
    # audio: transcribe each utterance (as `score --asr`), here or at an OpenAI-compatible server
    asr: Optional[str] = None
    base_url: Optional[str] = None
    # audio: find each recording's speakers (speaker embeddings clustered at this cosine distance)
    speakers: Optional[bool] = None
    speaker_threshold: Optional[float] = Field(None, gt=0, lt=2)
    # audio: a recording's channels mixed (one stream), or each cut on its own (the sides of a telephone call)
    channels: Optional[Literal[CHANNELS]] = None
    # audio: threads running the VAD (default: one per CPU this process may use); how it runs, not what it makes
    workers: Optional[int] = Field(None, ge=1)
    # audio: the VAD here (local) or as Ray tasks over a cluster's nodes (ray; a recipe's `ray` section means ray)
    engine: Optional[Literal["local", "ray"]] = None
    ray_address: Optional[str] = None


# the corpus options that say how the shard stage runs, not what it makes: left out of its stamp
RUN_ONLY_OPTIONS = ("workers", "engine", "ray_address")


class Corpus(Section):
    name: Literal[tuple(n for n, s in SOURCES.items() if not s.generated)]  # the demo corpus: demo_corpus
    root: str
    options: CorpusOptions = CorpusOptions()  # the fields of every source; each takes those SOURCES names

    @model_validator(mode="after")
    def _options_of_its_source(self) -> "Corpus":
        for option in sorted(self.options.model_fields_set):
            problem = option_problem(self.name, option)
            if problem:  # located at options.<option> by load_recipe (ctx "key")
                raise PydanticCustomError("not_an_option", "{problem}", {"key": ("options", option), "problem": problem})
        return self


class Shard(Section):
    shard_hours: float = Field(10.0, gt=0)


class Features(Section):
    kind: Literal[FEATURES] = "mfcc"  # tokenizers.FEATURES: MFCC, SSL encoders at a layer, codecs
    checkpoint: Optional[str] = None
    layer: Optional[int] = Field(None, ge=1)
    codebooks: Optional[int] = Field(None, ge=1)  # codecs: how many of the model's codebooks to keep
    device: str = "auto"
    batch_seconds: float = Field(100.0, gt=0)
    float16: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"  # HuBERT compute precision
    workers: Optional[int] = Field(None, ge=1)  # audio decoding threads; None: threads.decode_workers (the device's)


class KMeans(Section):
    path: Optional[str] = None
    k: int = Field(1000, ge=2)
    max_frames: int = Field(1_000_000, ge=1)
    seed: int = 0
    niter: int = Field(25, ge=1)
    nredo: int = Field(1, ge=1)


class Templates(Section):
    asr: str = "builtin"
    tts: str = "builtin"


class LLM(Section):
    base_url: Optional[str] = None
    model: str = "gpt-4o-mini"
    max_requests: Optional[int] = Field(None, ge=0)
    max_tokens: Optional[int] = Field(2048, ge=1)
    timeout: float = Field(60.0, gt=0)


class CrossModal(Section):
    mode: Literal["both", "random", "asr", "tts"] = "both"
    asr_fraction: float = Field(0.5, ge=0, le=1)
    corpora: Optional[list[str]] = None


class Pretrain(Section):
    dev_fraction: float = Field(0.01, ge=0, lt=1)
    corpora: Optional[list[str]] = None


class ChainOfModality(Section):
    instructions: str = "builtin"
    tts: Literal["espeak", "openai", "vits"] = "espeak"
    tts_model: str = "tts-1"  # openai: the endpoint's model; vits: a VitsModel folder
    rewrite: bool = False
    max_pairs: Optional[int] = Field(None, ge=1)
    all_formats: bool = False
    license: str = "unspecified"


class Dialogue(Section):
    conversations: str = "builtin"
    tts: Literal["espeak", "openai", "vits"] = "espeak"
    tts_model: str = "tts-1"
    rewrite: bool = False
    max_dialogues: Optional[int] = Field(None, ge=1)
    license: str = "unspecified"


class Duplex(Section):
    """Full-duplex conversations for Moshi-style models (``compose duplex``): see speechinstruct/duplex.py for the
    published figures the turn-taking defaults follow."""
    conversations: str = "builtin"
    tts: Literal["espeak"] = "espeak"   # the one engine with word events of its own
    max_conversations: Optional[int] = Field(None, ge=1)
    sample_rate: int = Field(24000, ge=8000)
    gap_mean: float = 0.2               # seconds between turns (negative: overlap)
    gap_sd: float = Field(0.45, ge=0)
    interruption_rate: float = Field(0.2, ge=0, le=1)
    backchannel_rate: float = Field(0.15, ge=0)  # per second of the other's turns over 2.5 s
    license: str = "unspecified"


class Interleaved(Section):
    min_words: int = Field(1, ge=1)
    max_words: int = Field(6, ge=1)
    corpora: Optional[list[str]] = None  # default: every corpus (utterances without word timings are counted)


class Compose(Section):
    seed: int = 0
    voices: Optional[list[str]] = None  # the TTS voices to draw from (default: the engine's own list)
    cross_modal: CrossModal = CrossModal()
    pretrain: Pretrain = Pretrain()
    chain_of_modality: ChainOfModality = ChainOfModality()
    dialogue: Optional[Dialogue] = None  # multi-turn dialogues: off unless the recipe asks for them
    interleaved: Optional[Interleaved] = None  # text and speech at word boundaries: off unless asked for
    duplex: Optional[Duplex] = None  # full-duplex conversations (moshi-finetune's layout): off unless asked for


class Thresholds(Section):
    min_dnsmos: Optional[float] = Field(None, ge=1, le=5)  # DNSMOS OVRL
    max_wer: Optional[float] = Field(None, ge=0)
    max_cer: Optional[float] = Field(None, ge=0)
    # synthesized speech: each turn's voice against its reference utterance (cosine of speaker embeddings)
    min_speaker_similarity: Optional[float] = Field(None, ge=-1, le=1)
    languages: Optional[list[str]] = None  # the languages kept (ISO 639-1): transcripts, and the audio when heard


class Quality(Thresholds):
    """Judges and gates: corpus utterances are scored (``speechinstruct score``) and those below a threshold never
    become records; the speech compose synthesises is judged the same way, with ``synthesized``'s thresholds
    (default: the same as the corpus's)."""
    dnsmos: Optional[bool] = None   # unset: on when a min_dnsmos gate asks for it (load_recipe says so)
    speaker: Optional[str] = None   # speaker encoder: resemblyzer, or an x-vector model; unset: resemblyzer when gated
    language: Optional[bool] = None  # language ID; unset: on when a languages gate asks for it
    asr: Optional[str] = None       # a transformers ASR folder or hub id, or a model name at base_url
    base_url: Optional[str] = None  # an OpenAI-compatible /audio/transcriptions server
    batch_size: Optional[int] = Field(None, ge=1)  # ASR clips per pass; unset: 64 on a GPU, 8 on the CPU
    asr_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on a GPU, else float32
    synthesized: Optional[Thresholds] = None


class Output(Section):
    dataset: Optional[str] = None   # relative paths are inside the workdir
    report: Optional[str] = None
    eval_splits: bool = True
    # resynthesised samples in the report: "auto" = the embedded preview for MFCC units, none for others;
    # "none"; or a unit HiFi-GAN (g_00500000 with config.json, or its folder)
    vocoder: str = "auto"


class Dedup(Section):
    """Repeats and evaluation data out of the training utterances (``speechinstruct dedup``), between quantize
    and compose, over every corpus together."""
    eval: list[str] = []            # evaluation sets: text/JSONL files, manifest or units folders, NAME=PATH corpora
    ngram: int = Field(4, ge=1)     # units per n-gram for MinHash
    num_perm: int = Field(128, ge=2)
    threshold: float = Field(0.2, gt=0, le=1)   # LSH's Jaccard threshold for candidates
    similarity: float = Field(0.7, gt=0, le=1)  # normalised Levenshtein similarity that makes a duplicate
    eval_ngram: int = Field(13, ge=1)           # words per n-gram against evaluation texts
    max_per_transcript: Optional[int] = Field(None, ge=1)
    speaker_disjoint: bool = False
    audio_hash: bool = False        # also compare the decoded 16 kHz samples (decodes every row)


class Ray(Section):
    """``extract`` and ``score`` on a Ray cluster (``--engine ray`` and its options; units/engine_ray.py): given,
    the run's extract and score stages use it; the other stages run in this process, the driver."""
    address: Optional[str] = None   # unset: a local Ray; auto or host:6379 (on a cluster node), ray://host:10001
    actors: int = Field(2, ge=1)    # model / judge actors, spread over the nodes
    num_gpus_per_actor: float = Field(0.0, ge=0)
    cpus_per_actor: float = Field(1.0, ge=0)
    max_retries: int = Field(3, ge=0)  # of a decode task whose worker died, restarts of a dead actor
    block_seconds: Optional[float] = Field(None, gt=0)  # audio per work block; unset: extract 4 x batch_seconds, score 600


class Recipe(Section):
    name: str = "SpeechInstruct"
    workdir: Optional[str] = None  # default: work/<recipe file name>
    demo_corpus: Optional[DemoCorpus] = None
    corpora: list[Corpus] = []
    shard: Shard = Shard()
    features: Features = Features()
    kmeans: KMeans = KMeans()
    templates: Templates = Templates()
    llm: Optional[LLM] = None
    compose: Compose = Compose()
    quality: Quality = Quality()
    dedup: Optional[Dedup] = None   # no dedup stage unless given
    ray: Optional[Ray] = None       # extract and score on a Ray cluster; unset: in this process
    output: Output = Output()

    @field_validator("corpora")
    @classmethod
    def _one_of_each(cls, corpora):
        names = [c.name for c in corpora]
        if len(set(names)) != len(names):
            raise ValueError(f"each corpus kind may appear once (got {names})")
        return corpora


MASKS = ("prefix", "prompt", "assistant", "none")  # train: where the loss is off (labels -100)


class Train(Section):
    """``speechinstruct train``'s settings: generic defaults; ``model.train.settings_for_stage(N)`` gives
    SpeechGPT's per stage (the packaged ``recipes/train-stage{N}.yaml``)."""

    epochs: Union[int, float] = Field(3, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    block_size: int = Field(1024, ge=1)   # stage 1 packing
    max_length: int = Field(512, ge=1)    # stages 2 and 3 (SpeechGPT: 512 and 1024)
    mask: str = "prefix"                  # labels -100 over: prefix (SpeechGPT), prompt (answer-only loss),
                                          # assistant (all but every [SpeechGPT] turn), none
    configs: Optional[list[str]] = None   # the dataset configs to train on (default: the stage's, CONFIG_FOR_STAGE)
    scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, ge=0)  # 0 or null: no clipping (as in Trainer)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: Optional[list[str]] = None  # default: what peft knows for the architecture (LLaMA: q_proj, v_proj)
    merge: bool = False                   # stage 3: also save base + adapter merged
    bf16: Optional[bool] = None           # default: on when a GPU supports it
    attention: str = "sdpa"               # the model's attention kernel: sdpa (torch's fused), eager, flash_attention_2
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30 % more time
    pack: bool = False                    # stages 2 and 3: examples end to end in rows of max_length (train.collate)
    seed: int = Field(0, ge=0, lt=2**32)  # what numpy and transformers' set_seed take
    save_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: Optional[int] = Field(None, ge=1)    # also evaluate on the validation split every N steps (always at the end)
    eval_batches: Optional[int] = Field(None, ge=1)  # at most this many validation batches per evaluation

    @field_validator("mask")
    @classmethod
    def _a_mask(cls, mask):
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
        return mask

    @field_validator("configs", mode="before")
    @classmethod
    def _configs(cls, configs):
        return [c.strip() for c in configs.split(",") if c.strip()] if isinstance(configs, str) else configs

    @classmethod
    def from_dict(cls, data: dict, where: str = "training settings") -> "Train":
        """Settings from a mapping (a YAML file, the CLI's options); one line naming the first wrong key."""
        unknown = set(data) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(cls.model_fields)}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            error = e.errors(include_url=False)[0]
            raise ValueError(f"{where}: {_where(error['loc'])} {data.get(error['loc'][0])!r}: "
                             f"{error['msg'].removeprefix('Value error, ')}") from None


def default(section: type[Section], name: str):
    """The default of setting ``name`` of a recipe ``section``, where it is declared once: the CLI's options and
    the stage functions' keyword defaults are read from here."""
    return section.model_fields[name].get_default(call_default_factory=True)


def checked(section: type[Section], **options) -> Section:
    """A command's ``options`` validated as the recipe validates ``section`` (ranges, choices): one line naming
    the option otherwise."""
    try:
        return section.model_validate(options)
    except ValidationError as e:
        error = e.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else "?"
        raise ValueError(f"--{name.replace('_', '-')} {options.get(name)!r}: {error['msg']}") from None


def _secrets(value, where: str = "") -> list[str]:
    """Key paths of the recipe that hold, or are named like, a secret."""
    found = []
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if SECRET_KEY.search(str(key)):
                found.append(f"{path}: looks like a secret; secrets never go in a recipe (set $OPENAI_API_KEY, or "
                             "$SPEECHINSTRUCT_API_KEY_FILE to a key file)")
            else:
                found += _secrets(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _secrets(item, f"{where}[{i}]")
    elif isinstance(value, str) and (SECRET_VALUE.search(value) or
                                     (os.environ.get("OPENAI_API_KEY") and os.environ["OPENAI_API_KEY"] in value)):
        found.append(f"{where}: holds what looks like an API key; secrets never go in a recipe")
    elif isinstance(value, str) and URL_CREDENTIALS.search(value):
        found.append(f"{where}: a URL that carries credentials (user:password@ or a key in its query); secrets never "
                     "go in a recipe")
    return found


def _expand(value, where: str, missing: set[str]):
    """``${VAR}`` from the environment, in every string."""
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", missing) for i, v in enumerate(value)]
    if isinstance(value, str):
        for var in re.findall(r"\$\{(\w+)\}", value):
            if var not in os.environ:
                missing.add(var)
        return os.path.expandvars(value)
    return value


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<recipe>"


def load_recipe(path: str | Path) -> dict:
    """The recipe at ``path`` with every default filled in, as plain dicts; RecipeError (one line per
    problem, each naming its key path) when anything is wrong."""
    path = Path(path)
    try:
        raw = read_yaml(path, "recipe") or {}
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    problems = _secrets(raw)
    if problems:  # checked before anything else, and the value never repeated
        raise RecipeError("\n".join(f"{path}: {p}" for p in problems))
    missing: set[str] = set()
    expanded = _expand(raw, "", missing)
    problems = _secrets(expanded)  # a ${VAR} that brought a key in
    try:
        recipe = Recipe.model_validate(expanded).model_dump()
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{_where((*err['loc'], *(err.get('ctx') or {}).get('key', ())))}: {message}")
        recipe = None
    said = []
    if recipe is not None and not missing and not problems:  # unset variables would show up again as missing folders
        said = _hub_ids(recipe)
        problems += _copy_urls(recipe) or _references(recipe)
    if missing:
        problems.append(f"set the environment variable(s) {', '.join('$' + m for m in sorted(missing))} "
                        "(your corpus folders / checkpoint) before running this recipe")
    if problems:
        raise RecipeError("\n".join(f"{path}: {p}" for p in problems))
    recipe["workdir"] = recipe["workdir"] or f"work/{path.stem}"
    recipe["inferred"] = said + _infer(recipe)
    return recipe


# the keys that name an input file or folder, beside corpora[].root: a URL (s3://, gs://, hf://) there is copied
# into the cache when the recipe is loaded, as the commands copy theirs (sources/storage.py), and read from there
URL_KEYS = (("features", "checkpoint"), ("kmeans", "path"), ("templates", "asr"), ("templates", "tts"),
            ("compose", "chain_of_modality", "instructions"), ("compose", "chain_of_modality", "tts_model"),
            ("compose", "dialogue", "conversations"), ("compose", "dialogue", "tts_model"),
            ("compose", "duplex", "conversations"), ("quality", "asr"), ("quality", "speaker"),
            ("options", "audio_root"), ("options", "asr"))  # the last two: each corpus's


def _copy_urls(recipe: dict) -> list[str]:
    """The URLs of ``URL_KEYS`` replaced by their copies' paths; one line, naming the key, for each that cannot be
    copied."""
    from .sources.storage import StorageError, local

    problems = []
    holders = [("", recipe)] + [(f"corpora[{i}].", c) for i, c in enumerate(recipe["corpora"])]
    for *path, key in URL_KEYS:
        for prefix, holder in (holders[1:] if path == ["options"] else holders[:1]):
            for part in path:
                holder = (holder or {}).get(part)
            value = (holder or {}).get(key)
            if isinstance(value, str) and is_url(value):
                try:
                    holder[key] = str(local(value))
                except StorageError as e:
                    problems.append(f"{prefix}{'.'.join((*path, key))}: {e}")
    return problems


def _hub_ids(recipe: dict) -> list[str]:
    """An hf corpus whose root is a hub id (``owner/name``, no such folder here), as ``shard hf`` takes one, or a
    dataset's page on the Hub's web site: read as the URL of its repo, ``hf://datasets/owner/name`` (only the
    config's split is fetched), or of the page's folder; each said in a line."""
    said = []
    for i, c in enumerate(recipe["corpora"]):
        root = c["root"]
        if c["name"] != "hf":
            continue
        from .sources.corpora.hf import hub_url

        if not is_url(root) and is_hub_id(root) and not Path(root).exists():
            c["root"] = f"hf://datasets/{root}"
            said.append(f"corpora[{i}].root: {c['root']} (the hub id {root}; no such folder here)")
        elif url := hub_url(root):
            c["root"] = url
            said.append(f"corpora[{i}].root: {url} (the Hub's web address {root})")
    return said


def _infer(recipe: dict) -> list[str]:
    """Settings a recipe leaves unset whose value its other settings make plain, filled in; each said in a line
    (``run`` prints them and keeps them in its summary). A min_dnsmos gate needs the DNSMOS judge: it is on; a
    speaker_threshold clusters speakers: speakers is on."""
    q, said = recipe["quality"], []
    for i, c in enumerate(recipe["corpora"]):
        options = c["options"]
        if options.get("speaker_threshold") is not None and options.get("speakers") is None:
            options["speakers"] = True
            said.append(f"corpora[{i}].options.speakers: true (corpora[{i}].options.speaker_threshold is set)")
    sections = (("quality", q), ("quality.synthesized", q["synthesized"] or {}))
    if q["dnsmos"] is None:
        gated = [where for where, gates in sections if gates.get("min_dnsmos") is not None]
        q["dnsmos"] = bool(gated)
        if gated:
            said.append(f"quality.dnsmos: true ({gated[0]}.min_dnsmos is set)")
    if q["speaker"] is None:
        gated = [where for where, gates in sections if gates.get("min_speaker_similarity") is not None]
        if gated:
            q["speaker"] = "resemblyzer"
            said.append(f"quality.speaker: resemblyzer ({gated[0]}.min_speaker_similarity is set)")
    if q["language"] is None:
        gated = [where for where, gates in sections if gates.get("languages")]
        q["language"] = bool(gated)
        if gated:
            said.append(f"quality.language: true ({gated[0]}.languages is set)")
    return said


def _references(recipe: dict) -> list[str]:
    """What the types cannot say: files that must exist, names that must refer to a corpus."""
    problems = []
    if not recipe["corpora"] and not recipe["demo_corpus"]:
        problems.append("corpora: no corpora and no demo_corpus")
    for i, c in enumerate(recipe["corpora"]):
        problem = None if is_url(c["root"]) else root_problem(c["name"], c["root"])  # a URL: checked as copied
        if problem:
            problems.append(f"corpora[{i}].root: {c['name']} root {c['root']!r} {problem}")
    f = recipe["features"]
    if f["kind"] in SSL_MODELS and not (f["checkpoint"] and Path(f["checkpoint"]).exists()):
        problems.append(f"features.checkpoint: {f['checkpoint']!r} does not exist (a fairseq .pt or HF folder)")
    if recipe["kmeans"]["path"] and not Path(recipe["kmeans"]["path"]).exists():
        problems.append(f"kmeans.path: {recipe['kmeans']['path']!r} does not exist")
    if recipe["ray"]:  # a device no actor can have: one line now, not after Ray started
        from .devices import actor_device

        try:
            actor_device(f["device"], recipe["ray"]["num_gpus_per_actor"], ("features.device", "ray.num_gpus_per_actor"))
        except ValueError as e:
            problems.append(str(e))
    names = [c["name"] for c in recipe["corpora"]] + (["speechinstruct-demo"] if recipe["demo_corpus"] else [])
    for section in ("cross_modal", "pretrain"):
        for name in recipe["compose"][section]["corpora"] or []:
            if name not in names:
                problems.append(f"compose.{section}.corpora: {name!r} is none of this recipe's corpora {names}")
    q = recipe["quality"]
    for where, gates in (("quality", q), ("quality.synthesized", q["synthesized"] or {})):
        if gates.get("min_dnsmos") is not None and q["dnsmos"] is False:  # unset: inferred (see _infer)
            problems.append(f"{where}.min_dnsmos: needs the DNSMOS judge, and quality.dnsmos is false")
        for key in ("max_wer", "max_cer"):
            if gates.get(key) is not None and not q["asr"]:
                problems.append(f"{where}.{key}: needs quality.asr (an ASR model, or a model name with base_url)")
    if q.get("min_speaker_similarity") is not None:
        problems.append("quality.min_speaker_similarity: applies to synthesized speech, each turn against its voice's "
                        "reference: put it under quality.synthesized")
    if q["base_url"] and not q["asr"]:
        problems.append("quality.base_url: needs quality.asr (the model name at that server, or openai)")
    for i, c in enumerate(recipe["corpora"]):
        if c["options"].get("speaker_threshold") is not None and c["options"].get("speakers") is False:
            problems.append(f"corpora[{i}].options.speaker_threshold: clusters speakers, and speakers is false")
    for name in ("chain_of_modality", "dialogue"):
        section = recipe["compose"][name]
        if section and (section["rewrite"] or section["tts"] == "openai") and not recipe["llm"]:
            problems.append(f"compose.{name}: rewrite / tts openai need an llm section (base_url, model)")
    return problems
