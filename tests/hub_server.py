"""A fake Hugging Face Hub for tests: the HTTP routes the real ``huggingface_hub`` client calls
to create a repo, a branch and a commit (regular files inline, large files through the LFS
batch API, without Xet).

Usage, in a test module::

    from hub_server import TOKEN, hub_fixture  # noqa: F401  (provides the `hub` fixture)

    def test_x(hub):
        push_model(folder, "me/model", token=TOKEN)        # in-process: the fixture patched
        assert hub.repos["me/model"].files["config.json"] == ...  # huggingface_hub's endpoint
        subprocess.run([...], env={**os.environ, **hub.env})  # or a subprocess

Every request is recorded in ``hub.requests`` (method, path, query, headers, body); requests to
routes this server does not know are answered 404 and listed in ``hub.unknown`` so a change in
the client's protocol makes the tests fail loudly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

TOKEN = "hf_test_SECRET123"
"""The token the fake Hub accepts by default (``hub.tokens``)."""

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
"""Paths the fake Hub asks the client to upload through LFS; everything else is 'regular'."""


@dataclass
class Request:
    method: str
    path: str
    route: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Commit:
    oid: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]  # the tree after the commit
    lfs_paths: set[str]
    pr_num: int | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    visibility: str | None
    branches: dict[str, list[Commit]] = field(default_factory=lambda: {"main": []})
    pull_requests: list[int] = field(default_factory=list)

    def tree(self, revision: str = "main") -> dict[str, bytes]:
        commits = self.branches[revision]
        return dict(commits[-1].files) if commits else {}

    @property
    def files(self) -> dict[str, bytes]:
        """The files of ``main`` (path → bytes)."""
        return self.tree("main")

    @property
    def commits(self) -> list[Commit]:
        return [c for cs in self.branches.values() for c in cs]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """State and routes of the fake Hub; ``serve()`` runs it on 127.0.0.1."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[Request] = []
        self.unknown: list[str] = []
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.tokens: set[str] | None = {TOKEN}  # None: accept any request
        # route name → status to answer instead. The client retries 5xx with backoff (seconds):
        # use 4xx or 507 in tests.
        self.fail: dict[str, int] = {}
        self.home: Path | None = None  # HF_HOME for clients (no saved login)
        self._lock = threading.Lock()
        self._n = 0

    # ------------------------------------------------------------------ helpers for tests
    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this Hub (add it to os.environ)."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if self.home is not None:
            env["HF_HOME"] = str(self.home)
        return env

    def calls(self, route: str) -> list[Request]:
        return [r for r in self.requests if r.route == route]

    def stored_bytes(self) -> Iterator[tuple[str, bytes]]:
        """Every file and blob the Hub holds, for 'the token never reached the server' checks."""
        for repo in self.repos.values():
            for c in repo.commits:
                for path, data in c.files.items():
                    yield f"{repo.repo_id}@{c.oid}:{path}", data
                yield f"{repo.repo_id}@{c.oid}:<message>", (c.summary + c.description).encode()
        for oid, data in self.blobs.items():
            yield f"lfs:{oid}", data

    # ------------------------------------------------------------------ dispatch
    ROUTES: list[tuple[str, str, str]] = [
        ("POST", r"/api/repos/create", "create"),
        ("POST", r"/api/validate-yaml", "validate-yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", "commit"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", "create-branch"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", "repo-info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", "repo-info"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs-batch"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", "lfs-verify"),
        ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs-upload"),
    ]

    def route(self, method: str, path: str) -> tuple[str, dict[str, str]]:
        for m, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                return name, {k: unquote(v) for k, v in match.groupdict().items()}
        return "unknown", {}

    def handle(self, req: Request, params: dict[str, str]) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON body, extra headers) for one request."""
        if req.route == "unknown":
            self.unknown.append(f"{req.method} {req.path}")
            raise HubError(404, f"fake hub: no route for {req.method} {req.path}")
        if req.route in self.fail:
            raise HubError(self.fail[req.route], f"fake hub: {req.route} made to fail")
        if req.route != "lfs-upload":  # pre-signed URL: no Authorization, like S3
            self._authorize(req)
        body = (
            json.loads(req.body) if req.body and req.route not in ("commit", "lfs-upload") else {}
        )
        with self._lock:
            return getattr(self, "_" + req.route.replace("-", "_"))(req, body, **params)

    def _authorize(self, req: Request) -> None:
        if self.tokens is None:
            return
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return self.repos[repo_id]

    def _branch(self, repo: Repo, rev: str) -> list[Commit]:
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return repo.branches[rev]

    def _oid(self) -> str:
        self._n += 1
        return hashlib.sha1(f"commit-{self._n}".encode()).hexdigest()

    # ------------------------------------------------------------------ routes
    def _create(self, req, body):
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else None
        if repo_id is None:
            raise HubError(400, "fake hub: repos need an organization (namespace)")
        if body.get("type", "model") != "model":
            raise HubError(400, "fake hub: only model repos")
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        visibility = body.get("visibility")
        self.repos[repo_id] = Repo(repo_id, private=visibility == "private", visibility=visibility)
        return 200, {"url": url, "name": repo_id}, {}

    def _validate_yaml(self, req, body):
        match = re.match(r"^---\r?\n(.*?)\r?\n---", body.get("content", ""), re.S)
        if not match:
            return (
                200,
                {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]},
                {},
            )
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            raise HubError(400, f"invalid yaml: {e}") from None
        if not isinstance(data, dict):
            raise HubError(400, "metadata must be a mapping")
        return 200, {"errors": [], "warnings": []}, {}

    def _whoami(self, req, body):
        return 200, {"type": "user", "name": "test-user", "orgs": []}, {}

    def _repo_info(self, req, body, repo, rev="main"):
        r = self._repo(repo)
        commits = self._branch(r, rev)
        sha = commits[-1].oid if commits else "0" * 40
        siblings = [{"rfilename": p} for p in sorted(r.tree(rev))]
        return 200, {"id": repo, "private": r.private, "sha": sha, "siblings": siblings}, {}

    def _create_branch(self, req, body, repo, rev):
        r = self._repo(repo)
        if rev in r.branches:
            return 409, {"error": f"Reference already exists: refs/heads/{rev}"}, {}
        r.branches[rev] = list(self._branch(r, body.get("startingPoint", "main")))
        return 200, {}, {}

    def _preupload(self, req, body, repo, rev):
        r = self._repo(repo)
        tree = r.tree(rev) if rev in r.branches else {}
        lfs = self._lfs_paths(r, rev)
        files = []
        for f in body["files"]:
            path = f["path"]
            mode = "lfs" if path.endswith(LFS_SUFFIXES) else "regular"
            oid = None
            if path in tree:
                data = tree[path]
                oid = hashlib.sha256(data).hexdigest() if path in lfs else _git_sha1(data)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": None}, {}

    def _lfs_paths(self, repo: Repo, rev: str) -> set[str]:
        commits = repo.branches.get(rev) or []
        return set(commits[-1].lfs_paths) if commits else set()

    def _lfs_batch(self, req, body, repo):
        self._repo(repo)
        if body.get("operation") != "upload":
            raise HubError(400, "fake hub: only uploads")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size}
            if oid not in self.blobs:
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/{oid}"},
                    "verify": {
                        "href": f"{self.url}/{repo}.git/info/lfs/objects/verify",
                        "header": {"Authorization": "Basic fake-lfs-verify"},
                    },
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_upload(self, req, body, oid):
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "fake hub: uploaded bytes do not match the sha256 oid")
        self.blobs[oid] = req.body
        return 200, {}, {"ETag": '"fake-etag"'}

    def _lfs_verify(self, req, body, repo):
        oid, size = body["oid"], body["size"]
        if oid not in self.blobs or len(self.blobs[oid]) != size:
            raise HubError(404, f"fake hub: LFS object {oid} not uploaded")
        return 200, {"success": True}, {}

    def _commit(self, req, body, repo, rev):
        r = self._repo(repo)
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "fake hub: the first ndjson line must be the header")
        header = lines[0]["value"]
        pr_num = None
        if req.query.get("create_pr") == "1":
            base = self._branch(r, rev)
            pr_num = len(r.pull_requests) + 1
            r.pull_requests.append(pr_num)
            rev = f"refs/pr/{pr_num}"
            r.branches[rev] = list(base)
        commits = self._branch(r, rev)
        files = dict(commits[-1].files) if commits else {}
        lfs = set(commits[-1].lfs_paths) if commits else set()
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "fake hub: regular files must be base64")
                files[path] = base64.b64decode(value["content"])
                lfs.discard(path)
            elif key == "lfsFile":
                if value.get("algo") != "sha256" or value["oid"] not in self.blobs:
                    raise HubError(400, f"fake hub: LFS object for {path} was not uploaded")
                files[path] = self.blobs[value["oid"]]
                lfs.add(path)
            elif key == "deletedFile":
                files.pop(path, None)
                lfs.discard(path)
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                    files.pop(p)
                    lfs.discard(p)
            else:
                raise HubError(400, f"fake hub: unknown commit operation {key!r}")
        oid = self._oid()
        commit = Commit(
            oid,
            rev,
            header.get("summary", ""),
            header.get("description", ""),
            files,
            lfs,
            pr_num,
        )
        commits.append(commit)
        out = {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}"}
        if pr_num is not None:
            out["pullRequestUrl"] = f"{self.url}/{repo}/discussions/{pr_num}"
        return 200, out, {}


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# ---------------------------------------------------------------------- HTTP plumbing
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        url = urlsplit(self.path)
        name, params = self.hub.route(self.command, url.path)
        req = Request(
            method=self.command,
            path=url.path,
            route=name,
            query={k: v[-1] for k, v in parse_qs(url.query).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
        )
        self.hub.requests.append(req)
        try:
            status, payload, extra = self.hub.handle(req, params)
        except HubError as e:
            status, payload = e.status, {"error": e.message}
            extra = {"X-Error-Message": e.message}
            if e.code:
                extra["X-Error-Code"] = e.code
        except Exception as e:  # a bug in the fake: make it visible to the client
            status, payload, extra = 500, {"error": f"fake hub crashed: {e!r}"}, {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")  # no keep-alive: shutdown() ends it all
        self.close_connection = True
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve


@contextmanager
def serve(hub: FakeHub | None = None) -> Iterator[FakeHub]:
    """Run a fake Hub on 127.0.0.1 (a free port) in a thread."""
    hub = hub or FakeHub()
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def point_client_at(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """Make ``huggingface_hub`` in this process talk to ``hub``.

    Its ``constants`` module reads the environment at import time, so besides the variables
    (for code that reads them later and for subprocesses) the constants are patched too.
    ``HF_HOME`` points to an empty folder so no saved login of the machine is used.
    """
    hub.home = home
    for key, value in hub.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        hub.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


@pytest.fixture(name="hub")
def hub_fixture(tmp_path_factory, monkeypatch) -> Iterator[FakeHub]:
    """A running fake Hub; ``huggingface_hub`` in this process already points at it, and
    ``hub.env`` (plus ``HF_HOME``) does the same for a subprocess."""
    home = tmp_path_factory.mktemp("hf_home")
    with serve() as h:
        point_client_at(h, monkeypatch, home)
        yield h
    assert not h.unknown, f"the client called routes the fake Hub does not know: {h.unknown}"
