"""`python -m qwen_core <command>`: one entry point for every headless job.

Each command lives in the module that owns its concept; that module exposes
``configure_<name>(parser)`` and ``run_<name>(args) -> int``. Only the chosen command's module is
imported, so `preflight --help` does not pay for diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from qwen_core.errors import QwenError

# command -> (module, function suffix, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "preflight": ("qwen_core.preflight", "preflight", "check GPU, VRAM, RAM, disk and versions; recommend a profile"),
    "download": ("qwen_core.download.cli", "download", "resumable, verified download of a model repo"),
    "make-tiny": ("qwen_core.tiny", "make_tiny", "build a tiny random Qwen-Image pipeline offline"),
    "generate": ("qwen_core.demo", "generate", "generate an image with a local Qwen-Image model"),
    "demo": ("qwen_core.demo", "demo", "tiny offline pipeline -> preflight -> governor -> image"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, suffix, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            getattr(module, f"configure_{suffix}")(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Must be set before CUDA starts: without it the 12/24 GiB caps ran out of memory from allocator
    # fragmentation on the H100 (bench/RESULTS.md). A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(selected).parse_args(argv)
    if args.command is None:
        build_parser(None).print_help()
        return 2
    module_name, suffix, _ = COMMANDS[args.command]
    run = getattr(importlib.import_module(module_name), f"run_{suffix}")
    try:
        return int(run(args) or 0)
    except QwenError as err:
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
