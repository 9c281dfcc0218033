"""Every example workflow in workflows/ against the node definitions, as ComfyUI would check it.

Checks: every class known; widgets_values match the widget order (with the extra control_after_generate
value after a seed) and each value is valid for its widget; links are type-consistent at both ends and
agree with the nodes' inputs/outputs; the `models` entry is what the frontend's missing-model check reads;
the workflow converts to a complete /prompt (API) body. The real run through ComfyUI is test_comfyui_live.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from comfy_workflow import (
    CONTROL_VALUES,
    UPLOAD_VALUES,
    VIRTUAL_NODES,
    all_inputs,
    definitions_from_classes,
    ui_to_api,
    widget_slots,
)

import nodes
from qwen_core.families import family_for_repo, get_family

pytest_plugins = ["download_fixtures"]  # the `hub` fixture (a Hub stand-in on 127.0.0.1) for the pin tool

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
# ComfyUI's app/custom_node_manager.py serves a pack's templates from the first of these folders it finds.
COMFY_TEMPLATE_FOLDERS = ["example_workflows", "example", "examples", "workflow", "workflows"]
# The core nodes our workflows use, as ComfyUI 0.3.x's /object_info describes them.
CORE = {
    "SaveImage": {"input": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
                  "output": []},
    "PreviewAny": {"input": {"required": {"source": ("*", {})}}, "output": []},
    # ComfyUI's input folder ships example.png, which the workflows load.
    "LoadImage": {"input": {"required": {"image": (["example.png"], {"image_upload": True})}}, "output": ["IMAGE", "MASK"]},
}
TINY = "_tiny_cpu"  # workflows that run offline on the CPU with a tiny model made by make-tiny
DEFS = {**definitions_from_classes(nodes.NODE_CLASS_MAPPINGS), **CORE}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def check_value(node_type: str, name: str, spec: Any, value: Any) -> None:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    where = f"{node_type}.{name}={value!r}"
    cls = nodes.NODE_CLASS_MAPPINGS.get(node_type)
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if isinstance(kind, (list, tuple)):
        if validate is not None and name in validate.__code__.co_varnames:
            assert validate(**{name: value}) is True, where  # ComfyUI lets VALIDATE_INPUTS decide
        else:
            assert value in kind, where
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), where
        assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), where
        if kind == "INT":
            assert int(value) == value, where
            if opts.get("step", 1) == 16:
                assert value % 16 == 0, where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


def check_widgets(node: dict[str, Any]) -> None:
    """One value per widget slot (a control value after a seed), each valid for its widget."""
    assert node["type"] in DEFS, f"unknown node class {node['type']}"
    slots = widget_slots(DEFS[node["type"]])
    values = node.get("widgets_values", [])
    assert len(values) == len(slots), f"{node['type']}: {len(values)} values for {[s[0] for s in slots]}"
    for (name, spec, control), value in zip(slots, values, strict=True):
        if control:
            allowed = UPLOAD_VALUES if name.endswith(":upload") else CONTROL_VALUES
            assert value in allowed, f"{node['type']}.{name}={value!r}"
        else:
            check_value(node["type"], name, spec, value)


def test_workflows_exist_in_a_folder_comfyui_serves_as_templates() -> None:
    names = {p.stem for p in WORKFLOWS}
    assert {"qwen_image_text_to_image", "qwen_image_low_vram", "qwen_image_model_switch", "qwen_image_tiny_cpu",
            "qwen_image_lightning_8step", "qwen_image_two_loras", "qwen_image_lightning_tiny_cpu",
            "qwen_image_two_loras_tiny_cpu"} <= names
    family = {"qwen_image_edit_2509", "qwen_image_2_1", "qwen_image_layered"}
    assert family | {f"{stem}{TINY}" for stem in family} <= names
    assert WORKFLOWS[0].parent.name in COMFY_TEMPLATE_FOLDERS
    for path in WORKFLOWS:  # the template browser shows <name>.jpg as the card's picture
        assert path.with_suffix(".jpg").read_bytes()[:3] == b"\xff\xd8\xff", f"{path.stem}.jpg thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
class TestWorkflow:
    def test_frontend_format(self, path: Path) -> None:
        wf = load(path)
        assert {"nodes", "links", "last_node_id", "last_link_id", "version"} <= set(wf)
        ids = [n["id"] for n in wf["nodes"]]
        assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
        assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)

    def test_every_class_known_and_widgets_valid(self, path: Path) -> None:
        for node in load(path)["nodes"]:
            if node["type"] not in VIRTUAL_NODES:
                check_widgets(node)

    def test_links_type_consistent(self, path: Path) -> None:
        wf = load(path)
        by_id = {n["id"]: n for n in wf["nodes"]}
        for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
            source, target = by_id[src], by_id[dst]
            produced = DEFS[source["type"]]["output"][src_slot]
            assert produced == source["outputs"][src_slot]["type"] and link_id in source["outputs"][src_slot]["links"]
            entry = target["inputs"][dst_slot]
            assert entry["link"] == link_id
            declared = all_inputs(DEFS[target["type"]])[entry["name"]][0]
            declared = "COMBO" if isinstance(declared, (list, tuple)) else declared
            # The frontend saves "*" as the type of a link into a wildcard input (e.g. PreviewAny).
            assert kind == produced or (kind == "*" and declared == "*"), f"link {link_id}: {kind} vs {produced}"
            assert declared in (produced, "*"), f"{source['type']} -> {target['type']}.{entry['name']}: {produced} vs {declared}"
        linked = {(n["id"], i) for n in wf["nodes"] for i, e in enumerate(n.get("inputs", [])) if e.get("link") is not None}
        assert linked == {(link[3], link[4]) for link in wf["links"]}

    def test_converts_to_a_complete_prompt(self, path: Path) -> None:
        api = ui_to_api(load(path), DEFS)
        assert api
        for node_id, node in api.items():
            required = DEFS[node["class_type"]]["input"]["required"]
            missing = set(required) - set(node["inputs"])
            assert not missing, f"node {node_id} {node['class_type']} misses {missing}"
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in api, f"node {node_id} links to a node that is not sent"

    def test_models_entry_points_at_what_the_downloader_fetches(self, path: Path) -> None:
        wf = load(path)
        repos = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "QwenImageDownloader"}
        loaders = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("QwenImageLoader", "QwenImageSwitchModel")}
        models = wf.get("models", [])
        if path.stem.endswith(TINY):  # made locally by make-tiny: no download, no models entry
            assert not models and not repos and len(loaders) == 1 and next(iter(loaders)).endswith("-tiny")
            return
        assert models, "the frontend offers downloads from the top-level models list"
        if any(str(name).startswith("comfy: ") for name in loaders):
            check_single_file_models(wf, models)
            return
        loras = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "QwenImageLoRA"}
        for entry in [e for e in models if e["directory"] == "loras"]:  # a LoRA the workflow uses, from its Hub repo
            assert entry["name"] in loras and entry["url"].startswith("https://huggingface.co/")
            assert entry["url"].endswith(f"/resolve/main/{entry['name']}")
        for entry in [e for e in models if e["directory"] != "loras"]:
            assert entry["directory"] == "diffusers" and entry["name"].endswith(".safetensors")
            assert entry["url"].startswith("https://huggingface.co/")
            repo = "/".join(entry["name"].split("/")[:2])
            revision = entry["url"].split("/resolve/")[1].split("/")[0]
            assert entry["url"] == f"https://huggingface.co/{repo}/resolve/{revision}/{entry['name'][len(repo) + 1:]}"
            assert repo in (repos | loaders)
            if "hash" in entry:  # written by tools/pin_workflow_models.py, with the url at the matching commit
                assert entry["hash_type"] == "SHA256" and len(entry["hash"]) == 64 and int(entry["hash"], 16) >= 0
                assert entry["url"].split("/resolve/")[1].split("/")[0] != "main"


# What a first-time user sees without scrolling: the canvas of a 1600x1000 window, less ComfyUI's side and top bars.
VISIBLE = (1530, 900)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_instructions_and_save_image_open_on_screen(path: Path) -> None:
    """Regression: the templates opened with their instructions note above the view and Save Image to the right."""
    wf = load(path)
    ds = wf.get("extra", {}).get("ds", {})
    scale, (dx, dy) = ds.get("scale", 1), ds.get("offset", [0, 0])
    for node in wf["nodes"]:
        if node["type"] not in ("MarkdownNote", "Note", "SaveImage"):
            continue
        left, top = (node["pos"][0] + dx) * scale, (node["pos"][1] - 30 + dy) * scale  # 30: the title bar
        right, bottom = left + node["size"][0] * scale, top + (node["size"][1] + 30) * scale
        assert left >= 0 and top >= 0 and right <= VISIBLE[0] and bottom <= VISIBLE[1], (node["type"], node["pos"])


def test_tiny_cpu_template_is_small_enough_to_finish_in_seconds() -> None:
    """Regression: 1328x1328 x 30 steps on the tiny model took 400-650 s on a CPU."""
    wf = load(next(p for p in WORKFLOWS if p.stem == "qwen_image_tiny_cpu"))
    governor = next(n for n in wf["nodes"] if n["type"] == "QwenImagePixelGovernor")
    width, height, aspect, quality = governor["widgets_values"]
    assert aspect == "custom" and width * height <= 256 * 256 and quality == "fast"
    generate = next(n for n in wf["nodes"] if n["type"] == "QwenImageGenerate")
    assert generate["widgets_values"][2] * generate["widgets_values"][3] <= 256 * 256


def test_model_switch_template_switches_between_real_models() -> None:
    """Regression: it switched from Qwen/Qwen-Image to the random tiny model."""
    wf = load(next(p for p in WORKFLOWS if p.stem == "qwen_image_model_switch"))
    models = {n["type"]: n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("QwenImageLoader", "QwenImageSwitchModel")}
    assert models["QwenImageLoader"].startswith("Qwen/") and models["QwenImageSwitchModel"].startswith("Qwen/")
    assert "tiny" not in models["QwenImageSwitchModel"] and models["QwenImageLoader"] != models["QwenImageSwitchModel"]


# sha256 of the Comfy-Org / city96 files the single-file workflows name (their Hub listings / LFS ids).
KNOWN_SHA256 = {
    "qwen_image_fp8_e4m3fn.safetensors": "98763a127701eb6fb59096f7742cb3aa7d64ed510b9f4e882d8351f8176e3ce3",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": "cb5636d852a0ea6a9075ab1bef496c0db7aef13c02350571e388aea959c5c0b4",
    "qwen_image_vae.safetensors": "a70580f0213e67967ee9c95f05bb400e8fb08307e017a924bf3441223e023d1f",
    "qwen-image-Q4_K_M.gguf": "c6f49103603b9a4927502549fb615c910386cfc675b1466325930ba10d2a11f4",
}


def check_single_file_models(wf: dict[str, Any], models: list[dict[str, Any]]) -> None:
    """A 'comfy: ' workflow lists ComfyUI's files in the folders ComfyUI downloads them to, with their hashes,
    and its Loader names exactly those files."""
    loader = next(n for n in wf["nodes"] if n["type"] == "QwenImageLoader")["widgets_values"]
    by_dir = {entry["directory"]: entry for entry in models}
    assert set(by_dir) == {"diffusion_models", "text_encoders", "vae"}
    assert [by_dir["diffusion_models"]["name"], by_dir["text_encoders"]["name"], by_dir["vae"]["name"]] == \
        [loader[0].removeprefix("comfy: "), loader[4], loader[5]]
    for entry in models:
        assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith("/" + entry["name"])
        assert entry.get("hash") == KNOWN_SHA256[entry["name"]] and entry.get("hash_type") == "sha256"


def test_seeds_have_a_control_value_right_after_them() -> None:
    wf = load(next(p for p in WORKFLOWS if p.stem == "qwen_image_tiny_cpu"))
    generate = next(n for n in wf["nodes"] if n["type"] == "QwenImageGenerate")
    names = [s[0] for s in widget_slots(DEFS["QwenImageGenerate"])]
    seed_at = names.index("seed")
    assert names[seed_at + 1] == "seed:control_after_generate"
    assert generate["widgets_values"][seed_at : seed_at + 2] == [0, "fixed"]


def test_validator_catches_a_shifted_widget_list() -> None:
    """Regression guard for the check itself: dropping the control value must fail validation."""
    wf = load(next(p for p in WORKFLOWS if p.stem == "qwen_image_tiny_cpu"))
    generate = next(n for n in wf["nodes"] if n["type"] == "QwenImageGenerate")
    check_widgets(generate)
    del generate["widgets_values"][7]  # the "fixed" after the seed
    with pytest.raises(AssertionError, match="values for"):
        check_widgets(generate)
    generate["widgets_values"].insert(7, "sometimes")  # right length, but not a control value
    with pytest.raises(AssertionError, match="seed:control_after_generate"):
        check_widgets(generate)


def test_lora_workflows_chain_loras_and_pass_the_lightning_preset_to_generate() -> None:
    for stem, count, preset in (("qwen_image_lightning_8step", 1, "lightning-8"), ("qwen_image_two_loras", 2, "lightning-8"),
                                ("qwen_image_lightning_tiny_cpu", 1, "lightning-8"), ("qwen_image_two_loras_tiny_cpu", 2, "fast")):
        wf = load(next(p for p in WORKFLOWS if p.stem == stem))
        api = ui_to_api(wf, DEFS)
        loras = [k for k, n in api.items() if n["class_type"] == "QwenImageLoRA"]
        assert len(loras) == count
        generate = next(n for n in api.values() if n["class_type"] == "QwenImageGenerate")
        governor = next(k for k, n in api.items() if n["class_type"] == "QwenImagePixelGovernor")
        assert api[governor]["inputs"]["quality_preset"] == preset
        assert api[generate["inputs"]["pipe"][0]]["class_type"] == "QwenImageLoRA"  # the last LoRA feeds Generate
        if preset.startswith("lightning"):
            assert generate["inputs"]["quality_preset"] == [governor, 6]  # output 6: quality_preset (5 is seconds_per_step)
            assert any("Lightning" in api[k]["inputs"]["lora_name"] for k in loras)


def test_pin_tool_writes_the_files_sha256_and_a_commit_url(hub: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import pin_workflow_models

    vae = b"vae weights " * 500
    repo = hub.add_repo("Qwen/Qwen-Image", {"vae/diffusion_pytorch_model.safetensors": vae, "model_index.json": b"{}"})
    copy = Path(shutil.copy(next(p for p in WORKFLOWS if p.stem == "qwen_image_text_to_image"), tmp_path / "wf.json"))
    assert pin_workflow_models.main([str(copy), "--endpoint", hub.url]) == 0
    (entry,) = load(copy)["models"]
    assert entry["hash"] == hashlib.sha256(vae).hexdigest() and entry["hash_type"] == "SHA256"
    assert entry["url"] == f"https://huggingface.co/Qwen/Qwen-Image/resolve/{repo.commit}/vae/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_gives_its_model_the_images_it_takes(path: Path) -> None:
    """The family a workflow loads (its Downloader repo, or the tiny model it names) accepts the images wired into
    Generate, so the example never meets the image-count refusal; tiny workflows name a family's make-tiny folder."""
    wf = load(path)
    repos = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "QwenImageDownloader"]
    loader = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "QwenImageLoader")
    family = family_for_repo(repos[0] if repos else loader) or get_family(loader.removesuffix("-tiny"))
    assert family is not None, path.stem
    generate = [n for n in wf["nodes"] if n["type"] == "QwenImageGenerate"]
    for node in generate:
        wired = [e for e in node["inputs"] if e["name"].startswith("image") and e.get("link") is not None]
        assert family.check_image_count(len(wired)) is None, f"{path.stem}: {family.display_name} with {len(wired)}"
    sources = {link[1] for link in wf["links"] if link[5] == "IMAGE"}
    assert all(n["type"] == "LoadImage" for n in wf["nodes"] if n["id"] in sources and n["type"] != "QwenImageGenerate")
