"""Where speech comes from (``shard``): corpora in their native layouts, object storage, raw recordings cut by VAD,
synthesized speech (TTS, the demo corpus), word alignments, and the audio of a manifest row wherever it lies.
"""
