"""The models that judge speech, used by any stage without importing another stage: DNSMOS, ASR, speaker
embeddings, language ID, and the recipe's gates over their scores.
"""


class ScoreError(ValueError):
    """A judge that cannot work at all (a model folder that is no ASR model, a server that is down)."""
