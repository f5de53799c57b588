"""A small, real HTTP server that answers the Hub endpoints huggingface_hub uses for downloads:
repo info, the recursive tree listing, and HEAD/GET on resolve/ with ETag, X-Repo-Commit and Range.
It serves files a test made; it can cut one transfer mid-file to exercise resume."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        return rev if rev in self.commits else self.refs.get(rev)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.cut_after: dict[str, int] = {}  # filename -> bytes sent before the first transfer is cut
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body=b"", headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj, headers=None):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _error(self, code, error_code, message):
                self._send(code, json.dumps({"error": message}).encode(),
                           {"Content-Type": "application/json", "X-Error-Code": error_code, "X-Error-Message": message})

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.log.append({"method": self.command, "path": path, "range": self.headers.get("Range"),
                                "auth": self.headers.get("Authorization")})
                m = re.fullmatch(r"/api/models/(.+?)/(revision|tree)/([^/]+)(/.*)?", path)
                if m:
                    return self._api(m.group(1), m.group(2), m.group(3))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)", path)
                if m:
                    return self._api(m.group(1), "revision", "main")
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._resolve(*m.groups())
                self._error(404, "EntryNotFound", f"no route {path}")

            def _commit(self, repo_id, rev):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    return None, None
                sha = repo.resolve(rev)
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                    return None, None
                return sha, repo.commits[sha]

            def _api(self, repo_id, kind, rev):
                sha, files = self._commit(repo_id, rev)
                if sha is None:
                    return
                if kind == "revision":
                    return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                       "siblings": [{"rfilename": f} for f in files]})
                tree = []
                for name, data in files.items():
                    entry = {"type": "file", "path": name, "size": len(data),
                             "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                    if name.endswith(".safetensors"):
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                    tree.append(entry)
                self._json(tree)

            def _resolve(self, repo_id, rev, filename):
                sha, files = self._commit(repo_id, rev)
                if sha is None:
                    return
                if filename not in files:
                    return self._error(404, "EntryNotFound", f"{filename} not in {repo_id}")
                data = files[filename]
                etag = hashlib.sha256(data).hexdigest() if filename.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
                headers = {"ETag": f'"{etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                body = data[start:]
                code = 206 if rng else 200
                if rng:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                cut = hub.cut_after.pop(filename, None) if self.command == "GET" else None
                if cut is None:
                    return self._send(code, body, headers)
                self.send_response(code)  # announce the whole body, send part of it, drop the connection
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

        return Handler
