"""A small Hub-compatible HTTP server for download tests, with fault injection.

It answers the endpoints huggingface_hub and qwen_core.download use (see ARCHITECTURE.md "Testing downloads
without a hub"): model info, recursive tree listing, and HEAD/GET ``/{repo}/resolve/{rev}/{path}`` with
Range support. Faults are switched on per test through ``HubServer.faults``; ``bytes_served`` counts body
bytes per file so a test can prove that a resume fetched only the missing tail.

Binds 127.0.0.1 only. Usable as a context manager::

    with HubServer() as hub:
        hub.add_repo("org/model", {"a.bin": b"..."})
        download_repo("org/model", endpoint=hub.url, ...)
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_THRESHOLD = 1024  # files this big or bigger are listed as LFS (sha256), like the Hub's *.safetensors


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Faults:
    """Switches a test flips; counters decrement as faults fire so bursts end by themselves."""

    drop_after: int | None = None  # close the connection after this many body bytes ...
    drop_count: int = 0  # ... this many times
    status_burst: int = 0  # answer the next N file GETs with `burst_status`
    burst_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with burst answers (e.g. 429 + "1")
    no_range: bool = False  # ignore Range, always 200 with the whole body
    rate_bps: int | None = None  # throttle bodies to about this many bytes per second
    stall_after: int | None = None  # stop sending (keep the socket open) after N body bytes ...
    stall_count: int = 0  # ... this many times
    stall_seconds: float = 30.0
    require_token: str | None = None  # every request needs `Authorization: Bearer <token>` else 401
    api_status: int | None = None  # answer the API endpoints with this status (e.g. 500) ...
    api_status_count: int = 0  # ... this many times
    xet: bool = False  # advertise X-Xet-Hash on HEAD (we never serve the Xet protocol itself)
    range_416: int = 0  # answer the next N ranged GETs with 416 (a CDN that lost the object's size)
    redirect_lfs: bool = False  # LFS files: 302 to /cdn/... on the same host with X-Linked-Size/-Etag, as the Hub
    api_redirect: str | None = None  # answer the API endpoints (info, tree) with a 302 to this Location
    tree_next: str | None = None  # add `Link: <this>; rel="next"` to the tree listing (pagination)
    api_body: bytes | None = None  # answer the API endpoints with 200 and this body (a portal's HTML page)
    # File GETs (the resolve URL, not the CDN): the first matching fault wins.
    file_redirect: str | None = None  # 302 to this Location ("{self}" = the request's own path: a loop)
    file_redirect_status: int = 302  # ... or e.g. 307; with file_redirect="" the 3xx has no Location at all
    body_override: bytes | None = None  # 200 with this body instead of the file (a proxy/portal/pointer) ...
    body_type: str = "text/plain"  # ... with this Content-Type ...
    body_length: bool = True  # ... and a Content-Length (False: no length, the body ends when the socket closes)
    corrupt: bool = False  # the file's bytes with one byte flipped in every body (right length, wrong content)
    endless: bool = False  # 200 without Content-Length: the file, then filler until `endless_cap` bytes, then close
    endless_cap: int = 32 * 1024 * 1024
    endless_garbage: bool = False  # with `endless`: filler from the first byte (no file at all)
    content_range_total: int | None = None  # 206 answers claim this total size in Content-Range


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes | Path]
    extra_tree: list[dict] = field(default_factory=list)  # raw tree entries appended as-is (hostile names)
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit


class HubServer:
    """Threaded fault-injecting Hub stand-in on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self, port: int = 0) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.bytes_served: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._meta: dict[tuple[str, str], tuple[int, str, str | None]] = {}  # (repo, path) -> size, etag, sha256
        self.httpd = _QuietServer(("127.0.0.1", port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], *, commit: str | None = None) -> Repo:
        commit = commit or hashlib.sha1(repr(sorted(files)).encode() + str(time.time_ns()).encode()).hexdigest()
        repo = Repo(commit=commit, files=dict(files), revisions={"main": commit})
        self.repos[repo_id] = repo
        for path in files:
            self._meta.pop((repo_id, path), None)
        return repo

    def total_served(self) -> int:
        with self._lock:
            return sum(self.bytes_served.values())

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()

    # -- helpers used by the handler ------------------------------------------------------------------
    def meta(self, repo_id: str, path: str) -> tuple[int, str, str | None]:
        key = (repo_id, path)
        if key not in self._meta:
            data = self.read(repo_id, path)
            sha256 = hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else None
            self._meta[key] = (len(data), sha256 or git_blob_sha1(data), sha256)
        return self._meta[key]

    def read(self, repo_id: str, path: str) -> bytes:
        content = self.repos[repo_id].files[path]
        return content.read_bytes() if isinstance(content, Path) else content


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what these tests do on purpose


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr
            pass

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch(head=False)

        # -- routing ----------------------------------------------------------------------------------
        def _dispatch(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            cdn = re.fullmatch(r"/cdn/(.+?/.+?)/([0-9a-f]{40})/(.+)", path)
            if cdn:  # like a presigned CDN URL: no token needed
                return self._file(*cdn.groups(), head=head, via_cdn=True)
            if hub.faults.require_token and self.headers.get("Authorization") != f"Bearer {hub.faults.require_token}":
                return self._error(401, "GatedRepo", "Access to this repo is restricted; pass a token.")
            if path in ("/_stats", "/_reset"):  # for a server in another process (the benchmark)
                if path == "/_reset":
                    hub.reset_counters()
                return self._json({"bytes_served": hub.total_served(), "requests": len(hub.requests)})
            m = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            tree = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(?:/.*)?", path)
            resolve = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
            if tree or (m and "/tree/" not in path):
                if self._api_fault():
                    return None
                if hub.faults.api_redirect:
                    return self._redirect(hub.faults.api_redirect)
                if hub.faults.api_body is not None:
                    return self._raw(200, hub.faults.api_body, "text/html", length=True)
                return self._tree(*tree.groups()) if tree else self._info(m.group(1), m.group(2) or "main")
            if resolve:
                return self._file(*resolve.groups(), head=head)
            return self._error(404, None, "Not found")

        def _api_fault(self) -> bool:
            if hub.faults.api_status and hub.faults.api_status_count > 0:
                hub.faults.api_status_count -= 1
                self._error(hub.faults.api_status, None, "injected API failure")
                return True
            return False

        def _repo(self, repo_id: str, rev: str) -> tuple[Repo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None
            commit = repo.revisions.get(rev, rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None
            return repo, commit

        def _info(self, repo_id: str, rev: str) -> None:
            found = self._repo(repo_id, rev)
            if found:
                repo, commit = found
                siblings = [{"rfilename": p} for p in repo.files] + [{"rfilename": e["path"]} for e in repo.extra_tree]
                self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings, "private": False})

        def _tree(self, repo_id: str, rev: str) -> None:
            found = self._repo(repo_id, rev)
            if found:
                repo, _ = found
                entries = []
                for p in repo.files:
                    size, etag, sha256 = hub.meta(repo_id, p)
                    entry = {"type": "file", "path": p, "size": size, "oid": etag if not sha256 else "0" * 40}
                    if sha256:
                        entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
                    entries.append(entry)
                extra = {"Link": f'<{hub.faults.tree_next}>; rel="next"'} if hub.faults.tree_next else None
                self._json(entries + repo.extra_tree, extra)

        # -- files ------------------------------------------------------------------------------------
        def _file(self, repo_id: str, rev: str, path: str, *, head: bool, via_cdn: bool = False) -> None:
            found = self._repo(repo_id, rev)
            if not found:
                return None
            repo, commit = found
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist at {commit}")
            f = hub.faults
            if not head and f.status_burst > 0:
                f.status_burst -= 1
                extra = {"Retry-After": f.retry_after} if f.retry_after else {}
                return self._error(f.burst_status, None, "injected failure", extra)
            size, etag, sha256 = hub.meta(repo_id, path)
            if not head and not via_cdn and self._file_fault(repo_id, path, size):
                return None
            if f.redirect_lfs and sha256 and not via_cdn:
                self.send_response(302)
                self.send_header("Location", f"/cdn/{repo_id}/{commit}/{quote(path)}")
                self.send_header("X-Repo-Commit", commit)
                self.send_header("X-Linked-Size", str(size))
                self.send_header("X-Linked-Etag", f'"{sha256}"')
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            start, end, status = 0, size - 1, 200
            rng = self.headers.get("Range")
            if rng and not head and f.range_416 > 0:
                f.range_416 -= 1
                return self._error(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
            if rng and not f.no_range:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    if start >= size:
                        return self._error(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{size}"})
                    status = 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "none" if f.no_range else "bytes")
            self.send_header("Last-Modified", email.utils.formatdate(usegmt=True))
            if f.xet and sha256:
                self.send_header("X-Xet-Hash", sha256)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.content_range_total or size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if not head:
                self._send_body(repo_id, path, start, end + 1)
            return None

        def _file_fault(self, repo_id: str, path: str, size: int) -> bool:
            """Answer a file GET with the switched-on fault, if any; True when answered."""
            f = hub.faults
            with hub._lock:
                hub.bytes_served.setdefault(path, 0)
            if f.file_redirect is not None:
                location = f.file_redirect.replace("{self}", self.path)
                self.send_response(f.file_redirect_status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
            if f.body_override is not None:
                self._raw(200, f.body_override, f.body_type, length=f.body_length, count_as=path)
                return True
            if f.corrupt:
                data = bytearray(hub.read(repo_id, path))
                data[len(data) // 2] ^= 0xFF
                self._raw(200, bytes(data), "application/octet-stream", length=True, count_as=path)
                return True
            if f.endless:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                head = b"" if f.endless_garbage else hub.read(repo_id, path)
                sent = 0
                try:
                    while sent < f.endless_cap:
                        block = head[sent : sent + 65536] if sent < len(head) else b"\xa5" * 65536
                        self.wfile.write(block)
                        sent += len(block)
                        with hub._lock:
                            hub.bytes_served[path] += len(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return True
            return False

        def _send_body(self, repo_id: str, path: str, start: int, stop: int) -> None:
            f = hub.faults
            content = hub.repos[repo_id].files[path]
            # Disk-backed files (the benchmark's 256 MB blobs) are streamed, never read whole per request.
            fh = content.open("rb") if isinstance(content, Path) else None
            data = memoryview(content)[start:stop] if fh is None else None
            if fh is not None:
                fh.seek(start)
            total = stop - start
            limit = None
            if f.drop_after is not None and f.drop_count > 0:
                f.drop_count -= 1
                limit = ("drop", f.drop_after)
            elif f.stall_after is not None and f.stall_count > 0:
                f.stall_count -= 1
                limit = ("stall", f.stall_after)
            chunk = 64 * 1024 if f.rate_bps or limit else 1024 * 1024
            sent = 0
            try:
                while sent < total:
                    if limit and sent >= limit[1]:
                        if limit[0] == "stall":
                            time.sleep(f.stall_seconds)
                        self.close_connection = True
                        return
                    n = min(chunk, total - sent, (limit[1] - sent) if limit else chunk)
                    self.wfile.write(fh.read(n) if fh is not None else data[sent : sent + n])
                    sent += n
                    with hub._lock:
                        hub.bytes_served[path] = hub.bytes_served.get(path, 0) + n
                    if f.rate_bps:
                        time.sleep(n / f.rate_bps)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                if fh is not None:
                    fh.close()

        # -- small answers ----------------------------------------------------------------------------
        def _raw(self, status: int, body: bytes, content_type: str, *, length: bool, count_as: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            if count_as is not None:
                with hub._lock:
                    hub.bytes_served[count_as] = hub.bytes_served.get(count_as, 0) + len(body)

        def _redirect(self, location: str, status: int = 302) -> None:
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, obj: object, extra: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str | None, message: str, extra: dict | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _main() -> None:  # a manual server for the README's kill-and-resume walkthrough and the benchmark
    import argparse

    parser = argparse.ArgumentParser(description="Serve a folder as a Hub repo on 127.0.0.1 (test stand-in).")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repo", default="local/model")
    parser.add_argument("--rate-mbps", type=float, default=None, help="throttle each body to this many MB/s")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    args = parser.parse_args()
    files = {p.relative_to(args.folder).as_posix(): p for p in sorted(args.folder.rglob("*")) if p.is_file()}
    with HubServer(args.port) as hub:
        hub.add_repo(args.repo, files)
        for path in files:  # hash up front, so the first client doesn't pay for it
            hub.meta(args.repo, path)
        if args.rate_mbps:
            hub.faults.rate_bps = int(args.rate_mbps * 1e6)
        print(f"serving {len(files)} files of {args.folder} as {args.repo} at {hub.url}  (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    _main()
