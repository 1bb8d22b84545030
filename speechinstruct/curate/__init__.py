"""Which utterances a dataset keeps: ``score`` (the judges over a corpus) and ``dedup`` (repeats and evaluation data).
"""
