"""Models trained on the dataset: ``train`` (SpeechGPT's three stages) and ``chat``.
"""
