"""Build a tiny random pipeline of any Qwen-Image family offline, for the demo, the CPU workflows and the tests.

The pipeline is the family's real diffusers class (``QwenImagePipeline``, ``QwenImageEditPlusPipeline``,
``QwenImage21Pipeline``, ...) with random weights and the component sizes of diffusers' own tests (see
``qwen_core.tiny_families``): e.g. for Qwen-Image a 2-layer transformer, a 3-level VAE with z_dim 4, a 2-layer
Qwen2.5-VL text encoder. The tests there
download a tokenizer from the hub; we train a byte-level BPE tokenizer here instead (Qwen2's NFC
normaliser, split regex and ByteLevel pre-tokenizer, ~600 tokens) on the pipelines' prompt templates, so
that the template prefix the pipeline drops (34 tokens for text-to-image, 64 for edit) tokenises to
exactly that many tokens, as with the real Qwen tokenizer.

Layout on disk matches the family's Hub repo: ``model_index.json`` + ``transformer/ vae/ text_encoder/
tokenizer/ scheduler/`` (+ ``processor/`` for Edit, Layered and 2.1, which has no ``tokenizer/``), safetensors only.
Same seed -> byte-identical files; the caller's torch RNG state is left untouched.

API:
- ``build_tiny_pipeline(out_dir, seed=0, *, family="qwen-image") -> Path``: builds into a temp folder
  beside ``out_dir`` and renames it into place, so a killed build never leaves a half folder.
- ``ensure_tiny_pipeline(cache_dir=None, seed=0, *, family="qwen-image") -> Path``: reuses a complete
  build under ``cache_dir`` (default ``$QWEN_TINY_CACHE`` or ``~/.cache/qwen_core``), else builds one.
- ``python -m qwen_core make-tiny DIR [--family F] [--seed N]`` (F: a family key or its short form, e.g.
  ``edit-2509``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen_core.errors import InvalidInputError, QwenError
from qwen_core.families import DEFAULT_FAMILY, FAMILIES, ModelFamily, get_family

# Bump when anything below changes the files, so cached builds of an older recipe are not reused.
TINY_VERSION = 1

# The prompt templates of diffusers' pipeline_qwenimage.py / pipeline_qwenimage_edit.py and how many
# leading tokens each pipeline drops (prompt_template_encode_start_idx). tests/test_tiny.py checks these
# against the installed diffusers so a change upstream is noticed.
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_DROP = 34
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_DROP = 64

# Qwen2-VL's special tokens, in Qwen's order (appended after the BPE vocabulary, as in the real tokenizer).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
# Qwen2's pre-tokenizer split regex (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TOKENIZER_VOCAB_SIZE = 600
# Sentences besides the templates, so ordinary prompts tokenise into word pieces, not only single bytes.
_SENTENCES = (
    "a red fox sitting in the snow at sunrise, photorealistic",
    "A cat on a blue sofa. The room is bright and warm.",
    "dance monkey", "bad quality, blurry, low resolution, watermark",
    "A poster that says \"Hello World\" in bold letters, 2 people, 3 dogs and 10 birds.",
    "an astronaut riding a horse on the moon; digital art, highly detailed",
    "Make the sky purple and add a small boat on the lake. It's raining, we'll stay inside.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols ! ? # % & * ( ) [ ] { } - + = / \\ | @ $ ~ ^ _ < > ; : , .",
)  # fmt: skip
TEMPLATE_WEIGHT = 40  # the templates dominate the pair counts, so each of their words becomes one token


def build_tokenizer() -> Any:
    """Train the tiny byte-level BPE tokenizer and wrap it as transformers' ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # Special tokens are held out of training: the templates' "<|im_start|>" must not become BPE merges.
    corpus = [t.format("") for t in (T2I_TEMPLATE, EDIT_TEMPLATE) for _ in range(TEMPLATE_WEIGHT)]
    corpus = [_strip_specials(t) for t in corpus] + list(_SENTENCES) * 4
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # Qwen2Tokenizer needs merges as tuples ("failed to extract enum PyMerges" for "a b" strings).
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
    )


def _strip_specials(text: str) -> str:
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    return text


def template_prefix(template: str = "t2i") -> tuple[str, int]:
    """The template text the pipeline drops and how many tokens it drops (as diffusers hard-codes it).

    For edit the drop covers the system prompt and ``<|im_start|>user\\n``; the vision tokens that follow
    are kept (the processor expands ``<|image_pad|>`` to the image's tokens).
    """
    if template == "edit":
        return EDIT_TEMPLATE.split("<|vision_start|>")[0], EDIT_DROP
    return T2I_TEMPLATE.split("{}")[0], T2I_DROP


def make_tiny_components(seed: int = 0, *, family: str | ModelFamily = DEFAULT_FAMILY) -> dict[str, Any]:
    """The pipeline's constructor arguments in memory (what ``build_tiny_pipeline`` saves)."""
    family = _family(family)
    _check_seed(seed)
    if "processor" in family.components:
        from qwen_core.model_source import require_torchvision

        require_torchvision(family.display_name, family.components["processor"][1])
    from qwen_core.tiny_families import family_components

    return family_components(family, seed, build_tokenizer())


def tiny_pipeline(seed: int = 0, *, family: str | ModelFamily = DEFAULT_FAMILY) -> Any:
    """The tiny pipeline of ``family`` in memory (its diffusers class, random weights, CPU)."""
    import diffusers

    family = _family(family)
    return getattr(diffusers, family.pipeline_class)(**make_tiny_components(seed, family=family))


def _family(family: str | ModelFamily) -> ModelFamily:
    return family if isinstance(family, ModelFamily) else get_family(family)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError("seed", f"must be an integer in [0, 2**63), got {seed!r}.")


def is_complete_pipeline_dir(path: str | Path) -> bool:
    """True when ``path`` holds model_index.json and every component it names has its files."""
    from qwen_core.integrity import is_component_spec

    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    for name, spec in index.items():
        if name.startswith("_") or not is_component_spec(spec):
            continue
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            return False
        if name in ("transformer", "vae", "text_encoder") and not any(folder.glob("*.safetensors")):
            return False
    return True


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, *, family: str | ModelFamily = DEFAULT_FAMILY) -> Path:
    """Build the tiny pipeline of ``family`` into ``out_dir`` (absent or empty) and return its path.

    Written to a temp folder beside ``out_dir`` first, then renamed, so ``out_dir`` is either complete
    or absent even if the process is killed mid-build (``ensure_tiny_pipeline`` sweeps such leftovers).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(
            "out_dir",
            f"{out} exists and is not an empty folder.",
            fix="Pick a new or empty folder (make-tiny never overwrites).",
        )
    pipe = tiny_pipeline(seed, family=family)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with _quiet_progress():
            pipe.save_pretrained(tmp, safe_serialization=True)
        _check_saved(tmp)
        tmp.chmod(0o755)  # mkdtemp made it 0700; the rename keeps the mode
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Writing model shards" bar from transformers for a 20 MB file; restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _move_into_place(tmp: Path, out: Path) -> None:
    # An empty placeholder goes (rename cannot replace a folder everywhere); a non-empty one stays.
    with contextlib.suppress(OSError):
        out.rmdir()
    try:
        os.replace(tmp, out)
    except OSError as err:  # another process's build (or the user's files) landed there meanwhile
        raise InvalidInputError("out_dir", f"{out} was filled by someone else during the build.") from err


def _check_saved(folder: Path) -> None:
    from qwen_core.integrity import find_pickle_files

    pickles = [p.name for p in find_pickle_files(folder)]
    if pickles or not is_complete_pipeline_dir(folder):
        raise QwenError(f"tiny build in {folder} is incomplete or holds pickled files {pickles}.")


def default_cache_dir() -> Path:
    """``$QWEN_TINY_CACHE``, else ``$XDG_CACHE_HOME/qwen_core``, else ``~/.cache/qwen_core``."""
    if os.environ.get("QWEN_TINY_CACHE"):
        return Path(os.environ["QWEN_TINY_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "qwen_core"


def tiny_dir_name(seed: int = 0, family: str | ModelFamily = DEFAULT_FAMILY) -> str:
    """Cache folder name; carries the recipe version so an older build is never mistaken for this one."""
    return f"tiny-{_family(family).key}-s{seed}-v{TINY_VERSION}"


def ensure_tiny_pipeline(
    cache_dir: str | Path | None = None, seed: int = 0, *, family: str | ModelFamily = DEFAULT_FAMILY
) -> Path:
    """Return ``<cache_dir>/tiny-<family>-s<seed>-v<version>``, building it first unless already complete."""
    family = _family(family)
    _check_seed(seed)
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / tiny_dir_name(seed, family)
    if is_complete_pipeline_dir(target):
        return target
    _sweep_stale_partials(target)
    if target.exists():
        # Not from us (our builds appear whole, by rename): a hand-made or damaged folder; start over.
        shutil.rmtree(target)
    try:
        return build_tiny_pipeline(target, seed, family=family)
    except InvalidInputError:
        # Another process renamed its build into place first; theirs is as good as ours.
        if is_complete_pipeline_dir(target):
            return target
        raise


def _sweep_stale_partials(target: Path, max_age_s: float = 600.0) -> None:
    """Remove temp folders of builds that were killed (a live build takes seconds, not minutes)."""
    now = time.time()
    for partial in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(OSError):
            if now - partial.stat().st_mtime > max_age_s:
                shutil.rmtree(partial)


def configure_make_tiny(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed; same seed -> identical files")
    choices = [name for f in FAMILIES.values() for name in (f.key, f.short_name)]
    parser.add_argument("--family", choices=choices, default=DEFAULT_FAMILY.key, metavar="FAMILY",
                        help=f"model family (default {DEFAULT_FAMILY.key}); one of {', '.join(FAMILIES)} or the "
                        "part after 'qwen-image-' (e.g. edit-2509)")  # fmt: skip


def run_make_tiny(args: argparse.Namespace) -> int:
    from qwen_core.preflight import folder_size_bytes

    start = time.perf_counter()
    family = get_family(args.family)
    out = build_tiny_pipeline(args.dir, args.seed, family=family)
    size_mb = folder_size_bytes(out) / 1e6
    print(f"tiny {family.display_name} pipeline (seed {args.seed}) -> {out}  {size_mb:.1f} MB in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0
