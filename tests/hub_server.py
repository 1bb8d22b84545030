"""A loopback stand-in for the parts of the Hugging Face Hub API that ``huggingface_hub`` calls to validate a
card, create a dataset repo and commit files to it (``/api/validate-yaml``, ``/api/repos/create``,
``/api/datasets/{repo}/preupload/{rev}``, ``/api/datasets/{repo}/commit/{rev}``), and those ``HfFileSystem``
(``hf://`` URLs) calls to list and download a repo's files (``revision``, ``tree``, ``paths-info``, ``/resolve/``).
Every file is answered "regular" (inline in the commit, no LFS), so the commit body holds each uploaded file,
which the tests read; ``files[repo]`` is what the read side serves."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


COMMIT = "1" * 40  # the main branch of every repo


def commit_of(revision: str) -> str:
    """The commit a revision names: a commit itself, main's, or another branch's (the Hub answers a branch's name
    with its commit)."""
    if revision == "main" or re.fullmatch(r"[0-9a-f]{40}", revision):
        return COMMIT if revision == "main" else revision
    return hashlib.sha1(revision.encode()).hexdigest()


def blob_id(data: bytes) -> str:
    """A file's git blob id, as the Hub names a (non-LFS) file's version."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """The Hub's tree entries under ``prefix``: folders, then files (type, oid, size, path)."""
    folders, entries = set(), []
    for name in sorted(files):
        if prefix and not name.startswith(prefix + "/"):
            continue
        parts = name[len(prefix) + 1:].split("/") if prefix else name.split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.add("/".join([prefix, *parts[:depth]] if prefix else parts[:depth]))
        if recursive or len(parts) == 1:
            entries.append({"type": "file", "oid": blob_id(files[name]), "size": len(files[name]), "path": name})
    return [{"type": "directory", "oid": "0" * 40, "path": f} for f in sorted(folders)] + entries


class Hub:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.repos: set[str] = set()
        self.files: dict[str, dict[str, bytes]] = {}  # the main branch
        self.branches: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo, branch): another branch's files
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
                m = re.fullmatch(r"/api/datasets/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", path)
                if m:  # huggingface_hub sends the paths form-encoded, one `paths` field each
                    files = hub.files.get(m["repo"])
                    if files is None:
                        return self._missing("RepoNotFound", "Repository not found")
                    wanted = set(urllib.parse.parse_qs(body.decode()).get("paths", []))
                    return self._json(200, [e for e in _tree(files, "", True) if e["path"] in wanted])
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
                self._read(head=False)

            def do_HEAD(self):
                self._read(head=True)

            def _missing(self, code: str, message: str):
                data = json.dumps({"error": message}).encode()
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read(self, head: bool):
                """The Hub's read API as huggingface_hub's HfFileSystem calls it: repo info, the tree (paged, here
                one page), paths-info, and /resolve/ for the bytes (with the ETag and X-Repo-Commit it sends)."""
                path, _, query = self.path.partition("?")
                hub.calls.append((self.command, path))
                params = urllib.parse.parse_qs(query)
                m = re.fullmatch(r"/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?", path)
                if m:
                    revision = urllib.parse.unquote(m["rev"] or "main")
                    files = hub.at(m["repo"], revision)
                    if files is None:
                        return self._missing("RepoNotFound", "Repository not found")
                    if m["op"] in (None, "revision"):  # repo info, at the main branch or a revision
                        return self._json(200, {"id": m["repo"], "sha": commit_of(revision), "private": False,
                                                "siblings": [{"rfilename": name} for name in sorted(files)]})
                    prefix = urllib.parse.unquote(m["sub"] or "").strip("/")
                    recursive = params.get("recursive", ["False"])[0].lower() == "true"
                    return self._json(200, _tree(files, prefix, recursive))
                m = re.fullmatch(r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
                if m:
                    name = urllib.parse.unquote(m["file"])
                    revision = urllib.parse.unquote(m["rev"])
                    data = (hub.at(m["repo"], revision) or {}).get(name)
                    if data is None:
                        return self._missing("EntryNotFound", f"{name} does not exist")
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{blob_id(data)}"')
                    self.send_header("X-Repo-Commit", commit_of(revision))
                    self.end_headers()
                    if not head:
                        self.wfile.write(data)
                    return
                return self._json(404, {"error": f"no route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve_huggingface_hub(self, monkeypatch, cache=None) -> None:
        """huggingface_hub talks to this Hub: its endpoint constants as ``HF_ENDPOINT`` sets them, and online (the
        suite runs with ``HF_HUB_OFFLINE=1``, scripts/test.sh; the constant is read at each request); its cache of
        downloads in ``cache`` when given."""
        import huggingface_hub.constants

        if cache is not None:
            monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", self.url)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            self.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def add_repo(self, repo: str, folder, under: str = "", branch: str = "main") -> None:
        """Serve every file under ``folder`` as the repo ``repo``'s (below ``under`` in it), on its main branch or
        on ``branch``."""
        from pathlib import Path

        files = {f"{under}{p.relative_to(folder).as_posix()}": p.read_bytes()
                 for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        if branch == "main":
            self.files[repo] = files
        else:
            self.files.setdefault(repo, {})
            self.branches[(repo, branch)] = files

    def at(self, repo: str, revision: str) -> dict[str, bytes] | None:
        """The files of ``repo`` at ``revision`` (a branch's name or commit), or None."""
        if commit_of(revision) == COMMIT:
            return self.files.get(repo)
        return next((files for (name, branch), files in self.branches.items()
                     if name == repo and revision in (branch, commit_of(branch))), None)

    def fetched(self) -> list[str]:
        """The repo paths of the files downloaded so far (``/resolve/`` GETs), sorted."""
        return sorted(urllib.parse.unquote(path.split("/resolve/", 1)[1].split("/", 1)[1]) for method, path in self.calls
                      if method == "GET" and "/resolve/" in path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
