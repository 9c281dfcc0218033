"""Command line of the downloader: ``python -m qwen_core download`` and ``tools/robust_download.py``.

Exit codes (also in the README "Downloads" section and ``--help``): the EXIT_* constants of types.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from qwen_core.download.cleanup import cleanup_partials
from qwen_core.download.endpoint import resolve_endpoint
from qwen_core.download.repo import download_repo, placement_for
from qwen_core.download.selection import COMFY_REPOS
from qwen_core.download.types import (
    EXIT_CANCELLED,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_USAGE,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Engine,
    HttpConfig,
    Layout,
    fmt_bytes,
)
from qwen_core.errors import DownloadCancelled, DownloadError, InvalidInputError
from qwen_core.session_log import get_session_log

_DEFAULTS_HELP = "; ".join(f"{r.repo_id}: " + ", ".join(p.rsplit("/", 1)[-1] for p in r.defaults) for r in COMFY_REPOS)


def configure_download(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument("repo_id", help="Hub repo id, e.g. Qwen/Qwen-Image (comfyui layout: Comfy-Org/Qwen-Image_ComfyUI)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="target folder (default: <model store>/<org>/<name>, see QWEN_HOME); with --layout "
                        "comfyui: ComfyUI's models folder (default: the folder above QWEN_HOME)")
    parser.add_argument("--layout", choices=[layout.value for layout in Layout], default=Layout.DIFFUSERS.value,
                        help="diffusers: the repo as a diffusers folder; comfyui: chosen split_files/<kind>/<file> of "
                        "a Comfy-Org repo straight into <out-dir>/diffusion_models, text_encoders, vae, loras (default "
                        f"files: {_DEFAULTS_HELP}; --allow takes file names or globs); configs: a family's diffusers "
                        "repo without weights (configs, tokenizer, scheduler, processor: a few MB)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    parser.add_argument("--retries", type=int, default=3, help="retries per file without progress (default 3)")
    parser.add_argument("--workers", type=int, default=8, help="files downloaded in parallel (default 8)")
    parser.add_argument("--endpoint", default=None, help="Hub or mirror URL (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--allow", action="append", default=None, metavar="PAT",
                        help="only files matching this glob (repeatable, or comma-separated); --layout comfyui: file "
                        "names, folders or globs under split_files/ (e.g. qwen_image_bf16.safetensors, loras/)")
    parser.add_argument("--ignore", action="append", default=None, metavar="PAT",
                        help="skip files matching this glob (repeatable, or comma-separated)")
    parser.add_argument("--dry-run", action="store_true", help="list files, total size and the disk check; fetch nothing")
    parser.add_argument("--cleanup", action="store_true",
                        help="delete abandoned partial downloads (ours in the target, huggingface_hub's *.incomplete)")
    parser.add_argument("--engine", choices=[e.value for e in Engine], default=Engine.AUTO.value,
                        help="auto/http: resumable ranged HTTP; xet: huggingface_hub + hf_xet where offered")
    parser.add_argument("--offline", action="store_true", help="verify the local copy only (same as HF_HUB_OFFLINE=1)")
    parser.add_argument("--verify", action="store_true",
                        help="re-hash every file already present (sha256 / git blob id) instead of trusting its "
                        "size+mtime record; damaged files are fetched again")
    parser.add_argument("--read-timeout", type=float, default=30.0, help="seconds without a byte = stalled (default 30)")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    parser.add_argument("--lock-timeout", type=float, default=120.0,
                        help="seconds to wait for another download's file lock without progress")
    parser.add_argument("--progress-interval", type=float, default=5.0,
                        help="seconds between plain progress lines when not on a terminal")


def run_download(args: argparse.Namespace) -> int:
    """Run the command; every failure is one message (with its fix) on stderr, a session-log line and an exit
    code, never a traceback."""
    printer = _Printer(args.progress_interval)
    try:
        return _run(args, printer)
    except InvalidInputError as err:
        return _fail(f"error: {err}", EXIT_USAGE)
    except DownloadCancelled as err:
        return _fail(f"cancelled: {err}", EXIT_CANCELLED)
    except KeyboardInterrupt:
        return _fail("interrupted: partial files are kept; run the same command again to resume", EXIT_CANCELLED)
    except DownloadError as err:
        return _fail(f"error: {err}", err.exit_code)
    except Exception as err:  # outside download_repo (which turns its own surprises into DownloadError)
        get_session_log().error(f"download: unexpected {type(err).__name__}: {err}\n{traceback.format_exc()}")
        return _fail(f"error: unexpected {type(err).__name__}: {err}. Fix: run it again; if it repeats, report it "
                     f"with the session log, which has the details.", EXIT_ERROR)
    finally:
        printer.close()


def _run(args: argparse.Namespace, printer: _Printer) -> int:
    from qwen_core.paths import repo_folder

    # Tokens only come from HF_TOKEN / `hf auth login`: a --token flag would show in `ps` and shell history.
    try:
        layout = Layout.from_text(args.layout)
        target = args.out_dir
        if target is None and layout is not Layout.COMFYUI:
            target = repo_folder(args.repo_id)
        cfg = HttpConfig(connect_timeout=args.connect_timeout, read_timeout=args.read_timeout,
                         backoff_base=args.backoff, lock_timeout=args.lock_timeout, retries=args.retries)
        options = DownloadOptions(
            revision=args.revision, local_dir=target, allow_patterns=args.allow, ignore_patterns=args.ignore,
            endpoint=resolve_endpoint(args.endpoint, source="user"), workers=args.workers, engine=args.engine,
            offline=True if args.offline else None, dry_run=args.dry_run, verify=args.verify, http=cfg,
            layout=layout)
        where = placement_for(args.repo_id, options)
    except InvalidInputError as err:
        get_session_log().log_exception(err, context="download")  # download_repo logs its own errors
        raise
    if args.cleanup:
        print(cleanup_partials(where.root, placement=where).text())
        return 0
    result = download_repo(args.repo_id, options, DownloadHooks(progress=printer.progress, on_message=printer.message))
    if result.dry_run:
        _print_dry_run(result, where.root)
    elif result.layout is Layout.COMFYUI:
        print("\n".join(str(path) for path in result.destinations))  # one file per line: where each one went
    else:
        print(result.local_dir)
    return 0


def _fail(text: str, code: int) -> int:
    print(text, file=sys.stderr)
    print(f"(exit {code}; logged in {get_session_log().path})", file=sys.stderr)
    return code


def _print_dry_run(result: DownloadResult, target: Path) -> None:
    print(f"{result.repo_id} @ {result.revision} = commit {result.commit}")
    print(f"{len(result.files)} files, {fmt_bytes(result.bytes_total)} total -> {target}")
    if result.layout is Layout.COMFYUI:
        for path, dest in zip(result.files, result.destinations, strict=True):
            print(f"  {path} -> {dest}")
    for note in result.notes:
        print(f"note: {note}")
    free_at = existing_parent(target)
    free = free_bytes(target)
    verdict = "ok" if free >= result.bytes_total else "NOT ENOUGH"
    print(f"disk: {fmt_bytes(free)} free at {free_at}, up to {fmt_bytes(result.bytes_total)} needed: {verdict}")
    line = _preflight_disk_line(target, result.repo_id, result.bytes_total)
    if line:
        print(f"preflight: {line}")


def _preflight_disk_line(target: Path, repo_id: str, total_bytes: int) -> str | None:
    """The preflight disk check (its safety margin included) for this exact listing, when available."""
    try:
        from qwen_core.preflight import check_disk
    except ImportError:
        return None
    check = check_disk(target, repo_id, total_bytes / 1e9, False, True, free_bytes)
    return f"disk {check.status}: {check.measured}; needs {check.needed}. {check.message} {check.recommendation}".strip()


def existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space of the disk ``path`` is (or will be created) on."""
    return shutil.disk_usage(existing_parent(path)).free


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0


class _Printer:
    """tqdm bar on a terminal; plain lines (one every `interval` s) in logs and CI."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.bar = None
        # A pty without a size (e.g. under `script`) would get a zero-width bar: plain lines instead.
        self.tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb" and _columns() >= 40
        self.last_line = 0.0

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def progress(self, p: DownloadProgress) -> None:
        if p.phase == "resolving":
            return
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                # initial= keeps resumed bytes out of the speed estimate.
                self.bar = tqdm(total=p.bytes_total, initial=p.bytes_done, unit="B", unit_scale=True,
                                desc=p.repo_id, file=sys.stderr, dynamic_ncols=True)
            self.bar.n = p.bytes_done
            self.bar.set_postfix_str(f"files {p.files_done}/{p.files_total}", refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if p.phase == "done" or now - self.last_line >= self.interval:
            self.last_line = now
            print(p.text(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
