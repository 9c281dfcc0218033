"""Where the downloader keeps its bookkeeping inside a model folder, how it writes it, and how file-system
errors become messages.

Layout under the download root (the model folder)::

    <root>/<path>                          the verified file (a real file, never a symlink)
    <root>/.qwen_download/plan.json        the last listing (repo, revision, commit, files): offline checks
    <root>/.qwen_download/<path>.part      bytes received so far
    <root>/.qwen_download/<path>.part.json sidecar: url, size, sha256/etag, commit of what the .part holds
    <root>/.qwen_download/<path>.lock      inter-process lock (see file_lock.py)
    <root>/.qwen_download/<path>.ok        verified record: size, hash, mtime of the final file

The ``.part`` must be on the file system of its final file, or the closing rename fails (EXDEV): when a
component folder is a symlink onto another disk, its parts live in ``<root>/<folder>/.qwen_download/`` instead.
Names longer than 200 bytes are shortened (with a hash) in the bookkeeping folder, so ``.part.json`` still fits
a 255-byte file-name limit when the file's own name does.

The ComfyUI files layout (``Placement.comfy``) puts each ``split_files/<kind>/<name>`` of a Comfy-Org repo at
``<ComfyUI folder of kind>/<name>`` and keeps the same bookkeeping in ``<models>/.qwen_download/<org>/<repo>/``
(same names as above, with the repo path), for three reasons: ComfyUI's model folders get the verified files
and nothing else (ComfyUI lists no folder of ``models/`` itself, and a hidden one nowhere); each repo keeps its
own ``plan.json``, so two repos that both fill ``models/vae`` never overwrite each other's listing; and it is on
the file system of the models folder, like the files (a kind's folder on another disk stages its parts in its
own ``.qwen_download/``, as above).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qwen_core.atomic_io import write_bytes_atomic
from qwen_core.download.types import COMFY_KINDS, EXIT_DISK, DiskFullError, FileSizeLimitError, Words
from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import safe_join, validate_repo_id

STAGING_DIR = ".qwen_download"
PLAN_FILE = "plan.json"
STAGED_NAME_MAX = 200  # bytes; ".part.json" adds 10, and 255 is the usual file-name limit
SPLIT_DIR = "split_files"  # where a Comfy-Org repo keeps its files: split_files/<kind>/<name>


def plan_path(root: Path) -> Path:
    return Placement.tree(root).plan_file


def comfy_destination(path: str) -> tuple[str, str]:
    """(kind, name inside ComfyUI's folder of that kind) of a repo file ``split_files/<kind>/<name>``.

    InvalidInputError for any other path: a kind ComfyUI's folders this layout fills do not include, a name
    that would reach into the bookkeeping folder, or one that is not a plain relative path."""
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) < 3 or parts[0] != SPLIT_DIR or parts[1] not in COMFY_KINDS:
        raise InvalidInputError("path", f"{path!r} is not a file under {SPLIT_DIR}/<kind>/ with kind one of "
                                f"{', '.join(COMFY_KINDS)}.")
    name = "/".join(parts[2:])
    safe_join(Path("."), name)  # a plain relative name: no '..', no absolute path
    if STAGING_DIR in parts[2:]:
        raise InvalidInputError("path", f"{path!r} would write into the download bookkeeping folder.")
    return parts[1], name


def staged_name(name: str) -> str:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= STAGED_NAME_MAX:
        return name
    head = raw[:120].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"


def on_other_device(folder: Path, root: Path) -> bool:
    try:
        return os.stat(folder).st_dev != os.stat(root).st_dev
    except OSError:
        return False  # not created yet: it will be created on root's file system


@dataclass(frozen=True)
class Staging:
    part: Path
    sidecar: Path
    lock: Path
    record: Path

    @classmethod
    def for_file(cls, root: Path, path: str) -> Staging:
        """The bookkeeping of ``path`` in a diffusers-layout download into ``root``."""
        return Placement.tree(root).stage(path)


@dataclass(frozen=True)
class Placement:
    """Where the files of one download go, and where its bookkeeping lives.

    ``tree(root)`` (diffusers, configs only): ``<root>/<repo path>``, bookkeeping in ``<root>/.qwen_download``.
    ``comfy(models, repo_id, folders)``: ``split_files/<kind>/<name>`` at ``<folders[kind]>/<name>``,
    bookkeeping in ``<models>/.qwen_download/<org>/<repo>`` (the module docstring says why).
    """

    root: Path  # the target: the model folder, or ComfyUI's models folder
    staging: Path  # the bookkeeping folder of this download
    folders: tuple[tuple[str, Path], ...] = ()  # comfyui layout: (kind, folder) for each kind in COMFY_KINDS

    @classmethod
    def tree(cls, root: Path) -> Placement:
        return cls(Path(root), Path(root) / STAGING_DIR)

    @classmethod
    def comfy(cls, models: Path, repo_id: str, folders: Mapping[str, Path] | None = None) -> Placement:
        """ComfyUI's models folder ``models``; ``folders`` overrides ``<models>/<kind>`` per kind."""
        models = Path(models)
        chosen = {kind: models / kind for kind in COMFY_KINDS} | {k: Path(v) for k, v in (folders or {}).items()}
        return cls(models, safe_join(models / STAGING_DIR, validate_repo_id(repo_id)),
                   tuple((kind, chosen[kind]) for kind in COMFY_KINDS))

    @property
    def is_comfy(self) -> bool:
        return bool(self.folders)

    @property
    def plan_file(self) -> Path:
        return self.staging / PLAN_FILE

    def folder_of(self, kind: str) -> Path:
        return dict(self.folders)[kind]

    def local_name(self, path: str) -> str:
        """The file's name inside the folder it goes to (the repo path for the tree layout)."""
        return comfy_destination(path)[1] if self.folders else path

    def final(self, path: str) -> Path:
        """Where the verified file of repo path ``path`` goes; never outside its folder."""
        if not self.folders:
            return safe_join(self.root, path)
        kind, name = comfy_destination(path)
        return safe_join(self.folder_of(kind), name)

    def places(self, path: str) -> bool:
        """Whether this placement has a place for ``path`` (every path in the tree layout)."""
        try:
            self.final(path)
        except InvalidInputError:
            return False
        return True

    def target_folders(self, paths: Iterable[str]) -> list[Path]:
        """The folders files of ``paths`` go into: ``[root]``, or each ComfyUI folder used, in kind order."""
        if not self.folders:
            return [self.root]
        used = {comfy_destination(p)[0] for p in paths}
        return [folder for kind, folder in self.folders if kind in used]

    def stage(self, path: str) -> Staging:
        """The bookkeeping of repo path ``path``: ``.part`` on the final file's file system, the rest in staging."""
        final = self.final(path)
        base = safe_join(self.staging, path)
        base = base.with_name(staged_name(base.name))
        part_base = base
        if on_other_device(final.parent, self.root):
            part_base = final.parent / STAGING_DIR / staged_name(final.name)
        return Staging(part=part_base.with_name(part_base.name + ".part"),
                       sidecar=part_base.with_name(part_base.name + ".part.json"),
                       lock=base.with_name(base.name + ".lock"), record=base.with_name(base.name + ".ok"))


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` through a temp file and a rename (``atomic_io``); on any error the temp file is
    removed and the OSError raised (callers turn it into a message with ``fs_error``)."""
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when missing, unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fs_error(err: OSError, path: Path | str, words: Words) -> DownloadError:
    """A DownloadError (exit 7) that says what the file system refused, where, and what to do."""
    where = err.filename or path
    why = err.strerror or str(err)
    code = err.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return DiskFullError(f"No space left on the disk while writing {where} ({why}).",
                             fix=f"Free some space on that disk (or choose another {words.target}) and {words.rerun}: "
                             f"it resumes.", exit_code=EXIT_DISK)
    if code == errno.EFBIG:
        return FileSizeLimitError(
            f"A file-size limit stopped writing {where} ({why}). This is not a full disk: the limit is the process's "
            f"(`ulimit -f`) or the file system's largest file (FAT32: 4 GiB).",
            fix=f"Raise the limit (`ulimit -f unlimited`) or choose a target on a file system for large files (ext4, "
            f"NTFS, APFS) as {words.target}, then {words.rerun}: it resumes.", exit_code=EXIT_DISK)
    if code == errno.ENAMETOOLONG:
        return DownloadError(f"The name {where} is too long for the file system it goes to ({why}).",
                             fix=f"Skip that file with {words.ignore}, or choose {words.target} on a file system "
                             f"that allows longer names.", exit_code=EXIT_DISK)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DownloadError(f"{where} cannot be written ({why}).",
                             fix=f"Fix the folder's permissions, or choose another {words.target}.", exit_code=EXIT_DISK)
    if code in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
        return DownloadError(f"Something is in the way at {where} ({why}): a folder where the download needs a file, "
                             f"or a file where it needs a folder.",
                             fix=f"Move it out of the model folder (it is not part of this repo), then {words.rerun}.",
                             exit_code=EXIT_DISK)
    return DownloadError(f"Writing {where} failed ({why}).",
                         fix=f"Check the disk that holds {words.target}, then {words.rerun}.", exit_code=EXIT_DISK)
