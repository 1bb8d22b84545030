"""An OpenAI-compatible transcription server on loopback for tests: real HTTP, real multipart uploads, the real
``openai`` client on the other end. ``answer(samples, request)`` gives the transcript (a str, sent as
``{"text": ...}``), raw bytes (sent as they are: garbage), an int (that HTTP status) or (status, headers)
(``Retry-After`` and the like)."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
from http.server import BaseHTTPRequestHandler

import soundfile as sf

from openai_server import Loopback


class TranscriptionServer(Loopback):
    def __init__(self, answer):
        self.answer, self.requests = answer, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if not self.path.endswith("/audio/transcriptions"):
                    self.send_response(404)
                    self.end_headers()
                    return
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"content-type: " + self.headers["content-type"].encode() + b"\r\n\r\n" + body)
                fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                          for part in message.iter_parts()}
                samples, sr = sf.read(io.BytesIO(fields["file"]), dtype="float32")
                request = {"model": fields["model"].decode(), "sample_rate": sr,
                           "response_format": fields.get("response_format", b"").decode()}
                server.requests.append(request)
                reply = server.answer(samples, request)
                headers = {}
                if isinstance(reply, tuple):
                    reply, headers = reply
                if isinstance(reply, int):
                    self.send_response(reply)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"error": {"message": "no", "code": reply}}).encode())
                    return
                data = reply if isinstance(reply, bytes) else json.dumps({"text": reply}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.serve(Handler)
