"""Tiny random ASR models written as transformers folders, as a user's checkpoint would be: a Whisper
(sequence-to-sequence, byte-level BPE tokenizer, Whisper's special tokens) and a wav2vec2 CTC model (character
vocabulary). Random weights: what they hear is noise, but they load, batch and decode through the real code."""

from __future__ import annotations

import json
from pathlib import Path

WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def write_tiny_whisper(folder: Path, seed: int = 0, d_model: int = 32, layers: int = 1) -> Path:
    """(``d_model``, ``layers``: a larger random Whisper for the benchmarks; whisper-tiny is 384 and 4.)"""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizerFast)

    folder = Path(folder)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), unk_token="<|endoftext|>",
                                     bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in WHISPER_SPECIALS}
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
                           decoder_ffn_dim=2 * d_model,
                           num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"],
                           eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], no_timestamps_token_id=ids["<|notimestamps|>"],
        forced_decoder_ids=[[1, ids["<|en|>"]], [2, ids["<|transcribe|>"]], [3, ids["<|notimestamps|>"]]],
        lang_to_id={"<|en|>": ids["<|en|>"]}, task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True)
    model.save_pretrained(folder)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(folder)
    return folder


def write_tiny_ctc(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list("abcdefghijklmnopqrstuvwxyz'")
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    config = Wav2Vec2Config(vocab_size=len(chars), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                            do_stable_layer_norm=True, pad_token_id=0, ctc_loss_reduction="mean")
    torch.manual_seed(seed)
    Wav2Vec2ForCTC(config).eval().save_pretrained(folder)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_tiny_parakeet_ctc(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 1, device: str = "cpu") -> Path:
    """A Parakeet CTC model (FastConformer encoder, 8x subsampled log-mel frames) written as transformers'
    ``convert_nemo_to_hf.py`` writes NVIDIA's checkpoints: a SentencePiece model as NeMo trains one (unigram,
    ``<unk>`` first, no BOS/EOS/pad) converted by ``ParakeetConverter``, ``<pad>`` added after it as the CTC blank,
    and a processor with ``decoder_type="ctc"``. ``hidden``/``layers``: 1024 and 24 are parakeet-ctc-0.6b's shape;
    ``device``: where the random weights are drawn."""
    import sentencepiece as spm
    import torch
    from tokenizers import AddedToken
    from transformers import (ParakeetCTCConfig, ParakeetEncoderConfig, ParakeetFeatureExtractor, ParakeetForCTC,
                              ParakeetProcessor, ParakeetTokenizer)
    from transformers.convert_slow_tokenizer import ParakeetConverter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = ["the old sailor walked to the red house", "a cat sat on a mat by the sea",
              "please read this text aloud", "what is the weather like today"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(folder / "spm"), vocab_size=40,
                                   model_type="unigram", unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                                   character_coverage=1.0, minloglevel=3)
    tokenizer = ParakeetTokenizer(tokenizer_object=ParakeetConverter(str(folder / "spm.model")).converted(),
                                  clean_up_tokenization_spaces=False)
    if tokenizer.convert_tokens_to_ids("<pad>") is None:  # a CTC vocabulary has none: the blank goes last
        tokenizer.add_tokens([AddedToken("<pad>", normalized=False, special=True)])
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", normalized=False, special=True),
                                  "unk_token": AddedToken("<unk>", normalized=False, special=True)})
    (folder / "spm.model").unlink()
    (folder / "spm.vocab").unlink()
    encoder = ParakeetEncoderConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2 if hidden < 256 else 8,
                                    intermediate_size=4 * hidden, subsampling_conv_channels=min(256, hidden),
                                    conv_kernel_size=9, num_mel_bins=80)
    config = ParakeetCTCConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               encoder_config=encoder.to_dict())
    torch.manual_seed(seed)
    with torch.device(device):  # a benchmark draws a 0.6B model's random weights on its GPU: much faster
        ParakeetForCTC(config).eval().save_pretrained(folder)
    ParakeetProcessor(feature_extractor=ParakeetFeatureExtractor(), tokenizer=tokenizer, decoder_type="ctc").save_pretrained(folder)
    return folder
