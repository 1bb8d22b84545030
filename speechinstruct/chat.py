"""``speechinstruct chat``: talk to a trained model with text or an audio file.

Audio becomes units with the same extractor and k-means as the training data; the prompt is SpeechGPT's
``{prefix}[Human]: {input}<eoh> [SpeechGPT]:``; the answer is printed as text plus its unit strings.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .compose import DEFAULT_PREFIX
from .units import dedup, to_text

UNIT_SPAN = re.compile(r"<sosp>(?:<\d+>)*(?:<eosp>|$)")


class Chat:
    def __init__(self, model_dir: str | Path, lora: str | Path | None = None, device: str = "cpu", prefix: str = DEFAULT_PREFIX):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = Path(lora) if lora else Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=source.is_dir())
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=Path(model_dir).is_dir())
        if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        if lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(lora))
        self.model = model.eval().to(device)
        self.device, self.prefix = device, prefix

    def prompt(self, user_input: str) -> str:
        return f"{self.prefix}[Human]: {user_input}<eoh> [SpeechGPT]:"

    @torch.inference_mode()
    def reply(self, user_input: str, max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 0.8) -> dict:
        ids = self.tokenizer(self.prompt(user_input), return_tensors="pt").to(self.device)
        eoa = self.tokenizer.convert_tokens_to_ids("<eoa>")
        output = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                     eos_token_id=[t for t in (eoa, self.tokenizer.eos_token_id) if t is not None],
                                     pad_token_id=self.tokenizer.pad_token_id)
        text = self.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        text = text.split("<eoa>")[0]
        units = UNIT_SPAN.findall(text)
        return {"text": UNIT_SPAN.sub("", text).strip(), "units": units, "raw": text}


def audio_to_unit_text(path: str | Path, extractor, kmeans) -> str:
    from . import audio

    wav = audio.load(path)
    units, _ = dedup(kmeans.assign(extractor.features(wav)))
    return to_text(units)
