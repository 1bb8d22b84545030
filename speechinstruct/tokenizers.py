"""The speech tokenizers ``extract`` knows, by name, in one place. This module imports nothing, so the CLI's
``--features`` choices and the recipe's ``features.kind`` are built from it without loading torch."""

# self-supervised encoders read at a layer, then clustered (units/features.py): kind → transformers class
SSL_MODELS = {"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model", "wavlm": "WavLMModel",
              "data2vec-audio": "Data2VecAudioModel"}
# codecs whose codes are the units, no k-means (units/codecs.py): kind → transformers class
CODECS = {"mimi": "MimiModel", "encodec": "EncodecModel", "dac": "DacModel", "xcodec": "XcodecModel",
          "xcodec2": "Xcodec2Model"}
# every --features choice, the offline default first
FEATURES = ("mfcc", *SSL_MODELS, *CODECS)
