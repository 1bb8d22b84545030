"""An OpenAI-compatible chat client for template writing and speech-style rewriting.

Works with any endpoint that speaks the OpenAI API (OpenAI, vLLM, llama.cpp server, Ollama): ``base_url``
and ``model`` choose it; the key comes from the environment (``OPENAI_API_KEY`` by default) or from a
key file, never from recipes or the command line, and is never logged. The ``openai`` client does the
retrying (exponential backoff with jitter on 408/409/429/5xx, connection errors and timeouts); this
wrapper adds a per-run request budget and an on-disk cache keyed by the request's content, so a rerun
never pays twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .io import read_text, sha256_json, write_json


class LLMError(RuntimeError):
    pass


class BudgetExceeded(LLMError):
    pass


class TruncatedAnswer(LLMError):
    """The answer stopped at ``max_tokens`` (``finish_reason: length``): it is not a complete answer."""


# a URL that carries a secret: ``http://user:sk-…@host/v1`` or ``…/v1?api_key=…``
URL_CREDENTIALS = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\s]*@|[?&;](?:api[_-]?key|key|token|access_token|secret|"
                             r"password|sig|signature)=", re.IGNORECASE)


def check_endpoint(url: str | None, option: str = "base_url") -> None:
    """Refuse an endpoint URL that carries credentials: it is recorded (score.json, summaries, stdout) as where the
    work was done, and a secret must never reach a file. One line that does not echo the URL."""
    if url and URL_CREDENTIALS.search(url):
        raise LLMError(f"{option}: the URL carries credentials (user:password@ or a key in its query); they would be "
                       "written into the outputs: give the URL without them and the key in $OPENAI_API_KEY "
                       "(or $SPEECHINSTRUCT_API_KEY_FILE)")


def api_key(env: str = "OPENAI_API_KEY", key_file: str | Path | None = None) -> str | None:
    """The API key from ``$env``, else from ``key_file`` (or ``$SPEECHINSTRUCT_API_KEY_FILE``)."""
    if os.environ.get(env):
        return os.environ[env]
    key_file = key_file or os.environ.get("SPEECHINSTRUCT_API_KEY_FILE")
    if key_file and Path(key_file).is_file():
        return read_text(key_file).strip() or None
    return None


class LLM:
    def __init__(self, base_url: str | None = None, model: str = "gpt-4o-mini", api_key_env: str = "OPENAI_API_KEY",
                 cache_dir: str | Path | None = None, max_requests: int | None = None, max_retries: int = 4,
                 timeout: float = 60.0, temperature: float = 0.7, max_tokens: int | None = 2048):
        from openai import OpenAI

        check_endpoint(base_url, "--base-url")
        key = api_key(api_key_env)
        if key is None and base_url is None:
            raise LLMError(f"no LLM endpoint: set ${api_key_env} for OpenAI, or pass --base-url for a local server")
        # Local servers (vLLM, llama.cpp, Ollama) accept any key.
        self.client = OpenAI(base_url=base_url, api_key=key or "not-needed", max_retries=max_retries, timeout=timeout)
        self._key = key
        self.base_url, self.model, self.temperature, self.max_tokens = base_url, model, temperature, max_tokens
        self.cache = Path(cache_dir) if cache_dir else None
        self.max_requests = max_requests
        self.requests = 0

    def describe(self) -> dict:
        """What to record as provenance: endpoint and model, never the key."""
        return {"base_url": self.base_url or "https://api.openai.com/v1", "model": self.model}

    def charge(self) -> None:
        """Count one request against ``max_requests`` (chat and speech requests share the budget)."""
        if self.max_requests is not None and self.requests >= self.max_requests:
            raise BudgetExceeded(f"request budget of {self.max_requests} used up (--max-requests)")
        self.requests += 1

    def complete(self, messages: list[dict], **params) -> str:
        import openai

        request = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   **({"max_tokens": self.max_tokens} if self.max_tokens else {}), **params}
        key = sha256_json({**request, "base_url": self.base_url})
        path = self.cache / key[:2] / f"{key}.json" if self.cache else None
        if path and path.is_file():
            cached = json.loads(path.read_text())
            return self._checked(cached["content"], cached.get("finish_reason"))
        self.charge()
        try:
            response = self.client.chat.completions.create(**request)
        except openai.APIError as e:
            raise LLMError(f"LLM request to {self.describe()['base_url']} failed: {type(e).__name__}: {_scrub(str(e), self._key)}") from None
        content = (response.choices[0].message.content or "") if response.choices else ""
        finish = response.choices[0].finish_reason if response.choices else None
        if path:  # cut-off answers are cached too: a rerun fails them the same way without paying again
            write_json(path, {"request": request, "content": content, "finish_reason": finish})
        return self._checked(content, finish)

    def _checked(self, content: str, finish_reason: str | None) -> str:
        if finish_reason == "length":
            raise TruncatedAnswer(f"answer cut off at max_tokens={self.max_tokens} (finish_reason: length)")
        return content


def _scrub(message: str, key: str | None) -> str:
    """Remove the API key, and anything shaped like one, from an error message."""
    import re

    if key:
        message = message.replace(key, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-]{8,}", "sk-***", message)
