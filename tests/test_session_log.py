"""Session log: rotation, fixes, redaction, threads, logging handler."""

import threading

import pytest

from qwen_core import session_log
from qwen_core.errors import DownloadError
from qwen_core.session_log import SessionLog, get_session_log, redact


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path))
    session_log.reset_session_log()
    yield
    session_log.reset_session_log()


class TestRedact:
    @pytest.mark.parametrize("text,secret", [
        ("using hf_AbCdEfGhIjKlMnOpQrStUv for auth", "hf_AbCdEfGhIjKlMnOpQrStUv"),
        ("Authorization: Bearer abc.DEF-ghi_123", "abc.DEF-ghi_123"),
        ("authorization=token s3cr3tvalue", "s3cr3tvalue"),
        ("GET https://hub/x?token=s3cr3t&revision=main", "s3cr3t"),
        ("env HF_TOKEN=plainsecret1 set", "plainsecret1"),
        ("hf_hub_download(repo, token='hf_aaaaaaaaaaaa')", "hf_aaaaaaaaaaaa"),
        ("{'access_token': 'xyz987654'}", "xyz987654"),
    ])
    def test_secrets_are_removed(self, text, secret):
        out = redact(text)
        assert secret not in out and "***" in out

    def test_ordinary_text_is_kept_and_redaction_is_idempotent(self):
        text = "tokenizer loaded; Bearer of news; 12 tokens"
        assert redact(text) == text
        once = redact("token=abc123456")
        assert redact(once) == once


class TestSessionLog:
    def test_one_file_per_session_previous_kept(self, tmp_path):
        log = get_session_log()
        assert log.path == tmp_path / "last_session.log"
        log.info("first session")
        assert get_session_log() is log  # same process, same log
        session_log.reset_session_log()
        second = get_session_log()
        second.info("second session")
        assert "second session" in second.read_text() and "first session" not in second.read_text()
        assert "first session" in (tmp_path / "last_session.log.1").read_text()

    def test_error_has_fix_and_no_token(self, tmp_path):
        log = get_session_log()
        log.error("download failed with hf_SECRETSECRETSECRET", fix="run huggingface-cli login")
        log.log_exception(DownloadError("401 for Qwen/Qwen-Image", fix="set HF_TOKEN"), context="download")
        text = log.read_text()
        assert "hf_SECRETSECRETSECRET" not in text
        assert "ERROR" in text and "fix: run huggingface-cli login" in text
        assert "DownloadError: 401 for Qwen/Qwen-Image Fix: set HF_TOKEN" in text

    def test_new_reports_dir_starts_a_new_log(self, monkeypatch, tmp_path):
        first = get_session_log()
        monkeypatch.setenv("QWEN_REPORTS_DIR", str(tmp_path / "other"))
        assert get_session_log().path == tmp_path / "other" / "last_session.log" != first.path

    def test_unwritable_dir_falls_back(self, tmp_path, capsys):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        log = SessionLog(blocker / "sub" / "last_session.log")
        log.info("still logged")
        assert "still logged" in log.read_text() and "cannot write" in capsys.readouterr().err
        log.close()

    def test_thread_safe_lines_are_whole(self):
        log = get_session_log()

        def worker(n):
            for i in range(200):
                log.info(f"worker {n} line {i} " + "x" * 50)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lines = [ln for ln in log.read_text().splitlines() if " worker " in ln]
        assert len(lines) == 1600 and all(ln.endswith("x" * 50) for ln in lines)

