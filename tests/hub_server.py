"""A loopback stand-in for the Hugging Face Hub, enough for the real huggingface_hub client (2.4).

It answers what graftcore's hub inputs call, as huggingface.co does:

    GET  /api/models/{org}/{name}/revision/{rev}[?blobs=true]   model info: sha (the commit) and siblings
                                                                (rfilename, size, blobId, lfs {size, sha256})
    HEAD /{org}/{name}/resolve/{rev}/{file}                     X-Repo-Commit, ETag, Content-Length, and
                                                                X-Linked-Size/X-Linked-Etag for LFS files
    GET  /{org}/{name}/resolve/{rev}/{file}                     the bytes; `Range: bytes=a-b` / `bytes=a-`
                                                                gives 206 with Content-Range

Errors carry the X-Error-Code header the client maps to its exception classes (RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound). The server counts every byte of tensor data it sends (bytes of a
.safetensors file past its header), can cut one transfer after N bytes, and can slow transfers down.
It binds 127.0.0.1 on an ephemeral port only.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
CHUNK = 16 << 10


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    status: int | None = None  # answer every request with this (401: private, 403: gated)
    error_code: str = ""

    def data_start(self, name: str) -> int | None:
        """Where tensor data begins in a .safetensors file (None for other files)."""
        if not name.endswith(".safetensors"):
            return None
        (n,) = struct.unpack("<Q", self.files[name][:8])
        return 8 + n


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    data_bytes: int = 0  # tensor-data bytes sent, over all repos
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    cut: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, file) -> cut a GET after N bytes, once
    delay: float = 0.0  # seconds to sleep per CHUNK sent
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_folder(self, repo: str, folder: Path, **kw) -> str:
        """Serve every file of `folder` as repo `repo` at one commit; returns the commit."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        commit = hashlib.sha1(repo.encode() + b"".join(hashlib.sha1(v).digest() for v in files.values())).hexdigest()
        self.repos[repo] = Repo(files, commit, **kw)
        return commit

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer(head=False)

            def fail(self, status: int, code: str, commit: str | None = None):
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def answer(self, head: bool):
                path = urlsplit(self.path).path
                with hub.lock:
                    hub.requests.append((self.command, path, self.headers.get("Range", "")))
                m = INFO.match(path) or RESOLVE.match(path)
                if m is None:
                    return self.fail(404, "NotFound")
                repo = hub.repos.get(unquote(m["repo"]))
                if repo is None:
                    return self.fail(404, "RepoNotFound")
                if repo.status is not None:
                    return self.fail(repo.status, repo.error_code)
                rev = unquote(m["rev"] or "main")
                if rev not in ("main", repo.commit):
                    return self.fail(404, "RevisionNotFound")
                if "file" not in m.groupdict():
                    return self.send_body(json.dumps(model_info(unquote(m["repo"]), repo)).encode(), "application/json")
                name = unquote(m["file"])
                if name not in repo.files:
                    return self.fail(404, "EntryNotFound", repo.commit)
                self.send_file(repo, unquote(m["repo"]), name, head)

            def send_body(self, body: bytes, ctype: str):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_file(self, repo: Repo, repo_id: str, name: str, head: bool):
                data = repo.files[name]
                size = len(data)
                start, stop = 0, size
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if rng:
                    start, stop = int(rng[1]), min(size, int(rng[2]) + 1 if rng[2] else size)
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", repo.commit)
                etag = hashlib.sha256(data).hexdigest()
                self.send_header("ETag", f'"{etag}"')
                if name.endswith(".safetensors"):  # an LFS file, as on the hub
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(size))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
                self.send_header("Content-Length", str(stop - start))
                self.end_headers()
                if head:
                    return
                with hub.lock:  # cut the first transfer longer than the cut point (not a header read)
                    cut = hub.cut.get((repo_id, name))
                    if cut is not None and stop - start > cut:
                        del hub.cut[(repo_id, name)]
                    else:
                        cut = None
                end = stop if cut is None else min(stop, start + cut)
                data_start = repo.data_start(name)
                for lo in range(start, end, CHUNK):
                    hi = min(end, lo + CHUNK)
                    if hub.delay:
                        time.sleep(hub.delay)
                    self.wfile.write(data[lo:hi])
                    if data_start is not None:
                        with hub.lock:
                            hub.data_bytes += max(0, hi - max(lo, data_start))
                if cut is not None:  # drop the connection mid-body, as a flaky network does
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def ranges(self, repo: str, file: str) -> list[str]:
        """The Range headers of the GETs of one file, in order ('' for a whole-file GET)."""
        return [
            r
            for m, p, r in self.requests
            if m == "GET" and p.startswith(f"/{repo}/resolve/") and p.endswith("/" + file)
        ]


def model_info(repo_id: str, repo: Repo) -> dict:
    siblings = []
    for name, data in sorted(repo.files.items()):
        entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        siblings.append(entry)
    return {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False, "siblings": siblings}
