"""A small, real HTTP server that answers the Hub endpoints huggingface_hub uses for downloads:
repo info, the recursive tree listing, and HEAD/GET on resolve/ with ETag, X-Repo-Commit and Range.
It serves files a test made; it can cut one transfer mid-file to exercise resume.

And those it uses for uploads (HfApi.create_repo, create_branch, create_commit): POST /api/repos/create, the branch
endpoint, /api/validate-yaml, preupload (which files go to LFS), the LFS batch API and a PUT per LFS object, and the
ndjson commit. Writes need a token of `writers` for the repo's owner (401 without one, 403 with another); a test can
fail the next commits (`fail_commits`) to exercise a push that stopped after its uploads."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, private: bool = False):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}
        self.private = private
        self.messages: list[str] = []   # commit summaries, oldest first

    def add_commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        return rev if rev in self.commits else self.refs.get(rev)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".png", ".pt", ".pth")


def lfs_path(path: str, size: int) -> bool:
    """Where the Hub stores a file in LFS: binary kinds, and anything over 10 MiB."""
    return path.endswith(LFS_SUFFIXES) or size > 10 * 2**20


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, writers: dict[str, set[str]] | None = None):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        self.cut_after: dict[str, int] = {}  # filename -> bytes sent before the first transfer is cut
        self.writers = writers or {}         # token -> the owners (users, organizations) it may write to
        self.lfs: dict[str, bytes] = {}      # sha256 -> content, every LFS object uploaded
        self.fail_commits = 0                # the next N commits answer 500 (their uploads are kept)
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

            # ---------------------------------------------------------------- uploads

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _may_write(self, repo_id) -> bool:
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
                if not token:
                    self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                    return False
                owner = repo_id.split("/")[0]
                if owner not in hub.writers.get(token, ()):
                    self._error(403, "Forbidden", f"You don't have the rights to create a model under the namespace "
                                                  f'"{owner}"')
                    return False
                return True

            def do_PUT(self):
                path = unquote(urlparse(self.path).path)
                body = self._body()
                hub.log.append({"method": "PUT", "path": path, "auth": self.headers.get("Authorization"),
                                "bytes": len(body)})
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
                if not m:
                    return self._error(404, "EntryNotFound", f"no route {path}")
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._error(400, "BadRequest", "the object's content does not match its sha256")
                hub.lfs[m.group(1)] = body
                self._send(200)

            def do_POST(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                body = self._body()
                hub.log.append({"method": "POST", "path": path, "auth": self.headers.get("Authorization")})
                if path == "/api/validate-yaml":
                    return self._json({"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if m:
                    repo_id, kind, rev = m.groups()
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    if not self._may_write(repo_id):
                        return
                    self.repo_id = repo_id
                    return getattr(self, f"_{kind}")(hub.repos[repo_id], rev, body)
                m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if m:
                    if not self._may_write(m.group(1)):
                        return
                    return self._lfs_batch(json.loads(body))
                self._error(404, "EntryNotFound", f"no route {path}")

            def _create(self, payload):
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                if not self._may_write(repo_id):
                    return
                if repo_id in hub.repos:
                    return self._send(409, json.dumps({"error": "You already created this model repo",
                                                       "url": f"{hub.url}/{repo_id}"}).encode(),
                                      {"Content-Type": "application/json", "X-Error-Message": "You already created this model repo"})
                repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                repo.add_commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                repo.messages.append("initial commit")
                self._json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _branch(self, repo, rev, body):
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                if rev in repo.refs:
                    return self._error(409, "Conflict", f"Reference already exists: refs/heads/{rev}")
                repo.refs[rev] = repo.resolve(start)
                self._json({})

            def _preupload(self, repo, rev, body):
                files = repo.commits.get(repo.resolve(unquote(rev)) or "", {})
                out = []
                for f in json.loads(body)["files"]:
                    lfs = lfs_path(f["path"], f["size"])
                    have = files.get(f["path"])
                    oid = None if have is None else hashlib.sha256(have).hexdigest() if lfs else git_oid(have)
                    out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                "oid": oid})
                self._json({"files": out})

            def _lfs_batch(self, payload):
                objects = []
                for o in payload["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in hub.lfs:  # an object the server holds already needs no upload
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
                    objects.append(entry)
                self._json({"transfer": "basic", "objects": objects})

            def _commit(self, repo, rev, body):
                rev = unquote(rev)
                if hub.fail_commits:
                    hub.fail_commits -= 1
                    return self._error(500, "InternalError", "the commit failed (a test asked for it)")
                lines = [json.loads(x) for x in body.splitlines() if x.strip()]
                parent = repo.resolve(rev)
                if parent is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                files = dict(repo.commits[parent])
                for item in lines[1:]:
                    key, v = item["key"], item["value"]
                    if key == "file":
                        files[v["path"]] = base64.b64decode(v["content"])
                    elif key == "lfsFile":
                        if v["oid"] not in hub.lfs:
                            return self._error(400, "BadRequest", f"LFS object {v['oid']} of {v['path']} was never uploaded")
                        files[v["path"]] = hub.lfs[v["oid"]]
                    elif key == "deletedFile":
                        files.pop(v["path"], None)
                    elif key == "deletedFolder":
                        files = {k: d for k, d in files.items() if not k.startswith(v["path"].rstrip("/") + "/")}
                sha = repo.add_commit(files, ref=rev)
                repo.messages.append(lines[0]["value"]["summary"])
                self._json({"commitUrl": f"{hub.url}/{self.repo_id}/commit/{sha}", "commitOid": sha,
                            "pullRequestUrl": None})

            def _resolve_commit(self, repo_id, rev):
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
                sha, files = self._resolve_commit(repo_id, rev)
                if sha is None:
                    return
                if kind == "revision":
                    return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": hub.repos[repo_id].private,
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
                sha, files = self._resolve_commit(repo_id, rev)
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
