#!/usr/bin/env python3
"""Pin the `models` entries of the example workflows: the file's sha256 and a URL at a fixed commit.

ComfyUI's frontend reads a workflow's top-level ``models`` list (name, url, directory, and optionally hash +
hash_type "SHA256") for its missing-models dialog. This fills ``hash`` from the Hub's listing (the LFS sha256 of
the named file) and points ``url`` at the commit that hash belongs to, so the two always agree. Needs the Hub (or
a mirror in HF_ENDPOINT / --endpoint); a maintainer runs it when a template's model changes:

    python tools/pin_workflow_models.py workflows/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PUBLIC = "https://huggingface.co"  # what the templates link to, whichever endpoint answered the listing


def pin_entry(entry: dict[str, Any], api: Any, revision: str = "main") -> dict[str, Any]:
    """``entry`` with hash, hash_type and a commit-pinned url (name = "<org>/<repo>/<path in repo>")."""
    parts = entry["name"].split("/")
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    commit = api.model_info(repo, revision=revision).sha
    for item in api.list_repo_tree(repo, revision=commit, recursive=True):
        if getattr(item, "path", None) == path and getattr(item, "lfs", None) is not None:
            lfs = item.lfs
            sha256 = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
            return {**entry, "url": f"{PUBLIC}/{repo}/resolve/{commit}/{path}", "hash": sha256, "hash_type": "SHA256"}
    raise SystemExit(f"{repo}@{commit} has no LFS file {path!r}: fix the workflow's models entry")


def pin_workflow(path: Path, api: Any, revision: str = "main") -> int:
    workflow = json.loads(path.read_text(encoding="utf-8"))
    entries = workflow.get("models", [])
    workflow["models"] = [pin_entry(e, api, revision) for e in entries]
    path.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflows", nargs="+", type=Path)
    parser.add_argument("--revision", default="main", help="branch or tag to pin (default main)")
    parser.add_argument("--endpoint", default=None, help="Hub or mirror to read the listing from")
    args = parser.parse_args(argv)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=args.endpoint)
    for path in args.workflows:
        print(f"{path}: {pin_workflow(path, api, args.revision)} models entries pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
