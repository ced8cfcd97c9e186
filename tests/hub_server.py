"""A small Hugging Face Hub stand-in for offline tests (standard library only).

It answers the routes a real `huggingface_hub` client uses to create a repository, commit
files (every file "regular": inline base64, no LFS/Xet) and download them back
(ecosystem-notes.md, "Hugging Face Hub without internet"). Repositories live in memory
with their commit history; `HubState` records requests and the Authorization headers seen,
and `fail_commits` (or `fail_after` = N accepted commits, or `fail_summaries`, a text of the commit
message) makes commits answer 500; `commit_delay` (seconds) or `hold_commits_until` (a condition) make
commits slow.

    server = HubServer().start()   # server.url -> HF_ENDPOINT
    ...
    server.stop()
"""

import base64
import datetime
import hashlib
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

USER = "tester"
NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubState:
    def __init__(self):
        self.lock = threading.Lock()
        self.repos = {}  # repo id -> {"visibility": str, "commits": [{"oid", "message", "files": {path: bytes}}]}
        self.requests = []  # (method, path)
        self.authorizations = set()  # Authorization header values seen
        self.fail_commits = False
        self.fail_after = None  # a number: commits accepted before every later one fails
        self.fail_summaries = None  # a string: commits whose message contains it fail
        self.commit_delay = 0.0  # seconds every commit takes (a slow upload)
        self.hold_commits_until = None  # a callable: commits wait (up to hold_timeout s) until it returns True
        self.hold_timeout = 120.0
        self.hold_timed_out = False
        self.commit_times = []  # (arrived, answered, message) of every commit request, time.time()

    def files(self, repo_id, revision="main") -> dict:
        """The files of a repository at a branch name (its head) or a commit id."""
        commits = self.repos[repo_id]["commits"]
        if revision in ("main", None):
            return commits[-1]["files"] if commits else {}
        for commit in commits:
            if commit["oid"] == revision:
                return commit["files"]
        raise KeyError(revision)

    def head(self, repo_id) -> str:
        commits = self.repos[repo_id]["commits"]
        return commits[-1]["oid"] if commits else "0" * 40


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, *args):  # keep test output clean
        pass

    # ---- plumbing --------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status, payload=None, headers=None, body=None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status, code, message):
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _record(self):
        with self.state.lock:
            self.state.requests.append((self.command, self.path))
            if self.headers.get("Authorization"):
                self.state.authorizations.add(self.headers["Authorization"])

    def _authorized(self) -> bool:
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            self._error(401, "Unauthorized", "Invalid username or password.")
            return False
        return True

    # ---- routes ----------------------------------------------------------------------------------
    def do_HEAD(self):
        self._record()
        self._route()

    def do_GET(self):
        self._record()
        self._route()

    def do_POST(self):
        self._record()
        body = self._body()
        path = urlparse(self.path).path
        if path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if match:
            repo_id, action, _ = match.group(1), match.group(2), unquote(match.group(3))
            if repo_id not in self.state.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if not self._authorized():
                return None
            return self._preupload(repo_id, json.loads(body)) if action == "preupload" else self._commit(repo_id, body)
        return self._error(404, "NotFound", f"no route POST {path}")

    def _route(self):
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if path == "/api/whoami-v2":
            if not self._authorized():
                return None
            return self._send(
                200,
                {
                    "type": "user",
                    "name": USER,
                    "fullname": "Test User",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if match:
            return self._model_info(match.group(1), match.group(2) or "main")
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if match:
            return self._tree(
                match.group(1),
                match.group(2),
                match.group(3) or "",
                query.get("recursive") == ["true"]
                or query.get("recursive") == ["True"]
                or query.get("recursive") == ["1"],
            )
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match:
            return self._resolve(match.group(1), match.group(2), match.group(3))
        return self._error(404, "NotFound", f"no route {self.command} {path}")

    def _create(self, payload):
        if not self._authorized():
            return None
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.state.repos[repo_id] = {"visibility": payload.get("visibility", "public"), "commits": []}
        return self._send(200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _validate_yaml(self, payload):
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        try:
            if match and not isinstance(yaml.safe_load(match.group(1)), dict):
                errors.append({"message": "metadata is not a mapping"})
        except yaml.YAMLError as err:
            errors.append({"message": f"invalid YAML: {err}"})
        return self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, repo_id, payload):
        current = self.state.files(repo_id)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None,
            }
            for f in payload.get("files", [])
        ]
        return self._send(200, {"files": files, "commitOid": self.state.head(repo_id)})

    def _commit(self, repo_id, body):
        arrived = time.time()
        time.sleep(self.state.commit_delay)
        self._hold()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        with self.state.lock:
            self.state.commit_times.append((arrived, time.time(), header.get("summary")))
        accepted = sum(len(r["commits"]) for r in self.state.repos.values())
        refused = self.state.fail_summaries is not None and self.state.fail_summaries in (header.get("summary") or "")
        if (
            self.state.fail_commits
            or refused
            or (self.state.fail_after is not None and accepted >= self.state.fail_after)
        ):
            return self._error(500, "InternalError", "Internal Server Error (test)")
        with self.state.lock:
            files = dict(self.state.files(repo_id))
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] == "deletedFolder":
                    files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
                elif item["key"] != "header":
                    return self._error(400, "BadRequest", f"unsupported operation {item['key']} (only regular files)")
            oid = hashlib.sha1(f"{repo_id}{len(self.state.repos[repo_id]['commits'])}".encode()).hexdigest()
            self.state.repos[repo_id]["commits"].append({"oid": oid, "message": header.get("summary"), "files": files})
        return self._send(
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            },
        )

    def _hold(self):
        """A slow upload that lasts exactly until the test's condition holds (or hold_timeout passes)."""
        until, deadline = self.state.hold_commits_until, time.time() + self.state.hold_timeout
        while until is not None and not until():
            if time.time() > deadline:
                self.state.hold_timed_out = True
                return
            time.sleep(0.1)

    def _lookup(self, repo_id, revision):
        if repo_id not in self.state.repos:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        try:
            return self.state.files(repo_id, revision)
        except KeyError:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None

    def _commit_id(self, repo_id, revision):
        return self.state.head(repo_id) if revision == "main" else revision

    def _model_info(self, repo_id, revision):
        files = self._lookup(repo_id, revision)
        if files is None:
            return None
        repo = self.state.repos[repo_id]
        return self._send(
            200,
            {
                "_id": uuid.uuid4().hex,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": self._commit_id(repo_id, revision),
                "private": repo["visibility"] == "private",
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "diffusers",
                "lastModified": NOW,
                "createdAt": NOW,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def _tree(self, repo_id, revision, folder, recursive):
        files = self._lookup(repo_id, revision)
        if files is None:
            return None
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "path": path, "size": len(files[path]), "oid": git_blob_oid(files[path])})
        entries += [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)
        ]
        return self._send(200, entries)

    def _resolve(self, repo_id, revision, path):
        files = self._lookup(repo_id, revision)
        if files is None:
            return None
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
        content = files[path]
        return self._send(
            200,
            body=content,
            headers={"X-Repo-Commit": self._commit_id(repo_id, revision), "ETag": f'"{git_blob_oid(content)}"'},
        )


class HubServer:
    """ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self.state = HubState()
        self.url = self.httpd.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
