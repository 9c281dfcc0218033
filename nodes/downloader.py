"""Downloader node: resumable, verified download of a Hub repo into ComfyUI's models/diffusers folder."""

from __future__ import annotations

from typing import Any

from qwen_core.download import (
    NODE_WORDS,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    download_repo,
    resolve_endpoint,
)
from qwen_core.errors import DownloadCancelled, InvalidInputError
from qwen_core.families import known_repo_ids
from qwen_core.paths import repo_folder

from . import comfy_bridge as bridge
from .cache_keys import FolderKeys
from .common import HIDDEN, QWEN_SYSTEM

_FOLDER_KEYS = FolderKeys()  # IS_CHANGED: the target folder as our last run left it -> that run's key
# The family's repo ids (qwen_core.families), offered in the repo_id tooltip; the field stays free text.
REPO_SUGGESTIONS = tuple(known_repo_ids())


class QwenImageDownloader:
    DESCRIPTION = ("Downloads a Qwen-Image repo into ComfyUI's models/diffusers/<org>/<name> as plain files: "
                   "parallel, resumable after Cancel or a crash, every file verified (sha256). A complete repo "
                   "returns at once. The token comes from HF_TOKEN or `hf auth login`, never from the workflow. "
                   "Re-queueing an unchanged graph does not ask the Hub again (ComfyUI's cache); a file added, "
                   "removed or resized in the folder, or a changed input, runs the check again.")
    CATEGORY = "Qwen-Image/setup"
    FUNCTION = "download"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("model_path", "report")
    OUTPUT_TOOLTIPS = ("Folder of the downloaded model (connect to the Loader's model_path).",
                       "What was fetched, resumed or already present, and which endpoint was used.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "repo_id": ("STRING", {"default": "Qwen/Qwen-Image", "tooltip": "Hugging Face repo id, org/name (free text). The Qwen-Image family: " + ", ".join(REPO_SUGGESTIONS) + "."}),
                "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or 40-character commit hash."}),
                "allow_patterns": ("STRING", {"default": "", "tooltip": "Only files matching these globs (comma or newline separated); empty = all."}),
                "ignore_patterns": ("STRING", {"default": "", "tooltip": "Skip files matching these globs (comma or newline separated)."}),
                "workers": ("INT", {"default": 8, "min": 1, "max": 32, "step": 1, "tooltip": "Files downloaded in parallel."}),
                "endpoint": ("STRING", {"default": "", "tooltip": "Mirror URL (http/https). Empty = HF_ENDPOINT or huggingface.co. Private/loopback hosts only if the same host is set in HF_ENDPOINT; the token goes only to that host or huggingface.co."}),
                "verify": ("BOOLEAN", {"default": False, "tooltip": "Re-hash every file already on disk (sha256) instead of trusting its size and date; a damaged file is fetched again. Takes about a minute per 10 GB."}),
            },
            "optional": {"system": (QWEN_SYSTEM, {"tooltip": "Optional Preflight report: runs the download after the checks."})},
            "hidden": HIDDEN,
        }

    @classmethod
    def IS_CHANGED(cls, repo_id: str = "", **_: Any) -> str:
        try:
            target = repo_folder(repo_id, root=bridge.register_models_dirs()[0])
        except InvalidInputError:
            return f"invalid repo id {repo_id!r}"  # the run itself names the error
        return _FOLDER_KEYS.key(target)

    def download(self, repo_id: str, revision: str, allow_patterns: str, ignore_patterns: str, workers: int,
                 endpoint: str, verify: bool = False, system: Any = None, unique_id: str | None = None) -> dict[str, Any]:
        decision = resolve_endpoint(endpoint, source="workflow")
        target = repo_folder(repo_id, root=bridge.register_models_dirs()[0])
        bar = bridge.Progress(1, unique_id)

        def progress(p: DownloadProgress) -> None:
            bridge.send_status(unique_id, "download", {"state": p.phase, "done_bytes": p.bytes_done,
                                                       "total_bytes": p.bytes_total, "speed_bps": p.bytes_per_s,
                                                       "eta_s": p.eta_s})
            bar.update(p.bytes_done, p.bytes_total or 1)  # inside ComfyUI this raises on Cancel

        try:
            options = DownloadOptions(revision=revision, local_dir=target, workers=workers, endpoint=decision,
                                      allow_patterns=allow_patterns or None, ignore_patterns=ignore_patterns or None,
                                      verify=bool(verify), words=NODE_WORDS)
            result = download_repo(repo_id, options, DownloadHooks(progress=progress, should_cancel=bridge.interrupted))
        except DownloadCancelled as err:
            _send_cancelled(unique_id, bar)
            bridge.raise_as_interrupt(err)
        except BaseException as err:
            if bridge.is_interrupt(err):  # Cancel raised by ComfyUI's progress hook (a BaseException in 0.33)
                _send_cancelled(unique_id, bar)
            else:
                bridge.send_status(unique_id, "download", {"state": "error", "message": str(err)[:300]})
            raise
        report = (f"{result.repo_id}@{result.commit[:12]} -> {result.local_dir}\n{decision.message}\n"
                  f"{len(result.files)} files, {result.bytes_total:,} bytes: {result.bytes_fetched:,} fetched, "
                  f"{result.files_present} already present, {result.files_resumed} resumed, {result.elapsed_s:.1f} s")
        done = {"state": "complete", "total_bytes": result.bytes_total}
        bridge.send_status(unique_id, "download", done)
        _FOLDER_KEYS.settle(target)
        return {"ui": {"text": [report], "qwen_download": [done]}, "result": (str(result.local_dir), report)}


def _send_cancelled(unique_id: str | None, bar: bridge.Progress) -> None:
    """The web panel's final line after Cancel, whichever way the cancel arrived."""
    bridge.send_status(unique_id, "download", {"state": "cancelled", "done_bytes": bar.value})
