"""Downloader node: resumable, verified download of a Hub repo into ComfyUI's models folders.

Layouts: ``diffusers`` (the repo as a folder in models/diffusers), ``comfyui files`` (chosen split files of a
Comfy-Org repo straight into models/diffusion_models, text_encoders, vae, loras), ``configs only`` (a family's
diffusers repo without weights, for a model assembled from ComfyUI's files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwen_core.download import (
    COMFY_REPOS,
    NODE_WORDS,
    DownloadHooks,
    DownloadOptions,
    DownloadProgress,
    DownloadResult,
    Layout,
    download_repo,
    resolve_endpoint,
)
from qwen_core.errors import DownloadCancelled, InvalidInputError
from qwen_core.families import known_repo_ids
from qwen_core.paths import repo_folder, validate_repo_id

from . import comfy_bridge as bridge
from .cache_keys import FolderKeys
from .common import HIDDEN, QWEN_SYSTEM

_FOLDER_KEYS = FolderKeys()  # IS_CHANGED: the target folder as our last run left it -> that run's key
# The family's repo ids (qwen_core.families), offered in the repo_id tooltip; the field stays free text.
REPO_SUGGESTIONS = tuple(known_repo_ids())
# The layout widget's choices: the first keeps the behaviour of workflows saved before the widget existed.
LAYOUTS = ("diffusers", "comfyui files", "configs only")
_DEFAULT_FILES = "; ".join(f"{r.repo_id}: " + ", ".join(p.rsplit("/", 1)[-1] for p in r.defaults) + (f" ({r.note})" if r.note else "")
                           for r in COMFY_REPOS)  # fmt: skip


class QwenImageDownloader:
    DESCRIPTION = ("Downloads a Qwen-Image repo into ComfyUI's models/diffusers/<org>/<name> as plain files, or "
                   "(layout 'comfyui files') chosen files of a Comfy-Org repo straight into models/diffusion_models, "
                   "text_encoders, vae and loras for native ComfyUI workflows too, or (layout 'configs only') a "
                   "family's configs without weights: parallel, resumable after Cancel or a crash, every file "
                   "verified (sha256). A complete repo "
                   "returns at once. The token comes from HF_TOKEN or `hf auth login`, never from the workflow. "
                   "Re-queueing an unchanged graph does not ask the Hub again (ComfyUI's cache); a file added, "
                   "removed or resized in the folder, or a changed input, runs the check again.")
    CATEGORY = "Qwen-Image/setup"
    FUNCTION = "download"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("model_path", "report")
    OUTPUT_TOOLTIPS = ("Folder of the downloaded model (connect to the Loader's model_path). configs only: the configs "
                       "folder (the Loader's model_path with a 'comfy: ' model). comfyui files: the folder the "
                       "diffusion model went to (models/diffusion_models); pick the file in the Loader's list as "
                       "'comfy: <name>'.",
                       "What was fetched, resumed or already present, and which endpoint was used.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "repo_id": ("STRING", {"default": "Qwen/Qwen-Image", "tooltip": "Hugging Face repo id, org/name (free text). The Qwen-Image family: " + ", ".join(REPO_SUGGESTIONS) + ". Layout 'comfyui files': a Comfy-Org repo, " + ", ".join(r.repo_id for r in COMFY_REPOS) + "."}),
                "revision": ("STRING", {"default": "main", "tooltip": "Branch, tag or 40-character commit hash."}),
                "allow_patterns": ("STRING", {"default": "", "tooltip": "Only files matching these globs (comma or newline separated); empty = all."}),
                "ignore_patterns": ("STRING", {"default": "", "tooltip": "Skip files matching these globs (comma or newline separated)."}),
                "workers": ("INT", {"default": 8, "min": 1, "max": 32, "step": 1, "tooltip": "Files downloaded in parallel."}),
                "endpoint": ("STRING", {"default": "", "tooltip": "Mirror URL (http/https). Empty = HF_ENDPOINT or huggingface.co. Private/loopback hosts only if the same host is set in HF_ENDPOINT; the token goes only to that host or huggingface.co."}),
                "verify": ("BOOLEAN", {"default": False, "tooltip": "Re-hash every file already on disk (sha256) instead of trusting its size and date; a damaged file is fetched again. Takes about a minute per 10 GB."}),
                "layout": (list(LAYOUTS), {"default": LAYOUTS[0], "tooltip": "diffusers: the repo as a folder in models/diffusers. comfyui files: a Comfy-Org repo's split_files/<kind>/<file> straight into models/diffusion_models, text_encoders, vae, loras (native ComfyUI workflows use them too); allow_patterns takes file names or globs (e.g. qwen_image_bf16.safetensors, vae/*); empty = " + _DEFAULT_FILES + ". configs only: a family's diffusers repo (e.g. Qwen/Qwen-Image) without weights, a few MB, for 'comfy: ' models."}),
            },
            "optional": {"system": (QWEN_SYSTEM, {"tooltip": "Optional Preflight report: runs the download after the checks."})},
            "hidden": HIDDEN,
        }

    @classmethod
    def IS_CHANGED(cls, repo_id: str = "", layout: str = LAYOUTS[0], **_: Any) -> str:
        try:
            folders = _watched_folders(repo_id, Layout.from_text(layout))
        except InvalidInputError as err:
            return f"invalid input: {err}"  # the run itself names the error
        return "|".join(_FOLDER_KEYS.key(folder) for folder in folders)

    def download(self, repo_id: str, revision: str, allow_patterns: str, ignore_patterns: str, workers: int,
                 endpoint: str, verify: bool = False, layout: str = LAYOUTS[0], system: Any = None,
                 unique_id: str | None = None) -> dict[str, Any]:
        decision = resolve_endpoint(endpoint, source="workflow")
        chosen = Layout.from_text(layout)
        target, comfy_dirs = _target(repo_id, chosen)
        bar = bridge.Progress(1, unique_id)

        def progress(p: DownloadProgress) -> None:
            bridge.send_status(unique_id, "download", {"state": p.phase, "done_bytes": p.bytes_done,
                                                       "total_bytes": p.bytes_total, "speed_bps": p.bytes_per_s,
                                                       "eta_s": p.eta_s})
            bar.update(p.bytes_done, p.bytes_total or 1)  # inside ComfyUI this raises on Cancel

        try:
            options = DownloadOptions(revision=revision, local_dir=target, workers=workers, endpoint=decision,
                                      allow_patterns=allow_patterns or None, ignore_patterns=ignore_patterns or None,
                                      verify=bool(verify), words=NODE_WORDS, layout=chosen, comfy_dirs=comfy_dirs)
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
        report = _report(result, decision.message)
        done = {"state": "complete", "total_bytes": result.bytes_total}
        bridge.send_status(unique_id, "download", done)
        for folder in _watched_folders(repo_id, chosen):
            _FOLDER_KEYS.settle(folder)
        return {"ui": {"text": [report], "qwen_download": [done]}, "result": (str(_model_path(result)), report)}


def _target(repo_id: str, layout: Layout) -> tuple[Path, dict[str, Path] | None]:
    """(local_dir, comfy_dirs) of DownloadOptions: the repo's folder in models/diffusers, or for the comfyui
    layout ComfyUI's models folder and its folder of each kind."""
    store = bridge.register_models_dirs()[0]
    if layout is Layout.COMFYUI:
        validate_repo_id(repo_id)
        return bridge.comfy_models_dir(), bridge.comfy_download_dirs()
    return repo_folder(repo_id, root=store), None


def _watched_folders(repo_id: str, layout: Layout) -> list[Path]:
    """The folders whose files decide IS_CHANGED: the repo's folder, or ComfyUI's folders the layout fills."""
    target, comfy_dirs = _target(repo_id, layout)
    return [target] if comfy_dirs is None else list(dict.fromkeys(comfy_dirs.values()))


def _model_path(result: DownloadResult) -> Path:
    """The model_path output: the model folder; for the comfyui layout the folder of the diffusion model (or of
    the first file, when no diffusion model was fetched)."""
    if result.layout is not Layout.COMFYUI or not result.destinations:
        return result.local_dir
    kinds = [path.split("/")[1] for path in result.files]
    at = kinds.index("diffusion_models") if "diffusion_models" in kinds else 0
    name_parts = len(result.files[at].split("/")) - 2  # split_files/<kind>/<name...>
    return result.destinations[at].parents[name_parts - 1]


def _report(result: DownloadResult, endpoint_message: str) -> str:
    where = str(result.local_dir)
    if result.layout is Layout.COMFYUI:
        where = "ComfyUI's folders:\n" + "\n".join(f"  {dest}" for dest in result.destinations)
    notes = "".join(f"\nnote: {note}" for note in result.notes)
    return (f"{result.repo_id}@{result.commit[:12]} -> {where}\n{endpoint_message}\n"
            f"{len(result.files)} files, {result.bytes_total:,} bytes: {result.bytes_fetched:,} fetched, "
            f"{result.files_present} already present, {result.files_resumed} resumed, {result.elapsed_s:.1f} s"
            f"{notes}")


def _send_cancelled(unique_id: str | None, bar: bridge.Progress) -> None:
    """The web panel's final line after Cancel, whichever way the cancel arrived."""
    bridge.send_status(unique_id, "download", {"state": "cancelled", "done_bytes": bar.value})
