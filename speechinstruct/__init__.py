"""speechinstruct: build SpeechInstruct-style cross-modal speech-instruction datasets (SpeechGPT)."""

__version__ = "0.2.0"
