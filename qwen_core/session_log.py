"""``reports/last_session.log``: one plain-text log per process, for users to read and attach to bug reports.

The first ``get_session_log()`` of a process moves the previous file to ``last_session.log.1`` and starts a
new one; QWEN_REPORTS_DIR moves the folder. Every error is written with its fix. Everything written passes
through ``redact()`` first, so Hugging Face tokens, bearer headers and ``token=`` parameters never land on
disk. Writes are serialised by a lock (downloads log from worker threads). If the folder is not writable the
log falls back to the temp directory rather than breaking the caller.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from qwen_core.paths import reports_dir

LOG_NAME = "last_session.log"
_REDACTIONS = [
    # Hugging Face user/org access tokens.
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
    # HTTP auth headers and bare bearer tokens.
    (re.compile(r"(?i)(authorization\s*[:=]\s*[\"']?\s*(?:bearer|token|basic)\s+)[^\s\"',;]+"), r"\1***"),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1***"),
    # token=..., access_token=..., HF_TOKEN=..., api_key=..., password=... (URLs, env dumps, kwargs reprs).
    (
        re.compile(r"(?i)(\b(?:hf_token|hugging_face_hub_token|access_token|token|api_key|apikey|password)"
                   r"[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;)}\]]+"),
        r"\1***",
    ),
]


def redact(text: object) -> str:
    """The text with secrets replaced by ``***`` (idempotent)."""
    out = str(text)
    for pattern, repl in _REDACTIONS:
        out = pattern.sub(repl, out)
    return out


class SessionLog:
    """Append-only, thread-safe, redacting text log. ``rotate`` moves an existing file to ``.1`` first."""

    def __init__(self, path: str | os.PathLike, *, rotate: bool = True) -> None:
        self._lock = threading.Lock()
        self.requested_path = self.path = Path(path)
        try:
            self._open(rotate)
        except OSError as err:
            # A read-only checkout must not break generation: log to the temp dir and say so on stderr.
            fallback = Path(tempfile.gettempdir()) / f"qwen_{LOG_NAME}"
            print(f"qwen_core: cannot write {self.path} ({err}); session log goes to {fallback}", file=sys.stderr)
            self.path = fallback
            self._open(rotate)

    def _open(self, rotate: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rotate and self.path.exists():
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the log
        self._write("INFO", f"session started (pid {os.getpid()}, python {sys.version.split()[0]})")

    def _write(self, level: str, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = redact(message).splitlines() or [""]
        text = f"{stamp} {level:<7} {lines[0]}\n" + "".join(f"{' ' * 29}{line}\n" for line in lines[1:])
        with self._lock:
            if self._file.closed:
                return
            self._follow_rotation()
            try:
                self._file.write(text)
                self._file.flush()
            except OSError:  # a full disk must not turn a logged error into a traceback; the line is lost
                pass

    def _follow_rotation(self) -> None:
        """Another process sharing the reports folder (a CLI download beside ComfyUI, a test's subprocess) may
        have started its session and moved our file to ``.1``: keep appending to the current file instead of
        writing into the renamed one, where nobody looks."""
        try:
            current = os.stat(self.path)
            mine = os.fstat(self._file.fileno())
            if (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                return
        except OSError:
            pass  # the file vanished: recreate it below
        try:
            reopened = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - replaces the handle we own
        except OSError:
            return  # keep writing where we can
        self._file.close()
        self._file = reopened

    def info(self, message: str) -> None:
        self._write("INFO", message)

    def warning(self, message: str) -> None:
        self._write("WARNING", message)

    def error(self, message: str, fix: str | None = None) -> None:
        """An error and what the user can do about it (taken from ``QwenError.fix`` by ``log_exception``)."""
        text = str(message)
        if fix and fix not in text:
            text += f"\n  fix: {fix}"
        self._write("ERROR", text)

    def log_exception(self, err: BaseException, context: str = "") -> None:
        fix = getattr(err, "fix", None)
        prefix = f"{context}: " if context else ""
        self.error(f"{prefix}{type(err).__name__}: {err}", fix=None if fix and fix in str(err) else fix)

    def read_text(self) -> str:
        with self._lock:
            return self.path.read_text(encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()


_singleton: SessionLog | None = None
_singleton_lock = threading.Lock()


def get_session_log() -> SessionLog:
    """The process's session log; a new one (rotating the old file) when QWEN_REPORTS_DIR now points elsewhere."""
    global _singleton
    wanted = reports_dir() / LOG_NAME
    with _singleton_lock:
        if _singleton is None or _singleton.requested_path != wanted:
            if _singleton is not None:
                _singleton.close()
            _singleton = SessionLog(wanted)
        return _singleton


def reset_session_log() -> None:
    """Forget the current log (tests; a new process starts a new session anyway)."""
    global _singleton
    with _singleton_lock:
        if _singleton is not None:
            _singleton.close()
        _singleton = None
