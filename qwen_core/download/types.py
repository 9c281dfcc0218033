"""Plain types of the download package: exit codes, options, progress, results, the endpoint decision.

This is the leaf of ``qwen_core.download``: every other module of the package imports it, and it imports no
module of the package. It holds data and validation only; no I/O.

Exit codes of the CLI (``python -m qwen_core download`` / ``tools/robust_download.py``), also listed in the
README "Downloads" section, are the ``EXIT_*`` constants below.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from urllib.parse import urlsplit

from qwen_core.errors import DownloadError, InvalidInputError
from qwen_core.paths import validate_revision
from qwen_core.validation import whole_number

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_NOT_FOUND = 4
EXIT_NETWORK = 5
EXIT_VERIFY = 6
EXIT_DISK = 7
EXIT_UNSAFE = 8
EXIT_LOCKED = 9
EXIT_OFFLINE_MISSING = 10
EXIT_CANCELLED = 130

PROGRESS_MIN = 64 * 1024  # new bytes an attempt must add to count as progress (a server can't trickle forever)

EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 unexpected error, 2 bad arguments, 3 access denied (set HF_TOKEN), 4 not found, "
    "5 network kept failing (rerun to resume), 6 verification failed or the server sent something else than the "
    "file, 7 disk full / file-size limit / target not writable, 8 unsafe or malformed answer from the server "
    "(filename, redirect, listing), 9 file locked by another download, 10 offline and files missing, "
    "130 interrupted (partials kept). The token is read from HF_TOKEN or `hf auth login` only. "
    "Every error is also written, with its fix, to the session log (reports/last_session.log)."
)

# A resolver maps (host, port) to IP address strings; tests inject a fake DNS.
Resolver = Callable[[str, int], list[str]]


class Engine(str, Enum):
    """``auto``/``http``: our resumable ranged HTTP engine; ``xet``: huggingface_hub + hf_xet where offered."""

    AUTO = "auto"
    HTTP = "http"
    XET = "xet"


class EndpointSource(str, Enum):
    WORKFLOW = "workflow"  # typed into a (possibly shared) workflow: untrusted
    USER = "user"  # the CLI's --endpoint or a library caller's argument: the user's own choice
    ENV = "env"  # HF_ENDPOINT
    DEFAULT = "default"  # huggingface.co


class Layout(str, Enum):
    """Where a repo's files go.

    ``diffusers``: the whole repo (or the patterns' files) as a diffusers folder, ``<store>/<org>/<name>``.
    ``comfyui``: chosen ``split_files/<kind>/<file>`` of a Comfy-Org repo straight into ComfyUI's folders
    (``models/diffusion_models``, ``text_encoders``, ``vae``, ``loras``), for our Loader and native workflows.
    ``configs``: a family's diffusers repo without weights (model_index.json, configs, tokenizer, scheduler,
    processor): the few MB a model assembled from ComfyUI's files needs beside them.
    """

    DIFFUSERS = "diffusers"
    COMFYUI = "comfyui"
    CONFIGS = "configs"

    @classmethod
    def from_text(cls, value: object) -> Layout:
        """The CLI's ``diffusers|comfyui|configs`` or the node's ``diffusers|comfyui files|configs only``."""
        if isinstance(value, Layout):
            return value
        words = str(value).strip().lower().split()
        try:
            return cls(words[0] if words else "")
        except ValueError as err:
            raise InvalidInputError("layout", f"{value!r} is not one of diffusers, comfyui (comfyui files), configs "
                                    f"(configs only).") from err


# ComfyUI's folders the comfyui layout fills, by the name of the folder under split_files/ in a Comfy-Org repo.
COMFY_KINDS = ("diffusion_models", "text_encoders", "vae", "loras")


@dataclass(frozen=True)
class Endpoint:
    """Where a download goes, whether the user's token may go there, and the guard its redirects must pass.

    Built in one place, ``endpoint.resolve_endpoint()``; used for the listing and for every file request.
    """

    url: str
    source: EndpointSource
    message: str  # one line for the node's report / the CLI log
    send_token: bool = True  # False for a host only a workflow names: requests go out anonymously
    # Called with every redirect target (and next-page link); raises QwenError to refuse it. Set when only the
    # public-address check let this endpoint in: a public host could otherwise 302 us to 169.254.169.254.
    redirect_guard: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    @property
    def host(self) -> str:
        """``host[:port]`` for messages (never a user name or password)."""
        return urlsplit(self.url).netloc.rpartition("@")[2]


@dataclass(frozen=True)
class Words:
    """How messages name the user's controls: CLI flags, or the Downloader node's fields."""

    revision: str = "--revision"
    endpoint: str = "--endpoint (or HF_ENDPOINT)"
    target: str = "--out-dir"
    ignore: str = "--ignore"
    offline: str = "unset HF_HUB_OFFLINE (or drop --offline)"
    rerun: str = "run the same command again"
    repo: str = "the repo id"
    allow: str = "--allow"
    layout: str = "--layout"


CLI_WORDS = Words()
NODE_WORDS = Words(
    revision="the `revision` field",
    endpoint="the `endpoint` field (or HF_ENDPOINT in the environment that starts ComfyUI)",
    target="ComfyUI's models folder (another disk: extra_model_paths.yaml)",
    ignore="the `ignore_patterns` field",
    offline="unset HF_HUB_OFFLINE in the environment that starts ComfyUI",
    rerun="queue the workflow again",
    repo="the `repo_id` field",
    allow="the `allow_patterns` field",
    layout="the `layout` field",
)


@dataclass(frozen=True)
class HttpConfig:
    """Knobs of the HTTP engine; tests shrink the timeouts and backoff."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # no byte for this long = a stalled server -> retry, never a hang
    chunk_size: int = 1024 * 1024
    # Failed attempts allowed per file after the first, with backoff. An attempt fails unless it adds new bytes
    # (at least PROGRESS_MIN, or the file's end) beyond the most this file has held in this run.
    retries: int = 3
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0
    lock_timeout: float = 120.0  # seconds without progress of another holder before we give up
    pipeline_hash: bool = True  # hash on a helper thread, overlapping the next socket read


def split_patterns(value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """Globs from a string or list, each item comma- or newline-separated (CLI flags, the node's text box)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise InvalidInputError("allow_patterns/ignore_patterns", f"{value!r} must be text (globs).")
    return tuple(p.strip() for item in items for p in re.split(r"[,\n]", item) if p.strip()) or None


@dataclass(frozen=True)
class DownloadOptions:
    """What ``download_repo(repo_id, options)`` should do; validated and normalised when built.

    ``local_dir`` defaults to ``paths.repo_folder(repo_id)``; ``endpoint`` None means HF_ENDPOINT or
    huggingface.co; ``token`` False = anonymous, a string = that token, None = HF_TOKEN / `hf auth login`;
    ``offline`` None reads HF_HUB_OFFLINE.
    """

    revision: str = "main"
    local_dir: Path | None = None
    allow_patterns: Sequence[str] | str | None = None
    ignore_patterns: Sequence[str] | str | None = None
    endpoint: Endpoint | None = None
    token: str | bool | None = field(default=None, repr=False)  # never in a repr or a traceback's locals
    workers: int = 8
    engine: Engine = Engine.AUTO
    offline: bool | None = None
    dry_run: bool = False
    verify: bool = False  # re-hash every present file (sha256 / git blob id) instead of trusting its record
    http: HttpConfig = field(default_factory=HttpConfig)
    words: Words = CLI_WORDS  # NODE_WORDS when the Downloader node calls
    layout: Layout = Layout.DIFFUSERS
    # comfyui layout: the folder of each kind in COMFY_KINDS (default: ``<local_dir>/<kind>``, where local_dir
    # is ComfyUI's models folder); the ComfyUI bridge passes ComfyUI's own folders.
    comfy_dirs: Mapping[str, Path] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "revision", validate_revision(self.revision))
        set_(self, "workers", whole_number("workers", self.workers, 1, 64))
        try:
            set_(self, "engine", Engine(self.engine))
        except ValueError as err:
            raise InvalidInputError("engine", f"{self.engine!r} is not one of "
                                    f"{', '.join(e.value for e in Engine)}.") from err
        if self.local_dir is not None:
            set_(self, "local_dir", Path(self.local_dir))
        set_(self, "allow_patterns", split_patterns(self.allow_patterns))
        set_(self, "ignore_patterns", split_patterns(self.ignore_patterns))
        if self.endpoint is not None and not isinstance(self.endpoint, Endpoint):
            raise InvalidInputError("endpoint", "must be an Endpoint from qwen_core.download.resolve_endpoint().")
        if self.http.retries < 0:
            raise InvalidInputError("retries", f"{self.http.retries} must be 0 or more.")
        set_(self, "layout", Layout.from_text(self.layout))
        if self.comfy_dirs is not None:
            if self.layout is not Layout.COMFYUI:
                raise InvalidInputError("comfy_dirs", f"is only for the comfyui layout, not {self.layout.value}.")
            unknown = sorted(set(self.comfy_dirs) - set(COMFY_KINDS))
            if unknown:
                raise InvalidInputError("comfy_dirs", f"{unknown[0]!r} is not one of {', '.join(COMFY_KINDS)}.")
            set_(self, "comfy_dirs", {kind: Path(folder) for kind, folder in self.comfy_dirs.items()})


@dataclass(frozen=True)
class DownloadHooks:
    """Callbacks of one download; all run on the caller's thread (the workers only set/read an Event), so a
    ComfyUI progress hook may raise to cancel."""

    progress: Callable[[DownloadProgress], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_message: Callable[[str], None] | None = None


@dataclass(frozen=True)
class RemoteFile:
    """One file of the resolved repo. ``path`` is already validated (relative, posix, no `..`)."""

    path: str
    size: int
    sha256: str | None = None  # LFS files: the content hash we verify
    etag: str | None = None  # non-LFS files: the git blob id (sha1 of "blob <size>\0" + content)

    def identity(self) -> dict:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "etag": self.etag}


@dataclass(frozen=True)
class FileOutcome:
    path: str
    status: str  # "present" (verified earlier/now, nothing fetched) | "downloaded" | "resumed"
    fetched: int


@dataclass(frozen=True)
class DownloadProgress:
    """What the progress callback receives (about 4 times a second and once at the end)."""

    repo_id: str
    phase: str  # "resolving" (listing the repo) | "downloading" | "done"
    bytes_done: int  # includes bytes already present or resumed, so the bar never jumps backwards on resume
    bytes_total: int
    files_done: int
    files_total: int
    bytes_per_s: float  # network speed over the last ~5 s
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0

    def text(self) -> str:
        eta = "" if self.eta_s is None else f"  ETA {fmt_duration(self.eta_s)}"
        return (f"{self.repo_id}: {fmt_bytes(self.bytes_done)} / {fmt_bytes(self.bytes_total)} "
                f"({100 * self.fraction:.0f}%)  files {self.files_done}/{self.files_total}  "
                f"{self.bytes_per_s / 1e6:.1f} MB/s{eta}")


@dataclass(frozen=True)
class DownloadResult:
    repo_id: str
    revision: str
    commit: str
    local_dir: Path
    files: tuple[str, ...]
    bytes_total: int
    bytes_fetched: int  # over the network in this run
    files_present: int  # verified earlier (or now) and not fetched again
    files_resumed: int
    elapsed_s: float
    engine: str  # "http", "xet", "local" (complete copy, no network), "offline"
    dry_run: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    destinations: tuple[Path, ...] = ()  # where each of ``files`` is on disk (the comfyui layout maps them)
    layout: Layout = Layout.DIFFUSERS


class DiskFullError(DownloadError):
    """ENOSPC/EDQUOT while writing: partials are kept; the orchestrator adds how much space is needed."""


class FileSizeLimitError(DownloadError):
    """EFBIG: a file-size limit (RLIMIT_FSIZE, FAT32) stopped a write; free space would not help."""


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
