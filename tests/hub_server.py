"""A small stand-in for the Hugging Face Hub on 127.0.0.1, standard library only.

It speaks the part of the Hub's HTTP API that the unmodified `huggingface_hub`, `transformers` and `datasets`
clients use to create repositories and branches, commit files (regular and LFS), list trees and download files:

    POST /api/repos/create                              GET  /api/{type}s/{repo}[/revision/{rev}]
    POST /api/{type}s/{repo}/preupload/{rev}            POST /api/{type}s/{repo}/commit/{rev}   (ndjson)
    POST /api/{type}s/{repo}/branch/{branch}            GET  /api/{type}s/{repo}/refs
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]        POST /api/{type}s/{repo}/paths-info/{rev}
    POST /api/validate-yaml                             GET  /api/whoami-v2
    POST /[{type}s/]{repo}.git/info/lfs/objects/batch   PUT  /lfs/{oid}   POST /lfs/verify
    HEAD|GET /[{type}s/]{repo}/resolve/{rev}/{path}

Writes need `Authorization: Bearer TOKEN` (the token given on the command line); private repositories need it
for reads too. Missing files answer 404 with `X-Error-Code: EntryNotFound`, unknown revisions `RevisionNotFound`
and unknown repositories `RepoNotFound`, as the Hub does. LFS uploads use the basic transfer only, so clients must
run with `HF_HUB_DISABLE_XET=1`.

For the tests to inspect, the server writes into `--root`: `state.json` (repositories, branches, commits with
their messages, visibility), the files of every branch head under `files/{type}s/{repo}/@{branch}/`, and
`requests.log` (one line per request: method, path, status). Run it as

    python tests/hub_server.py --root DIR --token TOKEN --port-file FILE

and stop it with SIGTERM. It prints nothing; the chosen port is written to `--port-file` once it listens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit


REPO_TYPES = ("model", "dataset", "space")
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".arrow", ".png", ".pt", ".pth", ".h5", ".onnx", ".msgpack")
LFS_MIN_SIZE = 10 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    """Repositories, commits and blobs, in memory and mirrored under `root` for inspection."""

    def __init__(self, root: Path, token: str):
        self.root = root
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[str, dict[str, Any]] = {}  # "model:org/name" -> repo record
        self.blobs: dict[str, bytes] = {}  # sha256 -> content, for every file ever committed or uploaded

    # -- repositories and commits ----------------------------------------------------------------------------------

    @staticmethod
    def key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}:{repo_id}"

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> None:
        record = {"type": repo_type, "id": repo_id, "private": private, "branches": {}, "commits": {}}
        self.repos[self.key(repo_type, repo_id)] = record
        attributes = "\n".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text" for suffix in LFS_SUFFIXES) + "\n"
        self.commit(record, "main", "initial commit", "", [("file", ".gitattributes", attributes.encode())])

    def commit(
        self, repo: dict[str, Any], branch: str, summary: str, description: str, operations: list[tuple]
    ) -> str:
        parent = repo["branches"].get(branch)
        files = dict(repo["commits"][parent]["files"]) if parent else {}
        for kind, path, payload in operations:
            if kind == "file":
                digest = hashlib.sha256(payload).hexdigest()
                self.blobs[digest] = payload
                files[path] = {"sha256": digest, "size": len(payload), "lfs": False}
            elif kind == "lfsFile":
                files[path] = {"sha256": payload, "size": len(self.blobs[payload]), "lfs": True}
            elif kind == "deletedFile":
                files.pop(path, None)
            elif kind == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(path.rstrip("/") + "/")}
        listing = json.dumps({"parent": parent, "summary": summary, "files": files, "time": time.time_ns()})
        sha = hashlib.sha1(listing.encode()).hexdigest()
        repo["commits"][sha] = {"parent": parent, "summary": summary, "description": description, "files": files}
        repo["branches"][branch] = sha
        self.persist(repo, branch)
        return sha

    def resolve_revision(self, repo: dict[str, Any], revision: str) -> str | None:
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        return None

    def persist(self, repo: dict[str, Any], branch: str) -> None:
        folder = self.root / "files" / f"{repo['type']}s" / repo["id"] / f"@{branch}"
        shutil.rmtree(folder, ignore_errors=True)
        for path, entry in repo["commits"][repo["branches"][branch]]["files"].items():
            target = folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.blobs[entry["sha256"]])
        state = {key: {k: v for k, v in record.items()} for key, record in self.repos.items()}
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.root / "state.json")


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/0.1"
    state: HubState  # set on the class by `serve`

    # -- plumbing --------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass  # the request log below is enough; stderr stays quiet

    def _log(self, status: int) -> None:
        with self.state.lock, open(self.state.root / "requests.log", "a") as handle:
            handle.write(f"{self.command} {self.path} {status}\n")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._body()
        if self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in parse_qs(body.decode()).items()}
        return json.loads(body or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._log(status)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(value).encode(), headers, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _repo(self, repo_type: str, repo_id: str, head: bool = False, write: bool = False):
        """The repository, or `None` after answering with the error the Hub would give."""
        if write and not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header", head)
            return None
        repo = self.state.repos.get(HubState.key(repo_type, repo_id))
        if repo is None or (repo["private"] and not self._authorized()):
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        return repo

    def _commit_of(self, repo: dict[str, Any], revision: str, head: bool = False):
        sha = self.state.resolve_revision(repo, unquote(revision))
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
        return sha

    # -- routing ---------------------------------------------------------------------------------------------------

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/lfs/verify", "lfs_verify"),
        ("GET", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>.+))?", "info"),
        ("POST", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", "branch"),
        ("GET", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/refs", "refs"),
        (
            "GET",
            r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?",
            "tree",
        ),
        ("POST", r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects/batch", "lfs_batch"),
        (
            "HEAD",
            r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
        (
            "GET",
            r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
    ]

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        for method, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, url.path)
            if method == self.command and match:
                groups = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                if "type" in groups:
                    groups["type"] = groups["type"] or "model"
                with self.state.lock:
                    try:
                        getattr(self, f"do_{name}")(**groups)
                    except Exception as error:  # a server bug must show up in the test, not hang the client
                        self._error(500, None, f"{type(error).__name__}: {error}")
                return
        self._error(404, None, f"No such route: {self.command} {url.path}", head=self.command == "HEAD")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    # -- endpoints -------------------------------------------------------------------------------------------------

    def do_create_repo(self) -> None:
        payload = self._json_body()
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization'] or 'tester'}/{payload['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.base_url}/{prefix}{repo_id}"
        if HubState.key(repo_type, repo_id) in self.state.repos:
            return self._json(409, {"error": "You already created this repo", "url": url})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.state.create_repo(repo_type, repo_id, private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def do_validate_yaml(self) -> None:
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    def do_whoami(self) -> None:
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}})

    def do_info(self, type: str, repo: str, rev: str | None) -> None:  # noqa: A002 - the route's group name
        record = self._repo(type, repo)
        if record is None:
            return
        sha = self._commit_of(record, rev or "main")
        if sha is None:
            return
        files = record["commits"][sha]["files"]
        self._json(
            200,
            {
                "id": repo,
                "_id": hashlib.md5(repo.encode()).hexdigest()[:24],
                "sha": sha,
                "private": record["private"],
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-01-01T00:00:00.000Z",
                "createdAt": "2026-01-01T00:00:00.000Z",
                "siblings": [
                    {"rfilename": path, "size": entry["size"]}
                    | (
                        {"lfs": {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": 134}}
                        if entry["lfs"]
                        else {}
                    )
                    for path, entry in sorted(files.items())
                ],
            },
        )

    def do_preupload(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        payload = self._json_body()
        record = self._repo(type, repo, write=True)
        if record is None:
            return
        sha = self.state.resolve_revision(record, unquote(rev))
        files = record["commits"][sha]["files"] if sha else {}
        answers = []
        for item in payload["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            existing = files.get(item["path"])
            answers.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(self.state.blobs[existing["sha256"]]) if existing else None,
                }
            )
        self._json(200, {"files": answers, "commitOid": sha})

    def do_lfs_batch(self, type: str, repo: str) -> None:  # noqa: A002
        payload = self._json_body()
        record = self._repo(type, repo, write=payload.get("operation") == "upload")
        if record is None:
            return
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.blobs:
                answer["actions"] = {
                    "upload": {"href": f"{self.base_url}/lfs/{item['oid']}"},
                    "verify": {"href": f"{self.base_url}/lfs/verify"},
                }
            objects.append(answer)
        self._json(200, {"transfer": "basic", "objects": objects})

    def do_lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, None, "sha256 of the uploaded content does not match the oid")
        self.state.blobs[oid] = data
        self._send(200)

    def do_lfs_verify(self) -> None:
        payload = self._json_body()
        if payload["oid"] not in self.state.blobs:
            return self._error(404, None, "object not uploaded")
        self._json(200, {})

    def do_commit(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        record = self._repo(type, repo, write=True)
        if record is None:
            return
        branch = unquote(rev)
        if branch not in record["branches"]:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        header, operations = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "header":
                header = value
            elif line["key"] == "file":
                operations.append(("file", value["path"], base64.b64decode(value["content"])))
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.blobs:
                    return self._error(422, None, f"LFS object {value['oid']} was not uploaded")
                operations.append(("lfsFile", value["path"], value["oid"]))
            elif line["key"] in ("deletedFile", "deletedFolder"):
                operations.append((line["key"], value["path"], None))
        parent = header.get("parentCommit")
        if parent and parent != record["branches"][branch]:
            return self._error(412, None, "A commit has happened since the parent commit")
        sha = self.state.commit(record, branch, header.get("summary", ""), header.get("description", ""), operations)
        prefix = "" if type == "model" else f"{type}s/"
        self._json(
            200,
            {"success": True, "commitOid": sha, "commitUrl": f"{self.base_url}/{prefix}{repo}/commit/{sha}"},
        )

    def do_branch(self, type: str, repo: str, branch: str) -> None:  # noqa: A002
        payload = self._json_body()
        record = self._repo(type, repo, write=True)
        if record is None:
            return
        if branch in record["branches"]:
            return self._error(409, None, "Reference already exists")
        start = self._commit_of(record, payload.get("startingPoint") or "main")
        if start is None:
            return
        record["branches"][branch] = start
        self.state.persist(record, branch)
        self._json(200, {})

    def do_refs(self, type: str, repo: str) -> None:  # noqa: A002
        record = self._repo(type, repo)
        if record is None:
            return
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in record["branches"].items()
        ]
        self._json(200, {"branches": branches, "tags": [], "converts": []})

    def _entries(self, record: dict[str, Any], sha: str, paths: list[str] | None, base: str, recursive: bool):
        """Tree entries (files and folders) under `base`, or exactly `paths` when given."""
        files = record["commits"][sha]["files"]
        folders = {str(Path(p).parents[i]) for p in files for i in range(len(Path(p).parents) - 1)}
        entries = []

        def file_entry(path: str) -> dict[str, Any]:
            entry = files[path]
            data = self.state.blobs[entry["sha256"]]
            item = {"type": "file", "oid": git_blob_sha1(data), "size": entry["size"], "path": path}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
            return item

        def folder_entry(path: str) -> dict[str, Any]:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

        if paths is not None:
            for path in paths:
                path = path.strip("/")
                if path in files:
                    entries.append(file_entry(path))
                elif path in folders:
                    entries.append(folder_entry(path))
            return entries
        prefix = f"{base}/" if base else ""
        for path in sorted(folders):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append(folder_entry(path))
        for path in sorted(files):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append(file_entry(path))
        return entries

    def do_tree(self, type: str, repo: str, rev: str, path: str | None) -> None:  # noqa: A002
        record = self._repo(type, repo)
        if record is None:
            return
        sha = self._commit_of(record, rev)
        if sha is None:
            return
        base = (path or "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(record, sha, None, base, recursive)
        if base and not entries:
            return self._error(404, "EntryNotFound", f"{base} does not exist on {rev}")
        self._json(200, entries)

    def do_paths_info(self, type: str, repo: str, rev: str) -> None:  # noqa: A002
        payload = self._json_body()
        record = self._repo(type, repo)
        if record is None:
            return
        sha = self._commit_of(record, rev)
        if sha is None:
            return
        paths = payload.get("paths", [])
        self._json(200, self._entries(record, sha, [paths] if isinstance(paths, str) else paths, "", False))

    def do_resolve(self, type: str, repo: str, rev: str, path: str) -> None:  # noqa: A002
        head = self.command == "HEAD"
        record = self._repo(type, repo, head=head)
        if record is None:
            return
        sha = self._commit_of(record, rev, head=head)
        if sha is None:
            return
        entry = record["commits"][sha]["files"].get(path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}", head=head)
        data = self.state.blobs[entry["sha256"]]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(Path(path).name)}; filename=\"{Path(path).name}\";",
        }
        if entry["lfs"]:
            headers |= {"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])}
        status, body = 200, data
        requested = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if requested and not head:
            start = int(requested.group(1))
            end = int(requested.group(2)) if requested.group(2) else len(data) - 1
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if head:
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self._log(200)
            return
        self._send(status, body, headers)


def serve(root: Path, token: str, port_file: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    HubHandler.state = HubState(root, token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.daemon_threads = True
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(port_file)  # written atomically: a reader never sees a partial port
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="Folder for state.json, files/ and requests.log.")
    parser.add_argument("--token", required=True, help="The one token accepted for writes and private reads.")
    parser.add_argument("--port-file", type=Path, required=True, help="Where to write the port once listening.")
    args = parser.parse_args()
    serve(args.root, args.token, args.port_file)


if __name__ == "__main__":
    main()
