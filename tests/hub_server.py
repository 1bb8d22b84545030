"""A loopback stand-in for the parts of the Hugging Face Hub API that ``huggingface_hub`` calls to validate a
card, create a dataset repo and commit files to it (``/api/validate-yaml``, ``/api/repos/create``,
``/api/datasets/{repo}/preupload/{rev}``, ``/api/datasets/{repo}/commit/{rev}``). Every file is answered
"regular" (inline in the commit, no LFS), so the commit body holds each uploaded file, which the tests read."""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hub:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.repos: set[str] = set()
        self.files: dict[str, dict[str, bytes]] = {}
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _json(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                path = self.path.split("?")[0]
                hub.calls.append(("POST", path))
                body = self._body()
                if path == "/api/validate-yaml":
                    hub.validated.append(json.loads(body))
                    return self._json(200, {})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    if repo in hub.repos:
                        return self._json(409, {"error": "You already created this dataset repo", "url": f"{hub.url}/datasets/{repo}"})
                    hub.repos.add(repo)
                    hub.files[repo] = {}
                    return self._json(200, {"url": f"{hub.url}/datasets/{repo}"})
                m = re.fullmatch(r"/api/datasets/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit)/(?P<rev>[^/]+)", path)
                if m and m["repo"] in hub.repos:
                    if m["op"] == "preupload":
                        files = json.loads(body)["files"]
                        return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                          for f in files], "commitOid": "0" * 40})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            hub.files[m["repo"]][value["path"]] = base64.b64decode(value["content"])
                    return self._json(200, {"commitUrl": f"{hub.url}/datasets/{m['repo']}/commit/{'1' * 40}",
                                            "commitOid": "1" * 40, "success": True})
                return self._json(404, {"error": f"no route {path}"})

            def do_GET(self):
                path = self.path.split("?")[0]
                hub.calls.append(("GET", path))
                return self._json(404, {"error": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
