"""The record kinds a dataset is made of, in one registry (as ``corpora.SOURCES`` is for sources).

Each kind is a config of the published dataset, a ``schemas/{name}.json`` and a folder of the compose output. What
other modules list per kind is derived from here: the record kinds ``records`` knows, the configs ``publish``
writes and the card counts, the kinds ``validate`` checks, the compose summaries that name the units folders they
read, the report's samples and quality histograms, and the compose stages ``run`` publishes. A kind's code is one
module, ``compose/{name}.py``: its composer (a function named for the kind, writing ``{split}-*.parquet`` files into
``composed/{name}``) and, for what its schema cannot say, ``record_errors(record, k)``, which ``validate`` applies.
Adding a kind: its schema, an entry here, its module, and its CLI command, recipe section and ``run`` stage (the
README walks through one).

No imports: every module may read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordKind:
    name: str
    use: str                         # what it trains, for the dataset card
    counted_by: str | None = None    # the column the card counts its records by (task, format, turns)
    sampled_by: str | None = None    # the report shows one record per value of this column (None: one record)
    from_units: bool = False         # made from units folders, which its compose summaries name
    gated: bool = False              # carries the quality columns of corpus scores (the report's histograms)


RECORD_KINDS: dict[str, RecordKind] = {k.name: k for k in (
    RecordKind("cross_modal", "stage 2 (ASR and TTS instructions)", counted_by="task", sampled_by="task",
               from_units=True, gated=True),
    RecordKind("chain_of_modality", "stage 3 (spoken dialogue)", counted_by="format", sampled_by="format", gated=True),
    RecordKind("dialogue", "multi-turn spoken dialogue", counted_by="turns", sampled_by="turns"),
    RecordKind("interleaved", "stage-1-style pretraining with text and speech switching at word boundaries",
               from_units=True),
    RecordKind("pretrain", "stage 1 (unit language modelling)", from_units=True, gated=True),
    RecordKind("duplex", "full-duplex (Moshi-style) models: both channels' units with per-frame text streams"),
)}
