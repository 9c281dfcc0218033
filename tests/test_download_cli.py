"""The downloader as users run it: tools/robust_download.py in a subprocess against the 127.0.0.1 hub stand-in.

Covers what only a real process shows: SIGKILL mid-file and resume, exit codes, two processes at once, and a
file-size limit (RLIMIT_FSIZE) standing in for a full disk.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from download_helpers import FAST_CLI, ROOT, blob, cli_env, run_cli, scaled, start_cli, wait_for
from hub_server import HubServer

from qwen_core.download.layout import Staging
from qwen_core.download.types import EXIT_AUTH, EXIT_DISK, EXIT_NOT_FOUND, EXIT_OFFLINE_MISSING

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and rlimits")
pytest_plugins = ["download_fixtures"]

MB = 1_000_000
CHUNK = 1024 * 1024
REPO = "org/big-model"
BIG = "transformer/diffusion_pytorch_model.safetensors"


def make_repo(hub: HubServer, size: int = 6 * MB) -> dict[str, bytes]:
    files = {"model_index.json": b'{"_class_name": "QwenImagePipeline"}', BIG: blob(size, 3)}
    hub.add_repo(REPO, files)
    return files


def args(hub: HubServer, out: Path, *extra: str) -> list[str]:
    return [REPO, "--out-dir", str(out), "--endpoint", hub.url, *FAST_CLI, *extra]


def same(path: Path, data: bytes) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def part_size(out: Path) -> int:
    p = Staging.for_file(out, BIG).part
    return p.stat().st_size if p.exists() else 0


class TestKillAndResume:
    def test_sigkill_mid_file_then_rerun_fetches_only_the_rest(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.rate_bps = 1 * MB  # slow enough to kill mid-file even on a loaded 2-core CI box
        proc = start_cli(args(hub, tmp_path / "m"))
        try:
            assert wait_for(lambda: part_size(tmp_path / "m") >= 2 * CHUNK), "download never started"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(scaled(10))
        kept = part_size(tmp_path / "m")
        assert 0 < kept < len(files[BIG]) and not (tmp_path / "m" / BIG).exists()
        hub.reset_counters()
        hub.faults.rate_bps = None
        done = run_cli(args(hub, tmp_path / "m"))
        assert done.returncode == 0, done.stderr
        assert f"resuming at {kept / 1e6:.1f} MB" in done.stderr
        assert "MB/s" in done.stderr and "(100%)" in done.stderr, "one plain progress line for the repo"
        served = hub.bytes_served[BIG]
        assert served <= len(files[BIG]) - kept + CHUNK, (served, kept)
        assert hub.total_served() <= len(files[BIG]) + CHUNK
        assert same(tmp_path / "m" / BIG, files[BIG]) and done.stdout.strip() == str(tmp_path / "m")


    def test_ctrl_c_stops_promptly_keeps_partial_and_says_how_to_resume(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.rate_bps = 1 * MB  # ~6 s for the file: the signal lands mid-file even under load
        proc = start_cli(args(hub, tmp_path))
        try:
            assert wait_for(lambda: part_size(tmp_path) >= CHUNK), "download never started"
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=scaled(10))
        finally:
            proc.kill()
        assert proc.returncode == 130 and "run the same command again to resume" in err
        assert 0 < part_size(tmp_path) < len(files[BIG])


class TestExitCodes:
    def test_missing_repo_exit_4(self, hub: HubServer, tmp_path: Path) -> None:
        done = run_cli(args(hub, tmp_path))
        assert done.returncode == EXIT_NOT_FOUND and "not found" in done.stderr and "Fix:" in done.stderr

    def test_gated_repo_exit_3_and_token_from_env_works_unprinted(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub, size=2 * MB)
        secret = "hf_CliSecretToken987654"
        hub.faults.require_token = secret
        denied = run_cli(args(hub, tmp_path))
        assert denied.returncode == EXIT_AUTH and "HF_TOKEN" in denied.stderr
        ok = run_cli(args(hub, tmp_path), env=cli_env(HF_TOKEN=secret))
        assert ok.returncode == 0, ok.stderr
        assert secret not in ok.stderr + ok.stdout + denied.stderr
        log = Path(os.environ["QWEN_REPORTS_DIR"]) / "last_session.log"
        assert not log.exists() or secret not in log.read_text()
        assert same(tmp_path / BIG, files[BIG])

    def test_bad_repo_id_exit_2(self, hub: HubServer, tmp_path: Path) -> None:
        done = run_cli(["../etc", "--out-dir", str(tmp_path), "--endpoint", hub.url])
        assert done.returncode == 2 and "repo_id" in done.stderr

    def test_offline_env_verifies_only(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub, size=2 * MB)
        missing = run_cli(args(hub, tmp_path), env=cli_env(HF_HUB_OFFLINE="1"))
        assert missing.returncode == EXIT_OFFLINE_MISSING and "Offline" in missing.stderr
        assert run_cli(args(hub, tmp_path)).returncode == 0
        hub.reset_counters()
        ok = run_cli(args(hub, tmp_path), env=cli_env(HF_HUB_OFFLINE="1"))
        assert ok.returncode == 0 and "verified" in ok.stderr and not hub.requests


class TestProcesses:
    def test_two_processes_download_the_same_repo(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub)
        hub.faults.rate_bps = 12 * MB
        procs = [start_cli(args(hub, tmp_path)) for _ in range(2)]
        outs = [p.communicate(timeout=scaled(60)) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        for path, data in files.items():
            assert same(tmp_path / path, data)
        assert hub.bytes_served[BIG] <= len(files[BIG]) + CHUNK, "the lock must stop a double download"

    def test_file_size_limit_is_a_clean_stop_not_called_disk_full_then_resume(self, hub: HubServer,
                                                                               tmp_path: Path) -> None:
        """Regression (issue 14): EFBIG (a file-size limit) was reported as "Disk full ... Free at least 0 B"."""
        files = make_repo(hub, size=5 * MB)

        import resource  # POSIX only, like this whole module

        def small_disk() -> None:
            # SIGXFSZ would kill the process; ignored, write() fails with EFBIG (a limit, not a full disk).
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MB, 2 * MB))

        full = run_cli(args(hub, tmp_path, "--workers", "1"), preexec_fn=small_disk)
        assert full.returncode == EXIT_DISK, full.stderr
        assert "file-size limit" in full.stderr and "ulimit" in full.stderr and "Traceback" not in full.stderr
        assert "Disk full" not in full.stderr and "at least 0 B" not in full.stderr
        kept = part_size(tmp_path)
        assert 0 < kept <= 2 * MB
        again = run_cli(args(hub, tmp_path))
        assert again.returncode == 0, again.stderr
        assert "resuming at" in again.stderr and same(tmp_path / BIG, files[BIG])


class TestCommands:
    def test_dry_run_lists_files_size_and_disk(self, hub: HubServer, tmp_path: Path) -> None:
        make_repo(hub, size=2 * MB)
        done = run_cli(args(hub, tmp_path / "m", "--dry-run"))
        assert done.returncode == 0, done.stderr
        assert "2 files, 2.0 MB total" in done.stdout and "disk:" in done.stdout and ": ok" in done.stdout
        assert not (tmp_path / "m").exists() and hub.total_served() == 0

    def test_python_m_qwen_core_download_and_cleanup(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub, size=2 * MB)
        cmd = [sys.executable, "-m", "qwen_core", "download", *args(hub, tmp_path, "--allow", "*.json")]
        done = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=scaled(60))
        assert done.returncode == 0, done.stderr
        assert same(tmp_path / "model_index.json", files["model_index.json"]) and not (tmp_path / BIG).exists()
        stage = Staging.for_file(tmp_path, BIG)
        stage.part.parent.mkdir(parents=True, exist_ok=True)
        stage.part.write_bytes(b"x" * 1234)
        cleaned = run_cli([REPO, "--out-dir", str(tmp_path), "--cleanup"])
        assert cleaned.returncode == 0 and "freed" in cleaned.stdout and not stage.part.exists()


def _redirect_loop(hub: HubServer) -> None:
    hub.faults.file_redirect = "{self}"


def _non_http_redirect(hub: HubServer) -> None:
    hub.faults.file_redirect = "file:///etc/passwd"


def _malformed_location(hub: HubServer) -> None:
    hub.faults.file_redirect = "http://[::1/x"


def _name_too_long(hub: HubServer) -> None:
    files = {path: hub.read(REPO, path) for path in hub.repos[REPO].files}
    hub.add_repo(REPO, {**files, "transformer/" + "n" * 300 + ".bin": b"x" * 2000})


def _file_and_folder(hub: HubServer) -> None:
    hub.repos[REPO].extra_tree.append({"type": "file", "path": "transformer", "size": 4, "oid": "0" * 40})


def _portal_listing(hub: HubServer) -> None:
    hub.faults.api_body = b"<html><body>Log in to the Wi-Fi</body></html>"


def _gated(hub: HubServer) -> None:
    hub.faults.require_token = "hf_SomeoneElsesToken123"


def _html_page(hub: HubServer) -> None:
    hub.faults.body_override, hub.faults.body_type = b"<!doctype html><p>blocked by proxy</p>", "text/html"


class TestEveryErrorIsCodeMessageFixAndLogLine:
    """Issue 14: the CLI ends every failure with its documented exit code, one message with a fix on stderr, and
    an ERROR line with that fix in the session log; never a traceback (before: redirect loops, non-http or
    malformed redirects, long names, file/folder clashes and a portal's listing page were tracebacks, exit 1,
    and an auth error left only "session started" in the log)."""

    @pytest.mark.parametrize(("fault", "code", "said"), [
        (_redirect_loop, 5, "redirect loop"),
        (_non_http_redirect, 8, "non-http"),
        (_malformed_location, 8, "malformed redirect"),
        (_name_too_long, 7, "too long for the file system"),
        (_file_and_folder, 8, "both as a file and as a folder"),
        (_portal_listing, 5, "is not JSON"),
        (_gated, 3, "gated"),
        (_html_page, 6, "HTML page"),
    ], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
    def test_fault(self, hub: HubServer, tmp_path: Path, fault, code: int, said: str) -> None:  # noqa: ANN001
        make_repo(hub, size=2 * MB)
        fault(hub)
        done = run_cli(args(hub, tmp_path / "m", "--retries", "1"))
        assert done.returncode == code, done.stderr
        assert said in done.stderr and "Fix:" in done.stderr and "Traceback" not in done.stderr
        log = (Path(os.environ["QWEN_REPORTS_DIR"]) / "last_session.log").read_text()
        errors = [line for line in log.splitlines() if " ERROR " in line]
        assert any(said in line and "Fix:" in line for line in errors), log


class TestVerifyAndFullDisk:
    def test_verify_flag_re_hashes_and_repairs(self, hub: HubServer, tmp_path: Path) -> None:
        files = make_repo(hub, size=2 * MB)
        assert run_cli(args(hub, tmp_path)).returncode == 0
        big = tmp_path / BIG
        st = big.stat()
        data = bytearray(big.read_bytes())
        data[123] ^= 0x40
        big.write_bytes(bytes(data))
        os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only a re-hash can tell
        done = run_cli(args(hub, tmp_path, "--verify"))
        assert done.returncode == 0, done.stderr
        assert "does not match" in done.stderr and same(big, files[BIG])

    def test_a_complete_model_needs_no_writes(self, hub: HubServer, tmp_path: Path) -> None:
        """Before: the rerun of a branch wrote a probe and plan.json; with no room to write (here a file-size
        limit of 0 bytes) it ended in a traceback. Now nothing is written and it succeeds."""
        import resource

        make_repo(hub, size=2 * MB)
        assert run_cli(args(hub, tmp_path)).returncode == 0

        def nothing_can_grow() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        again = run_cli(args(hub, tmp_path), preexec_fn=nothing_can_grow)
        assert again.returncode == 0, again.stderr
        assert "already present and verified" in again.stderr and again.stdout.strip() == str(tmp_path)
