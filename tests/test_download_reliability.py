"""Issue 14, download side: against misbehaving servers, file systems and bookkeeping, every download ends by
itself with an exit code, a message with a fix and a session-log line; never a loop, a full disk or a traceback.

One class per class of failure. Each test names what the code before issue 14 did (``Before:``). Tests whose
download could loop forever run it through ``ends()``, which fails the test when the download does not end by
itself (a bounded wait, not a synchronisation sleep).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from download_helpers import FAST, blob, scaled
from hub_server import HubServer

from qwen_core.download import DownloadHooks, DownloadOptions, download_repo, resolve_endpoint
from qwen_core.download.layout import STAGING_DIR, Placement, Staging, plan_path
from qwen_core.download.plan import load_plan
from qwen_core.download.types import (
    EXIT_DISK,
    EXIT_ERROR,
    EXIT_NETWORK,
    EXIT_OFFLINE_MISSING,
    EXIT_UNSAFE,
    EXIT_VERIFY,
    PROGRESS_MIN,
)
from qwen_core.errors import DownloadError
from qwen_core.session_log import get_session_log

pytest_plugins = ["download_fixtures"]
MB = 1_000_000
REPO = "org/reliable-model"
BIG = "transformer/w.safetensors"
SMALL = "vae/w.safetensors"
INDEX = "model_index.json"


def make_repo(hub: HubServer, size: int = 3 * MB) -> dict[str, bytes]:
    files = {INDEX: b'{"_class_name": "QwenImagePipeline"}', BIG: blob(size, 5), SMALL: blob(size // 3, 6)}
    hub.add_repo(REPO, files)
    return files


def fetch(hub: HubServer, target: Path, *, retries: int = 2, messages: list[str] | None = None,
          **options: Any) -> Any:
    """download_repo of REPO from the hub into target with FAST timeouts; messages collect the log lines."""
    hooks = DownloadHooks(on_message=(messages if messages is not None else []).append)
    opts = DownloadOptions(endpoint=options.pop("endpoint", None) or resolve_endpoint(hub.url), local_dir=target,
                           http=replace(FAST, retries=retries), **options)
    return download_repo(REPO, opts, hooks)


def ends(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """fn() on a thread; fails the test if it has not ended by itself after scaled(timeout) s."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as err:  # handed to the test below
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(scaled(timeout))
    assert not worker.is_alive(), "the download did not end by itself: an unbounded retry loop"
    if "error" in box:
        raise box["error"]
    return box["result"]


def fails(fn: Callable[[], Any], code: int, timeout: float = 60.0) -> DownloadError:
    with pytest.raises(DownloadError) as info:
        ends(fn, timeout)
    assert info.value.exit_code == code, str(info.value)
    assert info.value.fix, "every error comes with a fix"
    return info.value


def gets(hub: HubServer, path: str) -> int:
    return sum(1 for method, p, _ in hub.requests if method == "GET" and p.endswith("/" + path))


def assert_tree(target: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert (target / path).read_bytes() == data, path


def nothing_written(target: Path) -> bool:
    """No file of the repo and no byte in a partial."""
    parts = list(target.rglob("*.part")) if target.exists() else []
    return not any((target / p).exists() for p in (INDEX, BIG, SMALL)) and all(p.stat().st_size == 0 for p in parts)


def session_log() -> str:
    return get_session_log().read_text()


class TestProgressMeansNewBytes:
    def test_a_server_that_closes_every_response_early_gives_up(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: every short body counted as progress; a body of 0 bytes looped forever."""
        make_repo(hub)
        hub.faults.drop_after, hub.faults.drop_count = 0, 10**9
        err = fails(lambda: fetch(hub, tmp_path, retries=2, workers=1, allow_patterns=BIG), EXIT_NETWORK)
        assert "without new bytes" in str(err) and "run the same command again" in str(err)
        assert gets(hub, BIG) == 3  # the first attempt and --retries 2, no more

    def test_416_on_every_resume_ends(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: drop at 300 kB -> resume -> 416 -> restart from 0 -> drop at 300 kB ... forever, each drop
        counted as progress although no byte was new."""
        make_repo(hub)
        hub.faults.drop_after, hub.faults.drop_count, hub.faults.range_416 = 300_000, 10**9, 10**9
        messages: list[str] = []
        err = fails(lambda: fetch(hub, tmp_path, retries=2, workers=1, allow_patterns=BIG, messages=messages),
                    EXIT_NETWORK)
        assert "416" in " ".join(messages) and "without new bytes" in str(err)
        assert gets(hub, BIG) <= 5

    def test_a_trickle_of_tiny_pieces_is_not_progress(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: 1000 bytes per connection counted as progress: 3000 connections for a 3 MB file."""
        make_repo(hub)
        hub.faults.drop_after, hub.faults.drop_count = 1000, 10**9
        fails(lambda: fetch(hub, tmp_path, retries=2, workers=1, allow_patterns=BIG), EXIT_NETWORK)
        assert gets(hub, BIG) == 3 and PROGRESS_MIN > 1000

    def test_a_slow_but_moving_download_is_not_cut_short(self, hub: HubServer, tmp_path: Path) -> None:
        """Drops after 300 kB of new bytes each are progress: eight of them with --retries 1 still finish."""
        files = make_repo(hub)
        hub.faults.drop_after, hub.faults.drop_count = 300_000, 8
        ends(lambda: fetch(hub, tmp_path, retries=1, workers=1))
        assert_tree(tmp_path, files)

    @pytest.mark.parametrize(("retries", "fetches"), [(3, 2), (0, 1)])
    def test_content_that_never_verifies_ends_with_exit_6(self, hub: HubServer, tmp_path: Path, retries: int,
                                                         fetches: int) -> None:
        """Before: two full fetches whatever --retries said (passed for retries 3); now at most one refetch, with
        backoff, and none with --retries 0."""
        make_repo(hub)
        hub.faults.corrupt = True
        err = fails(lambda: fetch(hub, tmp_path, retries=retries, workers=1, allow_patterns=BIG), EXIT_VERIFY)
        assert "does not match the repo listing" in str(err)
        assert hub.bytes_served[BIG] == fetches * 3 * MB
        assert not (tmp_path / BIG).exists()


class TestWrongBodiesAreNotWritten:
    def test_200_with_a_body_of_the_wrong_length(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: the 33-byte answer was written as the start of the file, then "resumed" forever."""
        make_repo(hub)
        hub.faults.body_override = b"Proxy error: upstream unavailable"
        err = fails(lambda: fetch(hub, tmp_path, retries=1, workers=1), EXIT_VERIFY)
        assert "a proxy, mirror or login portal answered instead of the file" in str(err)
        assert nothing_written(tmp_path)

    @pytest.mark.parametrize(("content_type", "length"), [("text/html", True), ("application/octet-stream", False)],
                             ids=["html-type", "html-sniffed"])
    def test_an_html_page(self, hub: HubServer, tmp_path: Path, content_type: str, length: bool) -> None:
        """Before: a login page (no length, or the length of the page) became the file's first bytes."""
        make_repo(hub)
        hub.faults.body_override = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
        hub.faults.body_type, hub.faults.body_length = content_type, length
        err = fails(lambda: fetch(hub, tmp_path, retries=1, workers=1, allow_patterns="*.safetensors"), EXIT_VERIFY)
        assert "HTML page" in str(err) and nothing_written(tmp_path)

    def test_a_git_lfs_pointer_where_the_weights_belong(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: a mirror without LFS content sent the 130-byte pointer; it was written, then refetched forever."""
        files = make_repo(hub)
        sha = hashlib.sha256(files[BIG]).hexdigest()
        hub.faults.body_override = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {3 * MB}\n".encode()
        hub.faults.body_length = False  # no length: only the content can tell
        err = fails(lambda: fetch(hub, tmp_path, retries=1, workers=1, allow_patterns="*.safetensors"), EXIT_VERIFY)
        assert "Git-LFS pointer" in str(err) and nothing_written(tmp_path)

    def test_a_body_that_never_ends_is_cut_at_the_listed_size(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: a body without Content-Length that went on grew the .part without limit (here to 32 MB)."""
        files = make_repo(hub)
        hub.faults.endless = True
        messages: list[str] = []
        ends(lambda: fetch(hub, tmp_path, workers=1, messages=messages))
        assert_tree(tmp_path, files)
        assert any("sent more than the listed" in m for m in messages)
        assert hub.bytes_served[BIG] < hub.faults.endless_cap  # we stopped reading, the server did not stop sending

    def test_an_endless_body_of_garbage_ends_with_exit_6(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        hub.faults.endless = hub.faults.endless_garbage = True
        fails(lambda: fetch(hub, tmp_path, workers=1, allow_patterns=BIG), EXIT_VERIFY)
        assert hub.bytes_served[BIG] < 2 * hub.faults.endless_cap and not (tmp_path / BIG).exists()

    def test_206_for_a_file_of_another_size(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: a Content-Range total that is not the listed size was not looked at."""
        files = make_repo(hub)
        stage = Staging.for_file(tmp_path, BIG)
        stage.part.parent.mkdir(parents=True)
        stage.part.write_bytes(files[BIG][:MB])
        stage.sidecar.write_text(json.dumps({"path": BIG, "size": 3 * MB, "etag": None,
                                             "sha256": hashlib.sha256(files[BIG]).hexdigest()}))
        hub.faults.content_range_total = 5 * MB
        err = fails(lambda: fetch(hub, tmp_path, retries=1, workers=1, allow_patterns=BIG), EXIT_VERIFY)
        assert "5,000,000-byte file" in str(err) and stage.part.stat().st_size == MB

    def test_a_3xx_without_location(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: a 302 without Location was streamed as the body (exit 5 after the retries)."""
        make_repo(hub)
        hub.faults.file_redirect = ""
        err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_UNSAFE)
        assert "without a usable Location" in str(err) and nothing_written(tmp_path)


class TestRedirects:
    def test_a_redirect_loop_on_a_file(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: requests.TooManyRedirects escaped as a traceback after 30 hops."""
        make_repo(hub)
        hub.faults.file_redirect = "{self}"
        err = fails(lambda: fetch(hub, tmp_path, retries=1, workers=1, allow_patterns=BIG), EXIT_NETWORK)
        assert "redirect loop" in str(err) and gets(hub, BIG) <= 2 * 11

    @pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/x", "javascript:alert(1)"])
    def test_a_redirect_to_a_non_http_address(self, hub: HubServer, tmp_path: Path, location: str) -> None:
        """Before: requests.InvalidSchema escaped as a traceback."""
        make_repo(hub)
        hub.faults.file_redirect = location
        err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_UNSAFE)
        assert "non-http" in str(err) and nothing_written(tmp_path)

    @pytest.mark.parametrize("location", ["http://[::1/x", "http://127.0.0.1:99999/x", "http://exa mple.com/x"])
    def test_a_malformed_location(self, hub: HubServer, tmp_path: Path, location: str) -> None:
        """Before: requests.InvalidURL (or urllib3's LocationParseError) escaped as a traceback."""
        make_repo(hub)
        hub.faults.file_redirect = location
        err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_UNSAFE)
        assert "malformed redirect" in str(err) and nothing_written(tmp_path)

    def test_a_redirect_loop_on_the_listing(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        hub.faults.api_redirect = f"/api/models/{REPO}/revision/main"
        err = fails(lambda: fetch(hub, tmp_path, retries=1), EXIT_NETWORK)
        assert "redirect loop" in str(err) and not tmp_path.joinpath(STAGING_DIR).exists()

    def test_a_listing_redirect_to_a_non_http_address(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: httpx's UnsupportedProtocol was retried as a network error (exit 5)."""
        make_repo(hub)
        hub.faults.api_redirect = "file:///etc/passwd"
        fails(lambda: fetch(hub, tmp_path), EXIT_UNSAFE)


class TestListings:
    def test_a_portal_page_instead_of_the_listing(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: the JSON decode error of HfApi escaped as a traceback."""
        make_repo(hub)
        hub.faults.api_body = b"<html><body>Please log in to the hotel Wi-Fi</body></html>"
        err = fails(lambda: fetch(hub, tmp_path, retries=1), EXIT_NETWORK)
        assert "is not JSON" in str(err) and "portal" in str(err) and hub.url.split("//")[1] in str(err)

    def test_a_next_page_link_that_never_ends(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: HfApi followed a "next" link to the same page forever."""
        make_repo(hub)
        hub.faults.tree_next = f"{hub.url}/api/models/{REPO}/tree/{hub.repos[REPO].commit}?recursive=true"
        err = fails(lambda: fetch(hub, tmp_path), EXIT_UNSAFE)
        assert "never ends" in str(err)

    @pytest.mark.parametrize(("entry", "said"), [
        ({"type": "file", "path": "vae", "size": 4, "oid": "0" * 40}, "both as a file and as a folder"),
        ({"type": "file", "path": INDEX, "size": 5, "oid": "1" * 40}, "twice"),
        ({"type": "file", "path": "x.bin", "size": "abc", "oid": "0" * 40}, "size 'abc'"),
        ({"type": "file", "path": "x.bin", "size": -1, "oid": "0" * 40}, "size -1"),
        ({"type": "file", "path": "x.bin", "size": 9, "lfs": {"oid": "zz"}}, "sha256 'zz'"),
        ({"type": "file", "path": 7, "size": 9}, "not text"),
    ], ids=["file-and-folder", "twice", "size-text", "size-negative", "bad-sha256", "name-not-text"])
    def test_a_listing_that_cannot_be_a_repo_is_refused_whole(self, hub: HubServer, tmp_path: Path,
                                                              entry: dict, said: str) -> None:
        """Before: a file and a folder of one name ended in NotADirectoryError/IsADirectoryError half-way; a text
        size in a ValueError traceback; a negative size was accepted."""
        make_repo(hub)
        hub.repos[REPO].extra_tree.append(entry)
        err = fails(lambda: fetch(hub, tmp_path / "m"), EXIT_UNSAFE)
        assert said in str(err) and not (tmp_path / "m").exists()


@contextmanager
def refused_writes(root: Path, err: int = errno.ENOSPC, only: Callable[[str], bool] = lambda path: True) -> Iterator[None]:
    """Every write, create, mkdir or rename under ``root`` fails with ``err`` (a full disk), reads still work."""
    base = os.path.abspath(root)

    def refused(path: object) -> bool:
        try:
            text = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False
        return text.startswith(base) and only(text)

    def guard(fn: Callable[..., Any], is_write: Callable[..., bool]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if args and is_write(*args, **kwargs) and refused(args[0]):
                raise OSError(err, os.strerror(err), os.fsdecode(args[0]))
            return fn(*args, **kwargs)

        return wrapper

    writes_mode = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    writes_flags = lambda path, flags, *a, **k: bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))  # noqa: E731
    always = lambda *a, **k: True  # noqa: E731
    patch = pytest.MonkeyPatch()  # its own: undoing it must not undo the test's other patches
    try:
        patch.setattr(builtins, "open", guard(builtins.open, writes_mode))
        patch.setattr(io, "open", guard(io.open, writes_mode))
        patch.setattr(os, "open", guard(os.open, writes_flags))
        patch.setattr(os, "mkdir", guard(os.mkdir, always))
        patch.setattr(os, "replace", guard(os.replace, always))
        patch.setattr(os, "rename", guard(os.rename, always))
        yield
    finally:
        patch.undo()


class TestFileSystems:
    def test_a_name_too_long_for_the_file_system(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: ENAMETOOLONG escaped from the lock file's os.open as a traceback."""
        files = make_repo(hub)
        name = "transformer/" + "x" * 300 + ".safetensors"
        hub.add_repo(REPO, {**files, name: b"w" * 2000})
        err = fails(lambda: fetch(hub, tmp_path), EXIT_DISK)
        assert "too long for the file system" in str(err) and "--ignore" in str(err)
        assert gets(hub, BIG) == 0, "refused before fetching anything"

    def test_a_long_name_that_fits_downloads(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: the name fit, but "<name>.part.json.<pid>.<thread>.tmp" did not: ENAMETOOLONG traceback."""
        files = make_repo(hub)
        files["transformer/" + "y" * 240 + ".bin"] = blob(5000, 9)
        hub.add_repo(REPO, files)
        ends(lambda: fetch(hub, tmp_path))
        assert_tree(tmp_path, files)
        ends(lambda: fetch(hub, tmp_path))  # and the record of it is found again

    def test_a_component_folder_on_another_file_system(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: os.replace from .qwen_download/ into the symlinked folder failed with EXDEV (traceback)."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("needs /dev/shm on another file system than the temp folder")
        files = make_repo(hub)
        other = Path(tempfile.mkdtemp(prefix="qwen-dl-test-", dir=shm))
        try:
            (tmp_path / "transformer").symlink_to(other, target_is_directory=True)
            ends(lambda: fetch(hub, tmp_path))
            assert_tree(tmp_path, files)
            assert (other / "w.safetensors").read_bytes() == files[BIG]
            assert not (other / STAGING_DIR).exists(), "the staging folder on the other disk is cleaned up"
            hub.reset_counters()
            ends(lambda: fetch(hub, tmp_path))
            assert hub.total_served() == 0
        finally:
            shutil.rmtree(other, ignore_errors=True)

    def test_a_file_system_without_flock(self, hub: HubServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """Before: flock's ENOLCK (some NFS/SMB/FUSE mounts) escaped as a traceback."""
        import qwen_core.download.file_lock as file_lock

        def no_flock(fd: int, op: int) -> None:
            raise OSError(errno.ENOLCK, "No locks available")

        files = make_repo(hub)
        monkeypatch.setattr(file_lock.fcntl, "flock", no_flock)
        messages: list[str] = []
        ends(lambda: fetch(hub, tmp_path, messages=messages))
        assert_tree(tmp_path, files)
        assert sum("no file locks" in m for m in messages) == 1

    @pytest.mark.parametrize("in_the_way", [INDEX, "transformer"], ids=["folder-for-file", "file-for-folder"])
    def test_something_local_in_the_way(self, hub: HubServer, tmp_path: Path, in_the_way: str) -> None:
        """Before: IsADirectoryError / FileExistsError after the file had been downloaded."""
        make_repo(hub)
        if in_the_way == INDEX:
            (tmp_path / INDEX).mkdir(parents=True)
        else:
            (tmp_path / in_the_way).write_text("not a folder")
        err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_DISK)
        assert "in the way" in str(err) and in_the_way in str(err)

    @pytest.mark.parametrize("which", ["plan.json", ".part.json", ".ok"])
    def test_no_space_for_a_bookkeeping_file(self, hub: HubServer, tmp_path: Path,
                                             which: str) -> None:
        """Before: OSError(ENOSPC) from writing plan.json, a sidecar or a record escaped as a traceback."""
        files = make_repo(hub)
        with refused_writes(tmp_path, only=lambda p: f"{which}." in os.path.basename(p)):
            err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_DISK)
        assert "No space left" in str(err) or "Disk full" in str(err)
        assert not list(tmp_path.rglob("*.tmp")), "no temp file is left behind"
        ends(lambda: fetch(hub, tmp_path))  # space is back: the same call finishes
        assert_tree(tmp_path, files)

    def test_a_file_size_limit_is_not_a_full_disk(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: EFBIG said "Disk full ... Free at least 0 B" with gigabytes free."""
        make_repo(hub)
        with refused_writes(tmp_path, errno.EFBIG, only=lambda p: p.endswith(".part")):
            err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_DISK)
        assert "file-size limit" in str(err) and "Disk full" not in str(err) and "0 B" not in str(err)

    def test_a_full_disk_never_asks_to_free_0_bytes(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: ENOSPC with space free again by the time of the message said "Free at least 0 B"."""
        make_repo(hub)
        with refused_writes(tmp_path, only=lambda p: p.endswith(".part")):
            err = fails(lambda: fetch(hub, tmp_path, workers=1), EXIT_DISK)
        assert "Disk full" in str(err) and "at least 0 B" not in str(err) and "filled the disk" in str(err)


class TestCompleteNeedsNoWrites:
    def test_a_complete_model_is_reported_complete_on_a_full_disk(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: the rerun of a branch probed the folder with a write and failed with exit 7."""
        files = make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        hub.reset_counters()
        with refused_writes(tmp_path):
            result = ends(lambda: fetch(hub, tmp_path))
        assert result.files_present == len(files) and result.bytes_fetched == 0
        assert not any("/resolve/" in p for _, p, _ in hub.requests)

    def test_even_when_the_listing_cannot_be_saved(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        plan_path(tmp_path).unlink()
        messages: list[str] = []
        with refused_writes(tmp_path):
            result = ends(lambda: fetch(hub, tmp_path, messages=messages))
        assert result.files_present == len(files)
        assert any("could not save the listing" in m for m in messages)


class TestSessionLog:
    def test_an_auth_error_is_logged_with_its_fix(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: a 401 left only "session started" in the log."""
        make_repo(hub)
        hub.faults.require_token = "hf_NotTheUsersTokenAtAll"
        fails(lambda: fetch(hub, tmp_path / "auth-case"), 3)
        log = session_log()
        assert f"ERROR   download {REPO}: DownloadError" in log and "Fix: Accept its terms" in log

    def test_a_connection_error_is_logged_with_the_host(self, hub: HubServer, tmp_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again below: nothing listens there
        endpoint = resolve_endpoint(f"http://127.0.0.1:{port}")
        err = fails(lambda: fetch(hub, tmp_path, endpoint=endpoint, retries=1), EXIT_NETWORK)
        assert f"127.0.0.1:{port}" in str(err) and f"127.0.0.1:{port}" in session_log()

    def test_an_unexpected_error_is_an_exit_code_with_the_traceback_in_the_log(
            self, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Before: a bug's exception reached the user as a traceback."""
        import qwen_core.download.engine as engine

        make_repo(hub)

        def broken(*args: object) -> bool:
            raise RuntimeError("a bug in the engine")

        monkeypatch.setattr(engine, "record_matches", broken)
        err = fails(lambda: fetch(hub, tmp_path), EXIT_ERROR)
        assert "RuntimeError: a bug in the engine" in str(err) and "session log" in str(err)
        assert "Traceback (most recent call last)" in session_log()

    def test_the_commit_of_a_branch_is_printed_and_logged(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        messages: list[str] = []
        ends(lambda: fetch(hub, tmp_path, messages=messages))
        line = f"{REPO}@main is commit {hub.repos[REPO].commit}"
        assert any(line in m for m in messages) and line in session_log()


class TestVerify:
    def flip_a_byte_keeping_mtime(self, path: Path) -> None:
        st = path.stat()
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def test_verify_finds_a_flipped_byte_that_size_and_mtime_miss(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: no verify option; later runs checked size and mtime only."""
        files = make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        self.flip_a_byte_keeping_mtime(tmp_path / SMALL)
        quick = ends(lambda: fetch(hub, tmp_path))
        assert quick.files_present == 3 and (tmp_path / SMALL).read_bytes() != files[SMALL]  # the documented limit
        messages: list[str] = []
        checked = ends(lambda: fetch(hub, tmp_path, verify=True, messages=messages))
        assert_tree(tmp_path, files)
        assert checked.files_present == 2 and any(f"{SMALL}: the local copy does not match" in m for m in messages)

    def test_offline_verify_names_the_damaged_file(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        self.flip_a_byte_keeping_mtime(tmp_path / BIG)
        ends(lambda: fetch(hub, tmp_path, offline=True))  # records match: passes without re-hashing
        err = fails(lambda: fetch(hub, tmp_path, offline=True, verify=True), EXIT_OFFLINE_MISSING)
        assert BIG in str(err)


PLAN_DAMAGE: dict[str, Callable[[dict], object]] = {
    "not-json": lambda plan: "{oops",
    "a-list": lambda plan: [],
    "repo-id-number": lambda plan: {**plan, "repo_id": 5},
    "revision-escapes": lambda plan: {**plan, "revision": "../x"},
    "commit-number": lambda plan: {**plan, "commit": 123},
    "commit-missing": lambda plan: {k: v for k, v in plan.items() if k != "commit"},
    "files-not-a-list": lambda plan: {**plan, "files": "x"},
    "file-entry-number": lambda plan: {**plan, "files": [5]},
    "file-entry-extra-key": lambda plan: {**plan, "files": [{**plan["files"][0], "evil": 1}]},
    "path-escapes": lambda plan: {**plan, "files": [{**plan["files"][0], "path": "../evil.bin"}]},
    "path-number": lambda plan: {**plan, "files": [{**plan["files"][0], "path": 7}]},
    "size-text": lambda plan: {**plan, "files": [{**f, "size": "12"} for f in plan["files"]]},
    "size-negative": lambda plan: {**plan, "files": [{**f, "size": -1} for f in plan["files"]]},
    "size-bool": lambda plan: {**plan, "files": [{**f, "size": True} for f in plan["files"]]},
    "sha256-not-hex": lambda plan: {**plan, "files": [{**f, "sha256": "zz"} for f in plan["files"]]},
    "etag-number": lambda plan: {**plan, "files": [{**f, "etag": 5} for f in plan["files"]]},
    "file-and-folder": lambda plan: {**plan, "files": [*plan["files"], {"path": "vae", "size": 1, "sha256": None,
                                                                         "etag": "0" * 40}]},
}


class TestDamagedBookkeeping:
    @pytest.mark.parametrize("damage", list(PLAN_DAMAGE), ids=list(PLAN_DAMAGE))
    @pytest.mark.parametrize("by", ["branch", "commit"])
    def test_a_damaged_plan_is_rebuilt_and_never_blamed_on_the_server(self, hub: HubServer, tmp_path: Path,
                                                                       damage: str, by: str) -> None:
        """Before: a bad name in plan.json was reported as "The server listed an unsafe filename" (exit 8), and
        fields of the wrong type ended in TypeError/AttributeError tracebacks."""
        files = make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        good = json.loads(plan_path(tmp_path).read_text())
        broken = PLAN_DAMAGE[damage](good)
        plan_path(tmp_path).write_text(broken if isinstance(broken, str) else json.dumps(broken))
        messages: list[str] = []
        revision = "main" if by == "branch" else hub.repos[REPO].commit
        ends(lambda: fetch(hub, tmp_path, revision=revision, messages=messages))
        assert_tree(tmp_path, files)
        blamed = [m for m in messages if "unsafe" in m and "saved listing is damaged" not in m]
        assert not blamed and not any("server listed" in m for m in messages)
        if by == "commit":
            assert any("saved listing is damaged" in m for m in messages)
        assert load_plan(Placement.tree(tmp_path)) is not None and json.loads(plan_path(tmp_path).read_text())["files"]

    def test_offline_with_a_damaged_plan_says_so(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        plan_path(tmp_path).write_text(json.dumps({"repo_id": REPO, "files": [{"path": "../x"}]}))
        err = fails(lambda: fetch(hub, tmp_path, offline=True), EXIT_OFFLINE_MISSING)
        assert "the saved listing" in str(err) and "damaged" in str(err) and "unsafe" not in str(err)

    @pytest.mark.parametrize("which", ["record", "sidecar", "lock"])
    def test_bookkeeping_files_of_the_wrong_json_shape(self, hub: HubServer, tmp_path: Path, which: str) -> None:
        """Before: a record or sidecar holding a JSON list raised AttributeError ('list' has no 'get')."""
        files = make_repo(hub)
        ends(lambda: fetch(hub, tmp_path))
        stage = Staging.for_file(tmp_path, BIG)
        if which == "sidecar":
            (tmp_path / BIG).unlink()
            stage.part.write_bytes(files[BIG][:MB])
        path = {"record": stage.record, "sidecar": stage.sidecar, "lock": stage.lock}[which]
        path.write_text("[1, 2]")
        ends(lambda: fetch(hub, tmp_path))
        assert_tree(tmp_path, files)


class TestNodeWords:
    """The Downloader node's errors name its fields and the host it tried, not the CLI's flags."""

    @pytest.fixture
    def node(self, online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
        import qwen_core.download.engine as engine
        import qwen_core.download.listing as listing
        from nodes.downloader import QwenImageDownloader

        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "store"))
        monkeypatch.setattr(listing, "backoff_delay", lambda failures, cfg: 0.0)  # the node's default retries, fast
        monkeypatch.setattr(engine, "backoff_delay", lambda failures, cfg: 0.0)
        return QwenImageDownloader()

    def test_an_unreachable_endpoint(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        """Before: "Check the network or --endpoint / HF_ENDPOINT", and no host."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        with pytest.raises(DownloadError) as info:
            node.download("org/m", "main", "", "", 1, "")
        text = str(info.value)
        assert f"127.0.0.1:{port}" in text and "the `endpoint` field" in text and "--" not in text

    def test_a_missing_revision(self, node: Any, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
        make_repo(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(DownloadError) as info:
            node.download(REPO, "v9", "", "", 1, "")
        assert "the `revision` field" in str(info.value) and "--revision" not in str(info.value)

    def test_offline_without_a_copy(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(DownloadError) as info:
            node.download(REPO, "main", "", "", 1, "")
        assert "environment that starts ComfyUI" in str(info.value) and "--offline" not in str(info.value)

    def test_the_verify_widget(self, node: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        import nodes.downloader as downloader

        spec = type(node).INPUT_TYPES()["required"]["verify"]
        assert spec[0] == "BOOLEAN" and spec[1]["default"] is False and spec[1]["tooltip"]
        seen: dict[str, Any] = {}

        def fake(repo_id: str, options: DownloadOptions, hooks: DownloadHooks) -> None:
            seen["options"] = options
            raise RuntimeError("stop")

        monkeypatch.setattr(downloader, "download_repo", fake)
        with pytest.raises(RuntimeError):
            node.download(REPO, "main", "", "", 1, "", verify=True)
        assert seen["options"].verify is True and seen["options"].words.endpoint.startswith("the `endpoint`")
