"""Which files of a repo a download takes, for each layout (``types.Layout``); one function, ``choose_files``.

- ``diffusers``: the allow/ignore globs over repo paths (huggingface_hub's rules); every file without them.
- ``configs``: the files a model assembled from single files needs beside them (``CONFIG_PATTERNS``: configs,
  tokenizer, scheduler, processor), never a weight file, and only from a diffusers repo (``model_index.json``).
- ``comfyui``: files under ``split_files/<kind>/`` of a Comfy-Org repo, ``kind`` one of ComfyUI's folders in
  ``COMFY_KINDS``. Without allow patterns, a known repo's default set (``COMFY_REPOS``: the fp8 diffusion model,
  the fp8 text encoder and the VAE); another repo needs patterns. A pattern matches the repo path
  (``split_files/vae/qwen_image_vae.safetensors``), the path under split_files (``vae/*``) or the file name
  (``qwen_image_bf16.safetensors``). A pattern that selects a file of another kind is refused by name.

The listing and the offline check both call ``choose_files``, so they never disagree about the selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatch

from qwen_core.download.layout import SPLIT_DIR, comfy_destination
from qwen_core.download.types import (
    COMFY_KINDS,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    DownloadOptions,
    Layout,
    RemoteFile,
    Words,
)
from qwen_core.errors import DownloadError, InvalidInputError

# A configs-only folder: JSON configs, tokenizer and processor files, the scheduler; no weights.
CONFIG_PATTERNS = ("model_index.json", "*/config.json", "*/*_config.json", "tokenizer/*", "processor/*",
                   "scheduler/*")  # fmt: skip
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".sft", ".onnx", ".msgpack",
                   ".h5")  # fmt: skip


@dataclass(frozen=True)
class ComfyRepo:
    """A Comfy-Org repo of split files this layout knows: its default files and the diffusers repos it belongs to
    (the first one holds the configs its default files need)."""

    repo_id: str
    defaults: tuple[str, ...]
    diffusers_repos: tuple[str, ...]
    note: str = ""


COMFY_REPOS = (
    ComfyRepo("Comfy-Org/Qwen-Image_ComfyUI",
              ("split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
               "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
               "split_files/vae/qwen_image_vae.safetensors"),
              ("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512")),
    ComfyRepo("Comfy-Org/Qwen-Image-Edit_ComfyUI",
              ("split_files/diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors",),
              ("Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2511"),
              note="its text encoder and VAE are Qwen-Image's: fetch them from Comfy-Org/Qwen-Image_ComfyUI"),
)  # fmt: skip


def comfy_repo(repo_id: str) -> ComfyRepo | None:
    """The known Comfy-Org repo ``repo_id`` names (the Hub's ids are case-insensitive)."""
    wanted = repo_id.strip().lower()
    return next((r for r in COMFY_REPOS if r.repo_id.lower() == wanted), None)


def comfy_repo_for(diffusers_repo: str) -> ComfyRepo:
    """The Comfy-Org repo with the split files of a family's diffusers repo (Qwen-Image's when unknown)."""
    wanted = diffusers_repo.strip().lower()
    return next((r for r in COMFY_REPOS if wanted in (d.lower() for d in r.diffusers_repos)), COMFY_REPOS[0])


def configs_repo_for(repo_id: str) -> str:
    """The diffusers repo to take configs from: the family's, for a known Comfy-Org repo; else Qwen-Image's."""
    known = comfy_repo(repo_id)
    return (known or COMFY_REPOS[0]).diffusers_repos[0]


def select(files: Sequence[RemoteFile], allow: Sequence[str] | None,
           ignore: Sequence[str] | None) -> tuple[RemoteFile, ...]:
    """huggingface_hub's allow/ignore rules over the repo paths."""
    from huggingface_hub.utils import filter_repo_objects

    return tuple(filter_repo_objects(list(files), allow_patterns=list(allow) if allow else None,
                                     ignore_patterns=list(ignore) if ignore else None, key=lambda f: f.path))


def choose_files(files: Sequence[RemoteFile], repo_id: str, options: DownloadOptions) -> tuple[RemoteFile, ...]:
    """The files of ``files`` (one commit's listing) that a download with ``options`` takes.

    DownloadError (exit 2 or 4, in ``options.words``) when the layout cannot use this repo or nothing fits."""
    if options.layout is Layout.CONFIGS:
        return _configs(files, repo_id, options)
    if options.layout is Layout.COMFYUI:
        return _comfy(files, repo_id, options)
    return select(files, options.allow_patterns, options.ignore_patterns)


def _configs(files: Sequence[RemoteFile], repo_id: str, options: DownloadOptions) -> tuple[RemoteFile, ...]:
    words = options.words
    if not any(f.path == "model_index.json" for f in files):
        raise DownloadError(
            f"{repo_id} has no model_index.json: it is not a diffusers repo, so 'configs only' finds no configs in it.",
            fix=f"Set {words.repo} to the family's diffusers repo (e.g. {configs_repo_for(repo_id)}), or "
            f"{words.layout} to 'comfyui' for a repo of ComfyUI files.", exit_code=EXIT_USAGE)
    chosen = select(files, CONFIG_PATTERNS, options.ignore_patterns)
    if options.allow_patterns:  # narrows the configs; never widens them to weights
        chosen = select(chosen, options.allow_patterns, None)
    return tuple(f for f in chosen if not f.path.lower().endswith(WEIGHT_SUFFIXES))


def _comfy(files: Sequence[RemoteFile], repo_id: str, options: DownloadOptions) -> tuple[RemoteFile, ...]:
    words = options.words
    split = [f for f in files if f.path.startswith(f"{SPLIT_DIR}/")]
    if not split:
        raise DownloadError(
            f"{repo_id} has no {SPLIT_DIR}/ folder: it is not a repo of ComfyUI files (Comfy-Org repos keep them "
            f"under {SPLIT_DIR}/<kind>/).",
            fix=f"Set {words.repo} to a Comfy-Org repo (e.g. {comfy_repo_for(repo_id).repo_id}), or {words.layout} to "
            f"'diffusers' (or 'configs') for a diffusers repo.", exit_code=EXIT_USAGE)
    if options.allow_patterns:
        chosen = [f for f in split if _matches(f.path, options.allow_patterns)]
    else:
        chosen = _defaults(split, repo_id, words)
    if options.ignore_patterns:
        chosen = [f for f in chosen if not _matches(f.path, options.ignore_patterns)]
    refused = [f.path for f in chosen if not _placeable(f.path)]
    if refused:
        raise DownloadError(
            f"{words.allow} selects {refused[0]} of {repo_id}, which is not in one of the ComfyUI folders this layout "
            f"fills ({', '.join(COMFY_KINDS)}).",
            fix=f"Narrow {words.allow} to files under {SPLIT_DIR}/<{'|'.join(COMFY_KINDS)}>/; fetch other files with "
            f"the diffusers layout.", exit_code=EXIT_USAGE)
    pickled = [f.path for f in chosen if f.path.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise DownloadError(f"{words.allow} selects {pickled[0]} of {repo_id}, a pickled file: this pack never puts "
                            f"pickles (which can run code when loaded) into ComfyUI's folders.",
                            fix=f"Choose its .safetensors (or .gguf) version in {words.allow}.", exit_code=EXIT_USAGE)
    if not chosen:
        raise DownloadError(f"No file of {repo_id} under {SPLIT_DIR}/ matches {words.allow} (and {words.ignore}).",
                            fix=f"Name files it has (names or globs): {_available(split)}.", exit_code=EXIT_USAGE)
    return tuple(chosen)


def _defaults(split: list[RemoteFile], repo_id: str, words: Words) -> list[RemoteFile]:
    known = comfy_repo(repo_id)
    if known is None:
        raise DownloadError(
            f"{repo_id}: no default set of files is known for this repo, and fetching all of its files could be "
            f"hundreds of GB.", fix=f"Name the files in {words.allow} (names or globs); it has: {_available(split)}.",
            exit_code=EXIT_USAGE)
    by_path = {f.path: f for f in split}
    missing = [p for p in known.defaults if p not in by_path]
    if missing:
        raise DownloadError(f"{repo_id} no longer has {missing[0]} (one of this layout's default files for it).",
                            fix=f"Name the files in {words.allow}; it has: {_available(split)}.",
                            exit_code=EXIT_NOT_FOUND)
    return [by_path[p] for p in known.defaults]


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """A pattern matches the repo path, the path under split_files/ or the bare file name."""
    forms = (path, path.split("/", 1)[-1], path.rsplit("/", 1)[-1])
    for pattern in patterns:
        pattern = pattern + "*" if pattern.endswith("/") else pattern  # a folder means what is in it
        if any(fnmatch(form, pattern) for form in forms):
            return True
    return False


def _placeable(path: str) -> bool:
    try:
        comfy_destination(path)
    except InvalidInputError:
        return False
    return True


def _available(split: list[RemoteFile], limit: int = 10) -> str:
    names = [f.path.removeprefix(f"{SPLIT_DIR}/") for f in split if _placeable(f.path)]
    shown = ", ".join(names[:limit]) or "none in these folders"
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
