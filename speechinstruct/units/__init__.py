"""Speech as discrete units: dense features (MFCC, SSL layers), codecs, k-means (``cluster``, ``quantize``), the one
tokenizer face (``tokenizer``), ``extract`` on one machine or a Ray cluster, and units back to speech (``vocoder``).

``from speechinstruct.units import KMeans, load_kmeans, SpeechEncoder, to_text`` keeps working (the flat package's path): the k-means
quantizer lives in ``units.kmeans`` and SpeechGPT's unit string in ``speechgpt``.
"""

from ..speechgpt import UNIT_RE, from_text, to_text  # noqa: F401 (re-exported)
from .kmeans import Encoded, KMeans, SpeechEncoder, dedup, load_kmeans, nearest_centroids  # noqa: F401 (re-exported)
