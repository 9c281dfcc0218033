"""Downloads from `olah`, a real third-party Hub mirror server, in offline mode on 127.0.0.1.

olah serves git repos under ``{mirrors}/models/{org}/{repo}``; with ``[accessibility] offline = true`` and
``hf-netloc`` pointed at 127.0.0.1:9 nothing leaves the machine. It ignores Range (answers 200, chunked), so a
resume there restarts the file, and its tree listing gives git blob ids (no LFS sha256), so files are verified
by git blob sha1.

olah cannot share our venv: its dependency fastapi-utils pins psutil<6 and we pin psutil 7. It lives in its own
venv; the test uses it when present and skips with that reason otherwise. Create it once with::

    python3 -m venv ~/.cache/qwen-image-tests/olah-venv
    ~/.cache/qwen-image-tests/olah-venv/bin/pip install olah

(scripts/test.sh does this for you in <repo>/.venv-olah and sets QWEN_OLAH_PYTHON),

or point QWEN_OLAH_PYTHON at a Python that has olah installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from download_helpers import FAST, scaled

from qwen_core.download import DownloadHooks, DownloadOptions, download_repo, resolve_endpoint
from qwen_core.download.layout import Staging

pytest_plugins = ["download_fixtures"]

REPO = "org/tiny-qwen"
# olah builds answers from git on the fly (Python, FastAPI): on a loaded 2-core box a response can take seconds.
# Nothing here tests stalls, so the read timeout is generous (a stall test would set it short on purpose).
OLAH_HTTP = replace(FAST, connect_timeout=scaled(10.0), read_timeout=scaled(30.0), retries=5)


def _olah_python() -> Path | None:
    env = os.environ.get("QWEN_OLAH_PYTHON")
    candidates = [Path(env)] if env else []
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates.append(cache / "qwen-image-tests" / "olah-venv" / "bin" / "python")
    for python in candidates:
        if python.is_file() and (python.parent / "olah-cli").is_file():
            return python
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git_repo(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "tiny"]):
        subprocess.run(["git", *cmd], cwd=dest, env=env, check=True, capture_output=True)


@pytest.fixture(scope="module")
def olah(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, Path]]:
    python = _olah_python()
    if python is None:
        pytest.skip("olah is not installed: it conflicts with our psutil pin, so it needs its own venv "
                    "(see this file's docstring for the two commands)")
    if shutil.which("git") is None:
        pytest.skip("git is needed to build the mirror repo")
    base = tmp_path_factory.mktemp("olah")
    _git_repo(tiny_model_dir, base / "mirrors" / "models" / REPO)
    port = _free_port()
    (base / "olah.toml").write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"
repos-path = "{base / 'repos'}"
mirrors-path = ["{base / 'mirrors'}"]
[accessibility]
offline = true
""")
    proc = subprocess.Popen([str(python.parent / "olah-cli"), "-c", "olah.toml"], cwd=base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + scaled(60)
        while True:  # readiness: poll the endpoint the test needs, never a fixed sleep
            try:
                if requests.get(f"{url}/api/models/{REPO}/revision/main", timeout=scaled(2)).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                pytest.skip(f"olah exited at start (exit {proc.returncode})")
            if time.monotonic() > deadline:
                pytest.fail(f"olah did not answer within {scaled(60):.0f} s")
            time.sleep(0.1)
        yield url, base / "mirrors" / "models" / REPO
    finally:
        proc.terminate()
        try:
            proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _same_tree(src: Path, out: Path) -> None:
    files = [p for p in src.rglob("*") if p.is_file() and ".git" not in p.relative_to(src).parts]
    assert files
    for p in files:
        got = out / p.relative_to(src)
        assert got.is_file() and not got.is_symlink(), got
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(p.read_bytes()).digest(), got


@pytest.mark.slow
class TestOlahMirror:
    def test_download_verify_resume_and_load(self, olah: tuple[str, Path], online: None, tmp_path: Path) -> None:
        url, src = olah
        out = tmp_path / "model"
        # olah answers /api/models/{repo} without a revision with 401: always pass revision="main".
        options = DownloadOptions(revision="main", endpoint=resolve_endpoint(url), local_dir=out, token=False,
                                  http=OLAH_HTTP)
        result = download_repo(REPO, options)
        _same_tree(src, out)
        assert result.bytes_fetched == result.bytes_total > 0

        # A partial of the largest file, as a killed run leaves it: olah ignores Range -> restart, still correct.
        big = max(result.files, key=lambda f: (src / f).stat().st_size)
        stage = Staging.for_file(out, big)
        (out / big).unlink()
        (stage.record).unlink()
        data = (src / big).read_bytes()
        stage.part.write_bytes(data[: len(data) // 2])
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        stage.sidecar.write_text(f'{{"path": "{big}", "size": {len(data)}, "sha256": null, "etag": "{blob_id}"}}')
        messages: list[str] = []
        download_repo(REPO, options, DownloadHooks(on_message=messages.append))
        assert any("resuming" in m for m in messages) and any("ignores Range" in m for m in messages)
        _same_tree(src, out)

        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(out, local_files_only=True)
        assert type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
