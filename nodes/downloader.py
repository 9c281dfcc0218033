"""Downloader node: resumable, verified download of a Hub repo into ComfyUI's models/diffusers folder."""

from __future__ import annotations

from typing import Any

from qwen_core.download import DownloadProgress, download_repo
from qwen_core.endpoint_policy import check_endpoint
from qwen_core.errors import DownloadCancelled
from qwen_core.families import known_repo_ids
from qwen_core.paths import repo_folder

from . import comfy_bridge as bridge
from .common import HIDDEN, QWEN_SYSTEM

# The family's repo ids (qwen_core.families), offered in the repo_id tooltip; the field stays free text.
REPO_SUGGESTIONS = tuple(known_repo_ids())


class QwenImageDownloader:
    DESCRIPTION = ("Downloads a Qwen-Image repo into ComfyUI's models/diffusers/<org>/<name> as plain files: "
                   "parallel, resumable after Cancel or a crash, every file verified (sha256). A complete repo "
                   "returns at once. The token comes from HF_TOKEN or `hf auth login`, never from the workflow.")
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
            },
            "optional": {"system": (QWEN_SYSTEM, {"tooltip": "Optional Preflight report: runs the download after the checks."})},
            "hidden": HIDDEN,
        }

    def download(self, repo_id: str, revision: str, allow_patterns: str, ignore_patterns: str, workers: int,
                 endpoint: str, system: Any = None, unique_id: str | None = None) -> dict[str, Any]:
        decision = check_endpoint(endpoint)
        target = repo_folder(repo_id, root=bridge.register_models_dirs()[0])
        bar = bridge.Progress(1, unique_id)

        def progress(p: DownloadProgress) -> None:
            bridge.send_status(unique_id, "download", {"state": p.phase, "done_bytes": p.bytes_done,
                                                       "total_bytes": p.bytes_total, "speed_bps": p.bytes_per_s,
                                                       "eta_s": p.eta_s})
            bar.update(p.bytes_done, p.bytes_total or 1)  # inside ComfyUI this raises on Cancel

        try:
            result = download_repo(repo_id, revision=revision, local_dir=target, workers=workers,
                                   allow_patterns=allow_patterns or None, ignore_patterns=ignore_patterns or None,
                                   endpoint=decision.url if decision.source == "workflow" else None,
                                   token=None if decision.send_token else False,
                                   redirect_guard=decision.redirect_guard(), progress=progress, should_cancel=bridge.interrupted)
        except DownloadCancelled as err:
            bridge.send_status(unique_id, "download", {"state": "cancelled", "done_bytes": bar.value})
            bridge.raise_as_interrupt(err)
        except Exception as err:
            bridge.send_status(unique_id, "download", {"state": "error", "message": str(err)[:300]})
            raise
        report = (f"{result.repo_id}@{result.commit[:12]} -> {result.local_dir}\n{decision.message}\n"
                  f"{len(result.files)} files, {result.bytes_total:,} bytes: {result.bytes_fetched:,} fetched, "
                  f"{result.files_present} already present, {result.files_resumed} resumed, {result.elapsed_s:.1f} s")
        done = {"state": "complete", "total_bytes": result.bytes_total}
        bridge.send_status(unique_id, "download", done)
        return {"ui": {"text": [report], "qwen_download": [done]}, "result": (str(result.local_dir), report)}
