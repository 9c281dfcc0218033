"""Model-folder checks that run before any weight is loaded.

Large checkpoints fail in ways that surface as cryptic errors deep inside loading: a truncated shard gives
safetensors' "MetadataIncompleteBuffer", a Git-LFS pointer saved in place of the weights gives
"HeaderTooLarge", a missing shard a KeyError somewhere in accelerate. Here each of those is found up front
by reading only the few bytes that matter (the 8-byte header length, the JSON header, the file size), so
checking a 40 GB folder takes milliseconds, and the error names the file and the fix.

Pickled weights (.bin/.pt/.ckpt/.pth) are refused outright: unpickling can run arbitrary code, and a
folder that mixes them in is not one we trust to load.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from qwen_core.errors import ModelFolderError
from qwen_core.families import FAMILIES, ModelFamily, family_for_pipeline_class

# Component libraries diffusers may import a component class from; anything else (e.g. a repo-local
# module) would mean remote code.
ALLOWED_COMPONENT_LIBRARIES: frozenset[str] = frozenset({"diffusers", "transformers"})
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors itself refuses headers above 100 MB (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
REDOWNLOAD_FIX = (
    "Re-download the model with the Downloader (node or `python -m qwen_core download`): it resumes "
    "partial files and verifies sizes and hashes."
)
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsInfo:
    """What a header says about one .safetensors file."""

    path: Path
    tensors: dict[str, dict]
    header_bytes: int
    data_bytes: int

    @property
    def num_params(self) -> int:
        return sum(_element_count(meta) for meta in self.tensors.values())

    @property
    def dtypes(self) -> set[str]:
        return {str(meta.get("dtype")) for meta in self.tensors.values()}


@dataclass
class ModelFolder:
    """A validated diffusers model folder: its family, components, and the weight files of each component."""

    path: Path
    family: ModelFamily
    components: dict[str, tuple[str, str]]
    weight_files: dict[str, list[SafetensorsInfo]] = field(default_factory=dict)
    # Pipeline config the loader sets on the built pipeline because model_index.json lacks it (see
    # ``modular_sample_sigmas``).
    pipeline_config: dict[str, object] = field(default_factory=dict)

    @property
    def class_name(self) -> str:
        return self.family.pipeline_class

    def num_params(self, component: str) -> int:
        return sum(info.num_params for info in self.weight_files.get(component, []))

    def stored_bytes(self, component: str | None = None) -> int:
        names = [component] if component else list(self.weight_files)
        return sum(info.data_bytes for name in names for info in self.weight_files.get(name, []))


def _element_count(meta: dict) -> int:
    """Number of elements of one header entry (a scalar's empty shape counts 1)."""
    return math.prod(int(dim) for dim in meta.get("shape", []))


def _bad_file(path: Path, what: str, fix: str = REDOWNLOAD_FIX) -> ModelFolderError:
    return ModelFolderError(f"{path}: {what}", fix=fix)


def read_safetensors_header(path: Path) -> SafetensorsInfo:
    """Parse the header of one .safetensors file and check the file is exactly as long as it says."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad_file(path, f"is {size} bytes long, too short to be a safetensors file (empty or truncated).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            # A real header is < 100 MB, so its length has zero high bytes; printable text here means the
            # file is a text file saved under a .safetensors name.
            text = (head + fh.read(200)).decode("utf-8", "replace")
            if text.startswith("version ") and "git-lfs" in text:
                raise _bad_file(
                    path,
                    "is a Git-LFS pointer file (a few lines of text), not the weights. It was cloned without "
                    "`git lfs` or copied from a repo checkout; loading it fails with 'HeaderTooLarge'.",
                )
            if text.lstrip().startswith(("<", "{")):
                raise _bad_file(path, "holds text (an HTML error page or JSON) instead of safetensors weights.")
            raise _bad_file(path, f"has a header length of {header_len} bytes: not a safetensors file ('HeaderTooLarge').")
        if 8 + header_len > size:
            raise _bad_file(path, f"is truncated inside its header ({size} bytes on disk, header needs {8 + header_len}).")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad_file(path, f"has a corrupt safetensors header ({err}).") from err
    if not isinstance(header, dict):
        raise _bad_file(path, "has a safetensors header that is not a JSON object.")
    header.pop("__metadata__", None)
    data_bytes = _check_offsets(path, header)
    expected = 8 + header_len + data_bytes
    if size < expected:
        missing = expected - size
        raise _bad_file(
            path,
            f"is truncated: {size:,} bytes on disk, its header needs {expected:,} ({missing:,} missing, "
            f"{100 * size / expected:.1f}% present). An interrupted download gives this "
            "('MetadataIncompleteBuffer' when loading).",
        )
    if size > expected:
        raise _bad_file(path, f"has {size - expected:,} unexpected bytes after its data (corrupt or overwritten).")
    return SafetensorsInfo(path=path, tensors=header, header_bytes=header_len, data_bytes=data_bytes)


def _check_offsets(path: Path, header: dict) -> int:
    """Tensors must tile the data block exactly (as safetensors requires); returns the data length."""
    spans = []
    for name, meta in header.items():
        if not isinstance(meta, dict) or "data_offsets" not in meta:
            raise _bad_file(path, f"has a malformed header entry for tensor {name!r}.")
        begin, end = (int(v) for v in meta["data_offsets"])
        width = _DTYPE_BYTES.get(str(meta.get("dtype")))
        if width is not None and end - begin != _element_count(meta) * width:
            raise _bad_file(path, f"tensor {name!r}: byte range does not match its shape and dtype.")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position or end < begin:
            raise _bad_file(path, "has overlapping or gapped tensor offsets (corrupt header).")
        position = end
    return position


def check_index(index_path: Path) -> list[SafetensorsInfo]:
    """Every shard an index names exists, is intact, and holds the tensors the index maps to it."""
    try:
        index = json.loads(Path(index_path).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _bad_file(index_path, f"is not a readable safetensors index ({err}).") from err
    if not isinstance(weight_map, dict):
        raise _bad_file(index_path, "is not a safetensors index: `weight_map` must be a JSON object.")
    by_shard: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        by_shard.setdefault(str(shard), set()).add(tensor)
    infos = []
    for shard, tensors in sorted(by_shard.items()):
        # The shard name comes from a downloaded file: only a plain file name beside the index is accepted.
        if Path(shard).name != shard or "\\" in shard or shard in ("", ".", ".."):
            raise _bad_file(index_path, f"names a shard outside its folder: {shard!r}.")
        shard_path = Path(index_path).parent / shard
        if not shard_path.is_file():
            what = "is a folder, not a file" if shard_path.is_dir() else "is missing"
            raise _bad_file(shard_path, f"{what} (named by {Path(index_path).name}).")
        info = read_safetensors_header(shard_path)
        absent = sorted(tensors - info.tensors.keys())
        if absent:
            raise _bad_file(shard_path, f"lacks {len(absent)} tensor(s) its index expects, e.g. {absent[0]!r}.")
        infos.append(info)
    return infos


def find_pickle_files(folder: Path) -> list[Path]:
    """Pickled weight files anywhere under the folder (hidden dirs such as .cache are included)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)


def find_lfs_pointers(folder: Path) -> list[Path]:
    """Small text files that are Git-LFS pointers (weights, tokenizer.json, ... never fetched)."""
    found = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.stat().st_size < 1024:
            with p.open("rb") as fh:
                if fh.read(40).startswith(b"version https://git-lfs"):
                    found.append(p)
    return found


def read_model_index(folder: Path) -> tuple[ModelFamily, dict[str, tuple[str, str]]]:
    """The family and {component: (library, class)} from model_index.json: an allowlisted pipeline class,
    component libraries that run no code from the folder, and the component classes that family has."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        if (folder / "modular_model_index.json").is_file():
            raise ModelFolderError(
                f"{folder}: holds only modular_model_index.json, a diffusers *modular* pipeline (e.g. a "
                "Qwen-Image 2.1 Turbo modular repo). This pack loads standard pipeline folders: a modular repo's "
                "components may point into other repos (fetched at load time), and a ModularPipeline has no "
                "per-step callback, so progress, Cancel and the NaN watch could not work.",
                fix="Download the diffusers-format repo (model_index.json + component folders), e.g. "
                "Qwen/Qwen-Image-2.1-Turbo, which QwenImage21Pipeline runs with its own 8-step sigma grid.",
            )
        what = "is a folder, not a file" if index_path.is_dir() else "is missing"
        raise ModelFolderError(
            f"{folder}: model_index.json {what}, so this is not a diffusers pipeline folder.",
            fix="Point the loader at the folder that contains model_index.json (e.g. the Qwen/Qwen-Image repo root).",
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _bad_file(index_path, f"is not valid JSON ({err}).") from err
    if not isinstance(index, dict):
        raise _bad_file(index_path, f"must be a JSON object with `_class_name` and components, not a {type(index).__name__}.")
    sigmas = modular_sample_sigmas(folder, index)
    family = family_for_pipeline_class(str(index.get("_class_name", "")), str(index_path),
                                       index={**index, "sample_sigmas": sigmas} if sigmas else index,
                                       transformer_config=_transformer_config(folder))  # fmt: skip
    components: dict[str, tuple[str, str]] = {}
    for name, value in index.items():
        if name.startswith("_") or not is_component_spec(value):
            continue  # metadata, an absent optional component ([null, null]) or pipeline config (sample_sigmas)
        library, cls = str(value[0]), str(value[1])
        if library not in ALLOWED_COMPONENT_LIBRARIES:
            raise ModelFolderError(
                f"{index_path}: component {name!r} comes from {library!r}, which would run code from the model "
                "folder (custom/remote code is never loaded).",
                fix="Use an official diffusers-format Qwen-Image folder.",
            )
        components[name] = (library, cls)
    _check_components(index_path, family, components)
    return family, components


def modular_sample_sigmas(folder: Path, index: dict) -> list[float] | None:
    """A checkpoint's own sampling grid when model_index.json lacks it but the folder's modular_model_index.json
    (written for diffusers' modular pipelines, e.g. 2.1 Turbo's) has it; else None. Plain JSON, numbers only."""
    if index.get("_class_name") != "QwenImage21Pipeline" or index.get("sample_sigmas"):
        return None
    try:
        modular = json.loads((folder / "modular_model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sigmas = modular.get("sample_sigmas") if isinstance(modular, dict) else None
    if isinstance(sigmas, list) and sigmas and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigmas):
        return [float(v) for v in sigmas]
    return None


def is_component_spec(value: object) -> bool:
    """A model_index.json entry that names a component: ["library", "Class"]. Pipeline config values (e.g. 2.1's
    `sample_sigmas`, a list of numbers) and absent optional components ([null, null]) are not."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _transformer_config(folder: Path) -> dict:
    """transformer/config.json (it tells variants of one pipeline class apart, e.g. Edit-2511's `zero_cond_t`);
    {} when absent: the component checks below report a missing transformer."""
    path = folder / "transformer" / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _bad_file(path, f"is not valid JSON ({err}).") from err
    return config if isinstance(config, dict) else {}


def _same_class(found: str, expected: str) -> bool:
    # Tokenizers are saved as the slow or the fast class depending on the transformers version.
    return found.removesuffix("Fast") == expected.removesuffix("Fast")


def _check_components(index_path: Path, family: ModelFamily, components: dict[str, tuple[str, str]]) -> None:
    """Every component of the family is listed with the family's class: a folder whose model_index.json says
    one family while its parts belong to another (a 2.1 transformer under a Qwen-Image index) is refused."""
    for name, (library, expected) in family.components.items():
        found = components.get(name)
        if found is None:
            raise ModelFolderError(
                f"{index_path}: declares {family.pipeline_class} ({family.display_name}) but lists no {name!r} "
                f"component ({family.display_name} needs {expected}).",
                fix=REDOWNLOAD_FIX,
            )
        if found[0] != library or not _same_class(found[1], expected):
            owners = sorted({f.display_name for f in FAMILIES.values()
                             if _same_class(f.components.get(name, ("", ""))[1], found[1])})
            belongs = f"a {' / '.join(owners)} part" if owners else "no family this pack runs"
            raise ModelFolderError(
                f"{index_path}: declares {family.pipeline_class} ({family.display_name}), whose {name} is "
                f"{expected}, but the folder's {name} is {found[1]} ({belongs}): the files belong to another model.",
                fix=f"Use a complete {family.display_name} folder (e.g. {', '.join(family.repo_ids[:2]) or 'its repo'}).",
            )


def _component_weights(folder: Path, name: str) -> list[SafetensorsInfo]:
    sub = folder / name
    if not sub.is_dir():
        raise ModelFolderError(
            f"{folder}: component folder {name!r} (listed in model_index.json) is missing.", fix=REDOWNLOAD_FIX
        )
    if not (sub / "config.json").is_file():
        return []  # tokenizer, processor, scheduler: configs only, no weights
    indexes = sorted(sub.glob("*.safetensors.index.json"))
    if indexes:
        return [info for index in indexes for info in check_index(index)]
    files = sorted(sub.glob("*.safetensors"))
    folders = [p for p in files if not p.is_file()]
    if folders:
        raise ModelFolderError(f"{folders[0]}: is a folder, not a safetensors file.", fix=REDOWNLOAD_FIX)
    if not files:
        raise ModelFolderError(f"{sub}: has a config.json but no .safetensors weights.", fix=REDOWNLOAD_FIX)
    return [read_safetensors_header(p) for p in files]


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding model_index.json. A Hugging Face cache repo folder (``models--Org--Name`` with
    ``refs/`` and ``snapshots/``) resolves to the snapshot its ``refs/main`` names; anything else is kept."""
    folder = Path(path).expanduser()
    ref = folder / "refs" / "main"
    if not (folder / "model_index.json").exists() and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        # The ref is file content from the cache: accept only a plain commit-hash-like name.
        if commit.isalnum() and (folder / "snapshots" / commit / "model_index.json").is_file():
            return folder / "snapshots" / commit
    return folder


def check_model_folder(path: str | Path) -> ModelFolder:
    """Validate a diffusers Qwen-Image folder without loading weights; raise ModelFolderError naming the file."""
    folder = resolve_model_dir(path)
    if not folder.is_dir():
        raise ModelFolderError(
            f"{folder}: no such folder.", fix="Download the model first (Downloader node or `python -m qwen_core download`)."
        )
    pickles = find_pickle_files(folder)
    if pickles:
        shown = ", ".join(str(p.relative_to(folder)) for p in pickles[:3])
        raise ModelFolderError(
            f"{folder}: holds pickled weight files ({shown}{', ...' if len(pickles) > 3 else ''}). Pickle files can "
            "run arbitrary code when loaded, so this pack only loads .safetensors.",
            fix="Delete the pickle files, or download a safetensors-only copy with the Downloader.",
        )
    pointers = find_lfs_pointers(folder)
    if pointers:
        shown = ", ".join(str(p.relative_to(folder)) for p in pointers[:3])
        raise ModelFolderError(
            f"{folder}: {len(pointers)} file(s) are Git-LFS pointers, not the real content ({shown}). The folder "
            "was cloned without `git lfs`; loading would fail with 'HeaderTooLarge' or a JSON error.",
            fix=REDOWNLOAD_FIX,
        )
    family, components = read_model_index(folder)
    model = ModelFolder(path=folder, family=family, components=components)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))  # read_model_index checked it
    sigmas = modular_sample_sigmas(folder, index)
    if sigmas:
        model.pipeline_config["sample_sigmas"] = sigmas
    for name in components:
        model.weight_files[name] = _component_weights(folder, name)
    return model
