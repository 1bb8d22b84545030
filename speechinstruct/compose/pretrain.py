"""``speechinstruct compose pretrain``: one ``<sosp>…<eosp>`` line per utterance (SpeechGPT's stage 1). Records
keep the split of their audio; ``dev_fraction`` of the train utterances (by a hash of the id) also go to
``validation``, since LibriLight, stage 1's corpus, has no dev set.
"""

from __future__ import annotations

import collections
from pathlib import Path

from .. import recipe as settings
from ..io import write_json
from ..recipe import default
from ..sources.corpora.base import SPLITS, split_name
from .common import QualityGate, _draw, finish, gated_units, scores_entry, split_counts


def pretrain(units_dir: str | Path, out: str | Path, cfg: settings.Pretrain | None = None,
             seed: int = default(settings.Compose, "seed"), part: str | None = None,
             num_shards: int = 1, shard_index: int = 0, scores: str | Path | None = None, gates=None) -> dict:
    """Stage-1 unit text, one record per utterance, in the split of its audio; ``cfg.dev_fraction`` of the train
    utterances (by a hash of the id) go to validation too (``cfg``: the recipe's ``compose.pretrain``, its
    defaults when None). ``scores``, ``gates``: as for ``compose.cross_modal``."""
    dev_fraction = (cfg or settings.Pretrain()).dev_fraction
    out = Path(out)
    counts: collections.Counter[str] = collections.Counter()
    dropped: list[dict] = []
    for sinks, u, judged in gated_units(Path(units_dir), out, part, "pretrain", QualityGate(scores, gates), counts,
                                        dropped, num_shards, shard_index, {"dev_fraction": dev_fraction, "seed": seed}):
        split = split_name(u["split"])
        if split == "train" and _draw(seed, "split", u["id"]) / 2**64 < dev_fraction:
            split = "validation"
        sinks[split].add(finish({"id": u["id"], "text": u["unit_text"], "units": u["units"],
                                 "source_id": u["id"], "corpus": u["corpus"], "license": u["license"], **judged}))
    counts.update(split_counts(out, part))
    summary = {**{s: counts[s] for s in SPLITS}, **{k: v for k, v in sorted(counts.items()) if k.startswith("dropped")},
               "units": str(Path(units_dir).resolve()), **scores_entry(scores),
               "dropped_examples": dropped[:200]}
    write_json(out / f"summary{'-' + part if part else ''}.json", summary)
    return summary
