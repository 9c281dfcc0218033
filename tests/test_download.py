"""qwen_core.download against the fault-injecting Hub stand-in (tests/hub_server.py) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from download_helpers import FAST, blob
from hub_server import HubServer

from qwen_core.download import (
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    Endpoint,
    download_repo,
    resolve_endpoint,
)
from qwen_core.download.cleanup import cleanup_partials
from qwen_core.download.file_lock import FileLock
from qwen_core.download.layout import STAGING_DIR, Staging
from qwen_core.download.types import (
    EXIT_AUTH,
    EXIT_DISK,
    EXIT_LOCKED,
    EXIT_NETWORK,
    EXIT_NOT_FOUND,
    EXIT_OFFLINE_MISSING,
    EXIT_UNSAFE,
)
from qwen_core.errors import DownloadCancelled, DownloadError, InvalidInputError

pytest_plugins = ["download_fixtures"]  # the `hub` and `online` fixtures
MB = 1_000_000
REPO = "org/tiny-model"


def make_repo(hub: HubServer, size: int = 3 * MB, seed: int = 0) -> dict[str, bytes]:
    files = {"model_index.json": b'{"_class_name": "QwenImagePipeline"}', "transformer/w.safetensors": blob(size, seed),
             "vae/w.safetensors": blob(size // 3, seed + 1)}
    hub.add_repo(REPO, files)
    return files


def get(hub: HubServer, target: Path, **kw):  # noqa: ANN201
    """download_repo of REPO from `hub` into `target`; keyword arguments are DownloadOptions fields, plus the hooks
    (progress, should_cancel), `config` (the HttpConfig, FAST by default), `retries` and `redirect_guard`."""
    messages: list[str] = []
    hooks = DownloadHooks(progress=kw.pop("progress", None), should_cancel=kw.pop("should_cancel", None),
                          on_message=messages.append)
    http = kw.pop("config", FAST)
    if "retries" in kw:
        http = replace(http, retries=kw.pop("retries"))
    endpoint = resolve_endpoint(hub.url)
    if "redirect_guard" in kw:
        endpoint = replace(endpoint, redirect_guard=kw.pop("redirect_guard"))
    result = download_repo(REPO, DownloadOptions(endpoint=endpoint, local_dir=target, http=http, **kw), hooks)
    return result, messages


def assert_tree(target: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        p = target / path
        assert p.is_file() and not p.is_symlink(), path
        assert hashlib.sha256(p.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), path
    assert not list((target / STAGING_DIR).rglob("*.part")), "no partial may remain after success"


def seed_partial(hub: HubServer, target: Path, path: str, data: bytes, n: int) -> Staging:
    """A .part holding the first n bytes plus a sidecar, as a killed run leaves it."""
    stage = Staging.for_file(target, path)
    stage.part.parent.mkdir(parents=True, exist_ok=True)
    stage.part.write_bytes(data[:n])
    sha = hashlib.sha256(data).hexdigest()
    stage.sidecar.write_text(json.dumps({"path": path, "size": len(data), "sha256": sha, "etag": None}))
    return stage


class TestBasics:
    def test_download_repo_takes_a_typed_options_object(self) -> None:
        import inspect

        params = inspect.signature(download_repo).parameters
        assert list(params) == ["repo_id", "options", "hooks"] and len(params) <= 4
        with pytest.raises(InvalidInputError, match="engine"):
            DownloadOptions(engine="turbo")
        assert DownloadOptions(allow_patterns="a.json\n b/*, ").allow_patterns == ("a.json", "b/*")
        assert "hf_" not in repr(DownloadOptions(token="hf_SecretTokenValue12345"))

    def test_downloads_real_verified_files_and_never_refetches(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        seen: list[DownloadProgress] = []
        result, _ = get(hub, tmp_path / "m", progress=seen.append)
        assert_tree(tmp_path / "m", files)
        assert result.bytes_fetched == sum(map(len, files.values())) and result.commit == hub.repos[REPO].commit
        assert seen[-1].phase == "done" and seen[-1].bytes_done == seen[-1].bytes_total
        hub.reset_counters()
        again, _ = get(hub, tmp_path / "m")
        assert hub.total_served() == 0 and again.files_present == 3

    def test_allow_and_ignore_patterns(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        result, _ = get(hub, tmp_path, allow_patterns=["*.json", "transformer/*"], ignore_patterns="*.safetensors")
        assert result.files == ("model_index.json",)
        assert not (tmp_path / "transformer").exists()

    def test_patterns_from_the_node_text_box_split_on_newlines_and_commas(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        result, _ = get(hub, tmp_path, allow_patterns="model_index.json\n vae/*, ", dry_run=True)
        assert result.files == ("model_index.json", "vae/w.safetensors")

    def test_dry_run_writes_nothing(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        result, _ = get(hub, tmp_path / "m", dry_run=True)
        assert result.dry_run and result.bytes_total == sum(map(len, files.values()))
        assert not (tmp_path / "m").exists() and hub.total_served() == 0

    def test_size_change_of_a_verified_file_is_noticed(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        get(hub, tmp_path)
        (tmp_path / "vae/w.safetensors").write_bytes(b"truncated")
        result, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("does not match" in m for m in messages) and result.files_present == 2


class TestResume:
    @pytest.mark.parametrize("pipeline_hash", [True, False], ids=["hash-thread", "hash-inline"])
    def test_valid_partial_is_resumed_fetching_only_the_tail(self, hub: HubServer, tmp_path: Path,
                                                             pipeline_hash: bool) -> None:
        files = make_repo(hub)
        data = files["transformer/w.safetensors"]
        seed_partial(hub, tmp_path, "transformer/w.safetensors", data, 2 * MB)
        hub.faults.drop_after, hub.faults.drop_count = 300_000, 2  # and two drops on the way
        result, messages = get(hub, tmp_path, config=replace(FAST, pipeline_hash=pipeline_hash))
        assert_tree(tmp_path, files)
        assert hub.bytes_served["transformer/w.safetensors"] == len(data) - 2 * MB
        assert any("resuming at 2.0 MB" in m for m in messages) and result.files_resumed == 1

    def test_corrupted_partial_is_discarded_and_refetched(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        data = files["transformer/w.safetensors"]
        stage = seed_partial(hub, tmp_path, "transformer/w.safetensors", data, MB)
        stage.part.write_bytes(b"\0" * MB)  # right length, wrong bytes: only the hash can tell
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("verification failed" in m for m in messages)

    def test_partial_of_changed_source_is_discarded(self, hub: HubServer, tmp_path: Path) -> None:
        old = blob(3 * MB, seed=7)
        seed_partial(hub, tmp_path, "transformer/w.safetensors", old, MB)
        files = make_repo(hub)  # the server now has different content under the same name
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("changed on the server" in m for m in messages)

    def test_partial_without_sidecar_is_discarded(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        stage = seed_partial(hub, tmp_path, "transformer/w.safetensors", files["transformer/w.safetensors"], MB)
        stage.sidecar.unlink()
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("no readable sidecar" in m for m in messages)

    def test_server_without_range_support_restarts_the_file(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        seed_partial(hub, tmp_path, "transformer/w.safetensors", files["transformer/w.safetensors"], MB)
        hub.faults.no_range = True
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("ignores Range" in m for m in messages)

    def test_resume_through_a_cdn_redirect_keeps_the_range(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        data = files["transformer/w.safetensors"]
        seed_partial(hub, tmp_path, "transformer/w.safetensors", data, MB)
        hub.faults.redirect_lfs = True
        get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert ("GET", f"/cdn/{REPO}/{hub.repos[REPO].commit}/transformer/w.safetensors", f"bytes={MB}-") in hub.requests
        assert hub.bytes_served["transformer/w.safetensors"] == len(data) - MB

    def test_416_on_resume_restarts_the_file(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        seed_partial(hub, tmp_path, "transformer/w.safetensors", files["transformer/w.safetensors"], MB)
        hub.faults.range_416 = 1
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("416" in m and "from 0" in m for m in messages)

    def test_repo_updated_between_runs_replaces_the_old_file(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub, seed=1)
        get(hub, tmp_path)
        files = make_repo(hub, seed=2)
        get(hub, tmp_path)
        assert_tree(tmp_path, files)


class TestFaults:
    def test_dropped_connections_resume_with_range(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.drop_after, hub.faults.drop_count = 300_000, 4
        get(hub, tmp_path, workers=1)
        assert_tree(tmp_path, files)
        assert any(r and r.startswith("bytes=") for _, _, r in hub.requests)
        assert hub.total_served() == sum(map(len, files.values())), "a resume must not refetch bytes"

    def test_5xx_storm_then_success(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.status_burst, hub.faults.burst_status = 3, 503
        _, messages = get(hub, tmp_path, retries=3, workers=1)
        assert_tree(tmp_path, files)
        assert sum("server answered 503" in m for m in messages) == 3

    def test_5xx_forever_gives_up_with_network_exit_code(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        hub.faults.status_burst, hub.faults.burst_status = 1000, 500
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, retries=2, workers=1)
        assert info.value.exit_code == EXIT_NETWORK and "run the same command again" in str(info.value)

    def test_429_honours_retry_after(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.status_burst, hub.faults.burst_status, hub.faults.retry_after = 1, 429, "1"
        _, messages = get(hub, tmp_path, workers=1)
        assert_tree(tmp_path, files)
        assert any("server answered 429; retrying in 1.0 s" in m for m in messages)

    def test_stalled_server_times_out_and_retries(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.stall_after, hub.faults.stall_count, hub.faults.stall_seconds = 200_000, 1, 3 * FAST.read_timeout
        _, messages = get(hub, tmp_path, workers=1)
        assert_tree(tmp_path, files)
        assert any("stalled" in m or "connection error" in m for m in messages)

    def test_api_5xx_is_retried(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.api_status, hub.faults.api_status_count = 502, 2
        get(hub, tmp_path)
        assert_tree(tmp_path, files)


class TestLocalFirst:
    def test_complete_copy_of_a_commit_returns_without_network(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        get(hub, tmp_path)
        hub.reset_counters()
        result, _ = get(hub, tmp_path, revision=hub.repos[REPO].commit)
        assert not hub.requests and result.engine == "local" and result.files_present == len(files)

    def test_unreachable_hub_falls_back_to_the_verified_local_copy(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        get(hub, tmp_path)
        hub.faults.api_status, hub.faults.api_status_count = 503, 100
        result, messages = get(hub, tmp_path, retries=1)
        assert result.engine == "local" and any("could not be reached" in m for m in messages)
        with pytest.raises(DownloadError) as info:  # no local copy: the network error stands
            get(hub, tmp_path / "other", retries=1)
        assert info.value.exit_code == EXIT_NETWORK

    def test_hf_endpoint_env_is_used(self, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        files = make_repo(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        download_repo(REPO, DownloadOptions(local_dir=tmp_path, http=FAST))
        assert_tree(tmp_path, files)


class TestClearErrors:
    def test_invalid_commit_from_server_is_refused(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        hub.repos[REPO].revisions["main"] = "../../x"
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path / "m")
        assert info.value.exit_code == EXIT_UNSAFE and not (tmp_path / "m").exists()

    def test_missing_repo(self, hub: HubServer, tmp_path: Path) -> None:
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path)
        assert info.value.exit_code == EXIT_NOT_FOUND and "not found" in str(info.value)

    def test_missing_revision(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, revision="v9")
        assert info.value.exit_code == EXIT_NOT_FOUND and "Revision 'v9'" in str(info.value)

    def test_gated_repo_needs_token_which_is_never_logged(self, hub: HubServer, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        files = make_repo(hub)
        secret = "hf_SecretTokenValue12345"
        hub.faults.require_token = secret
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path)
        assert info.value.exit_code == EXIT_AUTH and "HF_TOKEN" in str(info.value)
        monkeypatch.setenv("HF_TOKEN", secret)
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        from qwen_core.session_log import get_session_log

        assert secret not in get_session_log().read_text() and not any(secret in m for m in messages)

    @pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a\\..\\evil.txt", "C:/evil.txt",
                                      "//server/share/evil.txt", "ok/../../evil.txt", f"{STAGING_DIR}/plan.json"])
    def test_hostile_names_refuse_the_download(self, hub: HubServer, tmp_path: Path, name: str) -> None:
        make_repo(hub)
        hub.repos[REPO].extra_tree.append({"type": "file", "path": name, "size": 4, "oid": "0" * 40})
        before = sorted(tmp_path.parent.rglob("*evil*"))
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path / "out")
        assert info.value.exit_code == EXIT_UNSAFE
        assert not (tmp_path / "out").exists() and sorted(tmp_path.parent.rglob("*evil*")) == before
        assert not any(r[1].endswith("evil.txt") for r in hub.requests)

    @pytest.mark.parametrize("workers", [0, 65, 2.5, True, "8"])
    def test_bad_worker_count_is_named(self, tmp_path: Path, workers: object) -> None:
        with pytest.raises(InvalidInputError, match="workers"):
            download_repo(REPO, DownloadOptions(local_dir=tmp_path, workers=workers, offline=True))

    def test_unwritable_target(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        (tmp_path / "file").write_text("x")  # a file where a folder should be: mkdir fails even for root
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path / "file" / "m")
        assert info.value.exit_code == EXIT_DISK and "cannot be written" in str(info.value)


class TestRedirectGuard:
    """A workflow endpoint passed the public-address check; its redirects must pass it too (SSRF)."""

    def test_every_redirect_target_goes_through_the_guard(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.redirect_lfs = True
        seen: list[str] = []
        get(hub, tmp_path, redirect_guard=seen.append)
        assert_tree(tmp_path, files)
        assert any(f"/cdn/{REPO}/" in url for url in seen), seen

    def test_a_refused_redirect_stops_without_following_it(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        hub.faults.redirect_lfs = True

        def refuse_cdn(url: str) -> None:
            if "/cdn/" in url:
                raise InvalidInputError("endpoint", f"{url!r} resolves to a non-public address")

        with pytest.raises(DownloadError, match="redirected to a refused address") as info:
            get(hub, tmp_path, redirect_guard=refuse_cdn)
        assert info.value.exit_code == EXIT_UNSAFE
        assert not any(path.startswith("/cdn/") for _, path, _ in hub.requests)  # the hop was never taken
        assert not (tmp_path / "transformer" / "w.safetensors").exists()


class TestListingRedirectGuard:
    """Regression (issue 9): the repo listing went through huggingface_hub's client, which follows redirects
    unchecked, so a workflow-only endpoint could 302 the listing call to the LAN or the metadata address."""

    @staticmethod
    def workflow_endpoint(hub: HubServer) -> Endpoint:
        # The test server stands in for a public mirror typed into a workflow: a fake DNS says "localhost" is public.
        port = hub.url.rsplit(":", 1)[1]
        return resolve_endpoint(f"http://localhost:{port}", source="workflow", env={},
                                resolver=lambda host, port: {"localhost": ["93.184.216.34"]}[host])

    @staticmethod
    def spy_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
        connected: list[object] = []
        real_connect = socket.socket.connect

        def connect(sock: socket.socket, address: object) -> object:
            connected.append(address)
            if address[0] not in ("127.0.0.1", "::1"):  # never let the test itself reach another host
                raise ConnectionRefusedError(f"test: connection to {address} blocked")
            return real_connect(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)
        return connected

    @pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/api/models/x",
                                        "http://127.0.0.1:9/api/models/x"])
    def test_listing_302_to_a_private_address_is_refused_before_connecting(
            self, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
        make_repo(hub)
        hub.faults.api_redirect = target
        connected = self.spy_connections(monkeypatch)
        with pytest.raises(DownloadError) as info:
            download_repo(REPO, DownloadOptions(endpoint=self.workflow_endpoint(hub), local_dir=tmp_path / "m",
                                                http=FAST))
        assert info.value.exit_code == EXIT_UNSAFE and "refused address" in str(info.value)
        assert not (tmp_path / "m").exists(), "nothing may be written"
        assert all(address[0] in ("127.0.0.1", "::1") for address in connected), connected
        assert [path for _, path, _ in hub.requests] == [f"/api/models/{REPO}/revision/main"]

    def test_next_page_link_to_a_private_address_is_refused(self, hub: HubServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        make_repo(hub)
        hub.faults.tree_next = "http://169.254.169.254/latest/meta-data/"
        connected = self.spy_connections(monkeypatch)
        with pytest.raises(DownloadError) as info:
            download_repo(REPO, DownloadOptions(endpoint=self.workflow_endpoint(hub), local_dir=tmp_path / "m",
                                                http=FAST))
        assert info.value.exit_code == EXIT_UNSAFE
        assert not (tmp_path / "m").exists() and all(a[0] in ("127.0.0.1", "::1") for a in connected)

    def test_the_same_workflow_endpoint_downloads_when_it_does_not_redirect(self, hub: HubServer,
                                                                           tmp_path: Path) -> None:
        files = make_repo(hub)
        endpoint = self.workflow_endpoint(hub)
        assert endpoint.redirect_guard is not None and not endpoint.send_token
        download_repo(REPO, DownloadOptions(endpoint=endpoint, local_dir=tmp_path, http=FAST))
        assert_tree(tmp_path, files)


class TestCancelAndLocks:
    def test_should_cancel_stops_and_keeps_partials(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub, size=4 * MB)
        hub.faults.rate_bps = 4 * MB
        start = time.monotonic()
        with pytest.raises(DownloadCancelled):
            get(hub, tmp_path, should_cancel=lambda: time.monotonic() - start > 0.4)
        part = Staging.for_file(tmp_path, "transformer/w.safetensors").part
        assert part.exists() and 0 < part.stat().st_size < 4 * MB
        hub.faults.rate_bps = None
        _, messages = get(hub, tmp_path)
        assert_tree(tmp_path, files)
        assert any("resuming" in m for m in messages), "the next run continues the kept partial"

    def test_progress_hook_raising_cancels_like_comfyui_interrupt(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub, size=4 * MB)
        hub.faults.rate_bps = 4 * MB

        class Interrupted(Exception):
            pass

        def hook(p: DownloadProgress) -> None:
            if p.bytes_done > 200_000:
                raise Interrupted

        with pytest.raises(Interrupted):
            get(hub, tmp_path, progress=hook)
        assert Staging.for_file(tmp_path, "transformer/w.safetensors").part.exists()

    def test_stale_lock_of_dead_process_does_not_block(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        lock = Staging.for_file(tmp_path, "transformer/w.safetensors").lock
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": 999_999_999, "host": "x"}))  # left behind by a killed run
        get(hub, tmp_path)
        assert_tree(tmp_path, files)

    def test_live_lock_without_progress_times_out_with_message(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        holder = FileLock(Staging.for_file(tmp_path, "vae/w.safetensors").lock)
        assert holder.try_acquire()
        try:
            with pytest.raises(DownloadError) as info:
                get(hub, tmp_path, config=replace(FAST, lock_timeout=0.5))
        finally:
            holder.release()
        assert info.value.exit_code == EXIT_LOCKED and f"pid {os.getpid()}" in str(info.value)

    def test_two_concurrent_downloads_of_one_repo(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.rate_bps = 20 * MB
        errors: list[BaseException] = []

        def one() -> None:
            try:
                get(hub, tmp_path)
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert_tree(tmp_path, files)


class TestOfflineAndCleanup:
    def test_offline_verifies_and_fetches_nothing(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        get(hub, tmp_path)
        hub.reset_counters()
        result, _ = get(hub, tmp_path, offline=True)
        assert result.engine == "offline" and not hub.requests
        assert_tree(tmp_path, files)

    def test_offline_with_a_damaged_file_fails_clearly(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        get(hub, tmp_path)
        p = tmp_path / "vae/w.safetensors"
        p.write_bytes(b"\1" * p.stat().st_size)  # same size, other bytes, new mtime -> re-hash catches it
        hub.reset_counters()
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, offline=True)
        assert info.value.exit_code == EXIT_OFFLINE_MISSING and "vae/w.safetensors" in str(info.value)
        assert not hub.requests

    def test_offline_without_any_download(self, hub: HubServer, tmp_path: Path) -> None:
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, offline=True)
        assert info.value.exit_code == EXIT_OFFLINE_MISSING

    def test_cleanup_removes_orphans_and_reports_bytes(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub)
        seed_partial(hub, tmp_path, "transformer/w.safetensors", blob(MB), 500_000)
        busy = seed_partial(hub, tmp_path, "vae/w.safetensors", blob(MB), 1000)
        cache = tmp_path / "hub-cache" / "models--org--x" / "blobs"
        cache.mkdir(parents=True)
        (cache / "abc.123.incomplete").write_bytes(b"x" * 2000)
        old = time.time() - 3600
        os.utime(cache / "abc.123.incomplete", (old, old))
        holder = FileLock(busy.lock)
        assert holder.try_acquire()
        try:
            report = cleanup_partials(tmp_path, hub_cache=tmp_path / "hub-cache")
        finally:
            holder.release()
        assert report.bytes_freed >= 502_000 and not (cache / "abc.123.incomplete").exists()
        assert busy.part.exists() and busy.part in report.skipped_in_use
        assert "freed" in report.text()


class TestEngines:
    def test_hf_transfer_env_is_translated_with_a_notice(self, hub: HubServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        make_repo(hub)
        monkeypatch.setenv("HF_HUB_ENABLE_HF_TRANSFER", "1")
        _, messages = get(hub, tmp_path)
        assert sum("HF_HUB_ENABLE_HF_TRANSFER" in m for m in messages) == 1

    def test_xet_requested_without_xet_server_falls_back_to_http(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        result, messages = get(hub, tmp_path, engine="xet")
        assert result.engine == "http" and any("does not offer Xet" in m for m in messages)
        assert_tree(tmp_path, files)

    def test_xet_is_detected_from_the_x_xet_hash_header(self, hub: HubServer, tmp_path: Path) -> None:
        from qwen_core.download.engine import Job
        from qwen_core.download.listing import resolve_plan
        from qwen_core.download.transport import HubClient
        from qwen_core.download.xet import server_offers_xet

        make_repo(hub)
        client = HubClient(resolve_endpoint(hub.url), None, FAST)
        plan = resolve_plan(client, REPO, tmp_path, DownloadOptions(), print)
        job = Job(root=tmp_path, client=client, repo_id=REPO, commit=plan.commit, log=print)
        assert not server_offers_xet(plan, job)
        hub.faults.xet = True
        assert server_offers_xet(plan, job)

    def test_xet_engine_path_verifies_what_huggingface_hub_wrote(self, hub: HubServer, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        import qwen_core.download.xet as xet

        files = make_repo(hub)
        monkeypatch.setattr(xet, "server_offers_xet", lambda plan, job: True)
        result, _ = get(hub, tmp_path, engine="xet")
        assert result.engine == "xet"
        for path, data in files.items():
            assert (tmp_path / path).read_bytes() == data and not (tmp_path / path).is_symlink()

    def test_xet_engine_failure_is_a_clear_download_error(self, hub: HubServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        def broken(*args: object, **kwargs: object) -> str:
            raise RuntimeError("CAS reconstruction failed")  # what an hf_xet failure looks like to us

        make_repo(hub)
        hub.faults.xet = True
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, engine="xet", allow_patterns="*.safetensors")
        assert info.value.exit_code == EXIT_NETWORK and "--engine http" in str(info.value)

    def test_xet_cancel_while_waiting_for_a_lock_is_a_cancel(self, hub: HubServer, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """Regression: the xet engine let the lock wait's InterruptedError out instead of DownloadCancelled."""
        import qwen_core.download.xet as xet

        make_repo(hub)
        monkeypatch.setattr(xet, "server_offers_xet", lambda plan, job: True)
        holder = FileLock(Staging.for_file(tmp_path, "vae/w.safetensors").lock)
        assert holder.try_acquire()
        start = time.monotonic()
        try:
            with pytest.raises(DownloadCancelled):
                get(hub, tmp_path, engine="xet", workers=1, should_cancel=lambda: time.monotonic() - start > 0.5)
        finally:
            holder.release()

    def test_disk_full_is_a_clean_stop(self, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import errno

        import qwen_core.download.engine as engine

        files = make_repo(hub)
        real_open = Path.open
        calls = {"n": 0}

        class Full:
            def __init__(self, f):  # noqa: ANN001
                self.f = f

            def write(self, b: bytes) -> int:
                calls["n"] += 1
                if calls["n"] > 1:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return self.f.write(b)

            def __getattr__(self, name: str):  # noqa: ANN204
                return getattr(self.f, name)

            def __enter__(self):  # noqa: ANN204
                return self

            def __exit__(self, *a: object) -> None:
                self.f.close()

        def fake_open(self: Path, mode: str = "r", *a, **k):  # noqa: ANN002, ANN003, ANN202
            f = real_open(self, mode, *a, **k)
            return Full(f) if self.name.endswith(".part") and "+" in mode else f

        monkeypatch.setattr(engine.Path, "open", fake_open)
        with pytest.raises(DownloadError) as info:
            get(hub, tmp_path, workers=1)
        assert info.value.exit_code == EXIT_DISK and "still needed" in str(info.value)
        monkeypatch.setattr(engine.Path, "open", real_open)
        get(hub, tmp_path)
        assert_tree(tmp_path, files)
