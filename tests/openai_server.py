"""A scripted OpenAI-compatible server on loopback for tests: real HTTP, real ``openai`` client."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Loopback:
    """A threaded HTTP server on 127.0.0.1 (a free port) for ``Handler``; ``url`` ends in /v1; a context manager."""

    def serve(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeOpenAI(Loopback):
    """Answers /v1/audio/speech with ``speech(request)`` (bytes sent with 200, or an int: that HTTP status) and
    /v1/chat/completions from a script: each entry is ("ok", content), ("status", code), ("sleep", seconds,
    content) or ("length", content) (an answer cut off at max_tokens: finish_reason "length"). After the
    script runs out, ``default`` (a function of the request) answers."""

    def __init__(self, script=None, default=None, speech=None):
        self.script = list(script or [])
        self.speech = speech or (lambda request: b"")
        self.default = default or (lambda request: "[]")
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if self.path.endswith("/audio/speech"):
                    data = server.speech(body)
                    if isinstance(data, int):
                        self.send_response(data)
                        self.send_header("content-type", "application/json")
                        self.end_headers()
                        self.wfile.write(json.dumps({"error": {"message": "File Not Found", "code": data}}).encode())
                        return
                    self.send_response(200)
                    self.send_header("content-type", "audio/wav")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                step = server.script.pop(0) if server.script else ("ok", server.default(body))
                if step[0] == "status":
                    self.send_response(step[1])
                    self.send_header("content-type", "application/json")
                    self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode())
                    return
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = ("ok", step[2])
                finish = "length" if step[0] == "length" else "stop"
                payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                           "choices": [{"index": 0, "finish_reason": finish,
                                        "message": {"role": "assistant", "content": step[1]}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.serve(Handler)
