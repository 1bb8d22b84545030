"""One face for every speech tokenizer, textlesslib's, and one loader that builds it.

K-means units (``units.kmeans.SpeechEncoder``: a dense model, MFCC or an SSL layer, then a quantizer, then repeats
merged) and codecs (``codecs.Codec``, whose codes are the units, every frame kept) both have

- ``sample_rate`` (what ``encode`` reads) and ``frame_rate`` (units per second, before repeats are merged),
- ``codebooks`` (units per frame: 1 for k-means, a codec's kept codebooks),
- ``encode(wav, sample_rate) -> Encoded(units, durations, n_frames)``; ``np.repeat(units, durations)`` is
  one unit per frame again,
- ``vocabulary()`` (the record a units folder and a dataset keep) and ``describe()`` (what a compose summary
  says made the units),
- ``decode(units) -> wav`` where they can: a codec decodes its own units; k-means units need a vocoder.

:func:`load_tokenizer` turns a command's or a recipe's options into one of them and refuses what does not fit
(``--kmeans`` with a codec, features without ``--kmeans`` where units are needed); no other module asks which
kind of tokenizer it holds.
"""

from __future__ import annotations

from pathlib import Path

from .kmeans import KMeans, SpeechEncoder, load_kmeans


def load_tokenizer(kind: str, checkpoint: str | None = None, layer: int | None = None, device: str = "cpu",
                   dtype: str = "float32", codebooks: int | None = None, kmeans: KMeans | str | Path | None = None,
                   features_only: bool = False):
    """The tokenizer ``kind`` names (``tokenizers.FEATURES``): a codec, or the dense model and ``kmeans`` (a
    k-means or its path) as a :class:`~speechinstruct.units.SpeechEncoder`. ``features_only``: a dense model
    without k-means is wanted too (``extract`` writes its features)."""
    model = load_extractor(kind, checkpoint, layer, device, dtype=dtype, codebooks=codebooks)
    if is_tokenizer(model):  # a codec: its codes are the units
        if kmeans is not None:
            raise ValueError(f"--kmeans is for features; a {kind} codec's codes are already units")
        return model
    if kmeans is None:
        if features_only:
            return model
        raise ValueError(f"--kmeans is needed with --features {kind}: the k-means that makes its units")
    return SpeechEncoder(kmeans if isinstance(kmeans, KMeans) else load_kmeans(kmeans), model)


def is_tokenizer(model) -> bool:
    """Whether ``model`` makes units (a tokenizer: it has a vocabulary) rather than features (a dense model)."""
    return callable(getattr(model, "vocabulary", None))


def dense_and_kmeans(model, kmeans=None):
    """(the model that computes frames, the k-means that assigns them or None): a k-means tokenizer in its two
    parts, for the batched paths (extract, the Ray engine) that compute features for many utterances at once."""
    if isinstance(model, SpeechEncoder):
        if kmeans is not None and kmeans is not model.kmeans:
            raise ValueError("two k-means given: the tokenizer's and --kmeans")
        return model.extractor, model.kmeans
    return model, kmeans


def load_extractor(kind: str, checkpoint: str | None = None, layer: int | None = None, device: str = "cpu",
                   dtype: str = "float32", codebooks: int | None = None):
    """MFCC, HuBERT at a layer, or a codec (``codecs.CODECS``: its codes are the units, ``codebooks`` of them)."""
    from .codecs import CODECS, load_codec
    from ..tokenizers import SSL_MODELS
    from .features import DTYPES, MFCC, load_hubert

    if kind in CODECS:
        if layer is not None or dtype != "float32":
            raise ValueError(f"--layer and --dtype are for HuBERT; a {kind} codec gives its codes")
        return load_codec(kind, checkpoint, codebooks, device)
    if codebooks is not None:
        raise ValueError(f"--codebooks is for codecs ({', '.join(CODECS)})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose {' or '.join(DTYPES)}")
    if kind == "mfcc":
        if dtype != "float32":
            raise ValueError("--dtype bfloat16 is for HuBERT; MFCC is computed in float32")
        return MFCC()
    if kind in SSL_MODELS:
        if not checkpoint:
            raise ValueError(f"--features {kind} needs --checkpoint (a Hugging Face folder"
                             + (" or a fairseq .pt)" if kind == "hubert" else ")"))
        return load_hubert(checkpoint, layer, device=device, dtype=dtype, kind=kind)
    raise ValueError(f"unknown features {kind!r}: choose mfcc, {', '.join(SSL_MODELS)} or a codec ({', '.join(CODECS)})")
