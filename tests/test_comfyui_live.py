"""The pack inside a real ComfyUI: skipped unless COMFYUI_DIR points at a ComfyUI checkout.

Starts ``main.py --cpu --listen 127.0.0.1`` (COMFYUI_PYTHON, default this Python, must have ComfyUI's
requirements and ours, torchvision included) with a private ``--base-directory`` holding only this pack in
custom_nodes, the tiny model of every family in models/diffusers (``<family>-tiny``) plus a second Qwen-Image one
in an extra_model_paths.yaml folder, tiny ComfyUI single files (fp8, GGUF, scaled fp8 text encoder, VAE), a tiny
random RealESRGAN-Compact upscaler in models/upscale_models (made with ComfyUI's Python and spandrel), an
``input/example.png`` for LoadImage, and a Hub stand-in on 127.0.0.1 (set as HF_ENDPOINT) serving each tiny model
as ``local/<family>-tiny`` for the Downloader.
Then: the pack imports, the six nodes are in /object_info, the workflows are served as templates, every
workflow (tiny model selected) runs through POST /prompt to ``status_str == "success"`` with its images
saved, a graph mixing our Generate with ComfyUI's own upscaler runs twice without reloading our model,
re-queueing an unchanged graph reports ``execution_cached`` for our nodes (and asks the Hub nothing) while a
new file or size re-runs what depends on it, Cancel (/interrupt) stops a generation and keeps the model and
stops a download (the panel's websocket event says "cancelled"), /free releases our model, the session log
is in ComfyUI's user folder, and NaN is refused at validation naming the input.

Run it once per ComfyUI version (0.3.64 and 0.33 are the ones checked), e.g.:
    COMFYUI_DIR=~/ComfyUI COMFYUI_PYTHON=~/comfy-venv/bin/python pytest tests/test_comfyui_live.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_workflow import ui_to_api
from comfy_ws import ComfyEvents
from hub_server import HubServer
from PIL import Image
from single_files import comfy_models_dir

import nodes
from qwen_core.families import DEFAULT_FAMILY, FAMILIES, family_for_repo, get_family

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "").strip()
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the live tests"),
]
REPO = Path(__file__).resolve().parent.parent
PACK = "comfyui-qwen-image"
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
UPSCALER = "tiny-compact-x2.safetensors"
# A random 2x RealESRGAN-Compact, saved with ComfyUI's own Python (spandrel is one of ComfyUI's requirements).
MAKE_UPSCALER = ("import sys, torch; from safetensors.torch import save_file; "
                 "from spandrel.architectures.Compact import Compact; torch.manual_seed(0); "
                 "m = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2); "
                 "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])")
TINY_FILES = {"fp8": "comfy: qwen_image_tiny_fp8.safetensors", "gguf": "comfy: qwen-image-tiny-Q8_0.gguf",
              "text_encoder": "qwen_2.5_vl_tiny_fp8-scaled.safetensors"}


@dataclass
class Comfy:
    url: str
    base: Path
    reports: Path
    log: Path
    hub: HubServer
    port: int

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> Any:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"POST {path}: {err.code} {err.read().decode()[:3000]}") from None
        return json.loads(raw) if raw.strip() else None

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})["prompt_id"]

    def run(self, prompt: dict) -> dict:
        entry = self.wait(self.queue(prompt))
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
        return entry

    def session_log(self) -> str:
        path = self.reports / "last_session.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.3)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; log: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_model_dir_b: Path,
          tiny_family_dir) -> Iterator[Comfy]:
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    diffusers, extra = base / "models" / "diffusers", base / "extra" / "diffusers"
    diffusers.mkdir(parents=True)
    extra.mkdir(parents=True)
    family_dirs = {key: tiny_family_dir(key) for key in FAMILIES}
    for key, folder in family_dirs.items():  # qwen-image-tiny is tiny_model_dir
        (diffusers / f"{key}-tiny").symlink_to(folder, target_is_directory=True)
    (base / "input").mkdir()
    Image.fromarray((np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8)).save(base / "input" / "example.png")
    # The second model sits in an extra_model_paths.yaml folder: the Loader must list it too.
    (extra / "qwen-image-tiny-b").symlink_to(tiny_model_dir_b, target_is_directory=True)
    _write_tiny_loras(base / "models" / "loras", tiny_model_dir)
    (base / "extra_model_paths.yaml").write_text(f"qwen_live_test:\n    base_path: {base / 'extra'}\n    diffusers: diffusers\n")
    # No QWEN_REPORTS_DIR: inside ComfyUI the session log must go to ComfyUI's user folder by itself.
    reports, log = base / "user" / "qwen-image", base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    (base / "models" / "upscale_models").mkdir(parents=True)
    subprocess.run([python, "-c", MAKE_UPSCALER, str(base / "models" / "upscale_models" / UPSCALER)], check=True)
    # ComfyUI's own single files (fp8 diffusion model, GGUF, scaled fp8 text encoder, VAE), tiny versions.
    comfy_models_dir(base / "models", tiny_model_dir, transformer_fmt="fp8", te_fmt="fp8-scaled", gguf="Q8_0")
    with HubServer() as hub:
        for key, folder in family_dirs.items():
            hub.add_repo(f"local/{key}-tiny", {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()})
        port = _free_port()
        drop = ("HF_HUB_OFFLINE", "QWEN_HOME", "HF_TOKEN", "QWEN_REPORTS_DIR")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
               "--disable-auto-launch", "--extra-model-paths-config", str(base / "extra_model_paths.yaml")]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Comfy(f"http://127.0.0.1:{port}", base, reports, log, hub, port)
        try:
            _wait_until_up(server, proc)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _write_tiny_loras(folder: Path, tiny_model_dir: Path) -> None:
    """Every LoRA a workflow names, as a tiny LoRA that fits the tiny model (random factors, no PEFT needed)."""
    from lora_helpers import random_factors, write_lora

    from qwen_core.families import QWEN_IMAGE
    from qwen_core.lora.targets import meta_shapes

    shapes = meta_shapes(QWEN_IMAGE, json.loads((tiny_model_dir / "transformer" / "config.json").read_text()))
    names = {n["widgets_values"][0] for p in WORKFLOWS for n in json.loads(p.read_text(encoding="utf-8"))["nodes"]
             if n["type"] == "QwenImageLoRA"}
    for seed, name in enumerate(sorted(names)):
        write_lora(folder / name, random_factors(shapes, seed=seed), "lightning" if "Lightning" in name else "kohya")


def _wait_until_up(server: Comfy, proc: subprocess.Popen) -> None:
    end = time.monotonic() + 240
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {proc.returncode}: {server.log_tail()}")
        try:
            server.get("/system_stats")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise AssertionError(f"ComfyUI did not answer within 240 s: {server.log_tail()}")


def _family_of(api: dict[str, dict]):
    """The family a converted workflow loads: its Downloader's repo, else its Loader's (tiny) model."""
    for node in api.values():
        if node["class_type"] == "QwenImageDownloader":
            repo = node["inputs"]["repo_id"]  # a family's repo, or (after with_tiny_models) local/<family>-tiny
            tiny = repo.removeprefix("local/").removesuffix("-tiny")
            return family_for_repo(repo) or (get_family(tiny) if tiny in FAMILIES else DEFAULT_FAMILY)
    loader = next(n["inputs"]["model"] for n in api.values() if n["class_type"] == "QwenImageLoader")
    return family_for_repo(loader) or get_family(loader.removesuffix("-tiny"))


def with_tiny_models(api: dict[str, dict]) -> dict[str, dict]:
    """Select the tiny models of the workflow's family (and small sizes); everything else stays as shipped."""
    family = _family_of(api)
    for node in api.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "QwenImageDownloader":
            inputs["repo_id"] = f"local/{family.key}-tiny"
        elif kind == "QwenImageLoader" and str(inputs["model"]).startswith("comfy: "):
            gguf = str(inputs["model"]).endswith(".gguf")
            inputs["model"] = TINY_FILES["gguf" if gguf else "fp8"]
            inputs["text_encoder"] = TINY_FILES["text_encoder"]
        elif kind == "QwenImagePreflight" or kind == "QwenImageLoader":
            inputs["model"] = f"{family.key}-tiny"
        elif kind == "QwenImageSwitchModel":
            inputs["model"] = "qwen-image-tiny-b"
        elif kind == "QwenImagePixelGovernor":
            inputs.update(aspect_preset="custom", width=96, height=64)
    return api


def saved_images(entry: dict) -> list[dict]:
    return [img for out in entry["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]


def test_pack_imports_and_all_six_nodes_are_registered(comfy: Comfy) -> None:
    failed = [line for line in comfy.log.read_text(errors="replace").splitlines()
              if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK in line]
    assert not failed, failed  # ComfyUI's own optional nodes (e.g. audio without torchaudio) may fail here
    info = comfy.get("/object_info")
    assert set(nodes.NODE_CLASS_MAPPINGS) <= set(info)
    loader = info["QwenImageLoader"]["input"]["required"]["model"]
    # Diffusers folders (every family's tiny model), then the models assembled from ComfyUI's single files.
    assert set(loader[0]) == {f"{key}-tiny" for key in FAMILIES} | {"qwen-image-tiny-b", TINY_FILES["gguf"], TINY_FILES["fp8"]}
    optional = info["QwenImageLoader"]["input"]["optional"]
    assert optional["text_encoder"][0] == ["auto", TINY_FILES["text_encoder"]]
    assert optional["vae"][0] == ["auto", "qwen_image_vae.safetensors"]
    assert info["QwenImageGenerate"]["input"]["required"]["seed"][1]["control_after_generate"] is True


def test_workflows_are_served_as_templates(comfy: Comfy) -> None:
    listed = comfy.get("/api/workflow_templates")
    assert sorted(listed[PACK]) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        assert comfy.get(f"/api/workflow_templates/{PACK}/{path.name}") == json.loads(path.read_text(encoding="utf-8"))


def _has_gguf() -> bool:
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    return subprocess.run([python, "-c", "import gguf"], capture_output=True).returncode == 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_through_prompt(comfy: Comfy, path: Path) -> None:
    if "gguf" in path.stem and not _has_gguf():
        pytest.skip("ComfyUI's Python lacks the gguf package (pip install -r requirements.txt)")
    api = with_tiny_models(ui_to_api(json.loads(path.read_text(encoding="utf-8")), comfy.get("/object_info")))
    entry = comfy.wait(comfy.queue(api))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[-3000:]
    images = saved_images(entry)
    # One file per image: Layered's IMAGE batch holds its layers (RGBA), one PNG each.
    per_save = _family_of(api).default_layers or 1
    expected = sum(1 for n in api.values() if n["class_type"] == "SaveImage") * per_save
    assert len(images) == expected >= 1
    for img in images:
        assert (comfy.base / "output" / img["subfolder"] / img["filename"]).stat().st_size > 0


def test_cancel_interrupts_generation_and_the_next_run_works(comfy: Comfy) -> None:
    path = REPO / "workflows" / "qwen_image_tiny_cpu.json"
    api = with_tiny_models(ui_to_api(json.loads(path.read_text(encoding="utf-8")), comfy.get("/object_info")))
    generate = next(k for k, n in api.items() if n["class_type"] == "QwenImageGenerate")
    governor = next(k for k, n in api.items() if n["class_type"] == "QwenImagePixelGovernor")
    api[governor]["inputs"].update(width=512, height=512)
    api[generate]["inputs"].update(steps=200, seed=12345)  # far longer than the wait below, even on a fast CPU
    for key in [k for k, n in api.items() if n["class_type"] == "QwenImagePreflight"]:
        del api[key]  # nothing slow before Generate: the interrupt must land inside the denoising loop
    prompt_id = comfy.queue(api)
    end = time.monotonic() + 60
    while time.monotonic() < end and not any(job[1] == prompt_id for job in comfy.get("/queue")["queue_running"]):
        time.sleep(0.1)
    time.sleep(1.5)  # model loaded, denoising under way
    loads, releases = comfy.session_log().count("resident: ("), comfy.session_log().count("released (")
    comfy.post("/interrupt", {})
    entry = comfy.wait(prompt_id)
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert entry["status"]["status_str"] == "error" and interrupted
    assert interrupted[0]["node_type"] == "QwenImageGenerate"
    assert not saved_images(entry)
    assert comfy.session_log().count("released (") == releases, "Cancel keeps the model while memory is not short"
    api[generate]["inputs"].update(steps=2, seed=7)
    again = comfy.wait(comfy.queue(api))
    assert again["status"]["status_str"] == "success", "the interrupt flag must not leak into the next run"
    assert comfy.session_log().count("resident: (") == loads, "the run after Cancel needed no reload"


def test_free_releases_our_resident_model(comfy: Comfy) -> None:
    path = REPO / "workflows" / "qwen_image_tiny_cpu.json"
    api = with_tiny_models(ui_to_api(json.loads(path.read_text(encoding="utf-8")), comfy.get("/object_info")))
    assert comfy.wait(comfy.queue(api))["status"]["status_str"] == "success"
    log = comfy.reports / "last_session.log"
    before = log.read_text(errors="replace").count("released (")
    comfy.post("/free", {"unload_models": True, "free_memory": True})
    end = time.monotonic() + 30
    while time.monotonic() < end and log.read_text(errors="replace").count("released (") <= before:
        time.sleep(0.5)
    assert log.read_text(errors="replace").count("released (") > before, "ComfyUI's /free did not release our model"


def test_nan_is_refused_by_validation_naming_the_input(comfy: Comfy) -> None:
    """NaN passes ComfyUI's own min/max check; Generate's VALIDATE_INPUTS must stop it before any compute."""
    path = REPO / "workflows" / "qwen_image_tiny_cpu.json"
    api = with_tiny_models(ui_to_api(json.loads(path.read_text(encoding="utf-8")), comfy.get("/object_info")))
    generate = next(k for k, n in api.items() if n["class_type"] == "QwenImageGenerate")
    api[generate]["inputs"]["true_cfg_scale"] = float("nan")  # json.dumps writes NaN, as a hand-edited file could
    answer = comfy.post("/prompt", {"prompt": api, "client_id": str(uuid.uuid4())})
    errors = answer["node_errors"][generate]["errors"]
    assert errors[0]["extra_info"]["input_name"] == "true_cfg_scale" and "finite" in errors[0]["details"]
    saver = next(k for k, n in api.items() if n["class_type"] == "SaveImage")
    assert saver in answer["node_errors"][generate]["dependent_outputs"]  # that branch does not run


def test_download_cancel_keeps_partials_and_the_next_run_resumes(comfy: Comfy) -> None:
    data = bytes(range(256)) * 23_437  # ~6 MB
    size = len(data)
    comfy.hub.add_repo("local/slow", {"weights.safetensors": data})
    comfy.hub.faults.rate_bps = 1_000_000  # ~6 s: Cancel lands mid-file
    api = {
        "1": {"class_type": "QwenImageDownloader", "inputs": {"repo_id": "local/slow", "revision": "main",
              "allow_patterns": "", "ignore_patterns": "", "workers": 1, "endpoint": "", "verify": False,
              "layout": "diffusers"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    }
    comfy.hub.reset_counters()
    client = str(uuid.uuid4())
    events = ComfyEvents("127.0.0.1", comfy.port, client)  # what the web panel receives
    try:
        prompt_id = comfy.queue(api, client)
        end = time.monotonic() + 30
        while time.monotonic() < end and comfy.hub.total_served() < size // 5:
            time.sleep(0.1)
        comfy.post("/interrupt", {})
        entry = comfy.wait(prompt_id)
        final = events.wait_for("qwen-image.status", lambda d: d.get("node") == "1" and d.get("state") in
                                ("cancelled", "error", "complete"))
    finally:
        comfy.hub.faults.rate_bps = None
        events.close()
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "QwenImageDownloader"
    assert final is not None and final["state"] == "cancelled", f"the panel's last word: {final}"
    target = comfy.base / "models" / "diffusers" / "local" / "slow"
    partial = sum(p.stat().st_size for p in target.rglob("*.part"))
    assert 0 < partial < size, "the partial file is kept for resume"
    again = comfy.wait(comfy.queue(api))
    assert again["status"]["status_str"] == "success"
    report = again["outputs"]["2"]["text"][0]
    assert "1 resumed" in report and (target / "weights.safetensors").read_bytes() == data
    assert f"{size - partial:,} fetched" in report, "only the missing bytes were fetched"


def _choices(info: dict, node: str, name: str) -> list[str]:
    """A combo input's options from /object_info (the list form, or 0.3.6x+'s ["COMBO", {"options": [...]}])."""
    spec = info[node]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_downloader_comfyui_files_land_where_comfyui_finds_them(comfy: Comfy) -> None:
    """Layout 'comfyui files': a Comfy-Org repo's split files go straight to ComfyUI's own folders (not the legacy
    models/unet ComfyUI lists first), where its native loaders and our Loader list them."""
    models = comfy.base / "models"
    files = {"split_files/diffusion_models/qwen_image_tiny_dl.safetensors":
             (models / "diffusion_models" / "qwen_image_tiny_fp8.safetensors").read_bytes(),
             "split_files/text_encoders/qwen_2.5_vl_tiny_dl.safetensors":
             (models / "text_encoders" / "qwen_2.5_vl_tiny_fp8-scaled.safetensors").read_bytes()}
    comfy.hub.add_repo("Comfy-Org/Tiny_ComfyUI", files)
    api = {
        "1": {"class_type": "QwenImageDownloader", "inputs": {
            "repo_id": "Comfy-Org/Tiny_ComfyUI", "revision": "main", "allow_patterns": "diffusion_models/*, text_encoders/*",
            "ignore_patterns": "", "workers": 2, "endpoint": "", "verify": False, "layout": "comfyui files"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    entry = comfy.run(api)
    assert entry["outputs"]["2"]["text"][0] == str(models / "diffusion_models")
    for path, data in files.items():
        kind, name = path.split("/")[1:]
        assert (models / kind / name).read_bytes() == data
    assert not (models / "unet").exists() and not (models / "split_files").exists()
    info = comfy.get("/object_info")
    assert "qwen_image_tiny_dl.safetensors" in _choices(info, "UNETLoader", "unet_name")
    assert "qwen_2.5_vl_tiny_dl.safetensors" in _choices(info, "CLIPLoader", "clip_name")
    assert "comfy: qwen_image_tiny_dl.safetensors" in _choices(info, "QwenImageLoader", "model")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _cached(entry: dict) -> set[str]:
    return {n for m in entry["status"]["messages"] if m[0] == "execution_cached" for n in m[1]["nodes"]}


def test_mixed_graph_with_a_native_upscaler_keeps_our_model_resident(comfy: Comfy) -> None:
    """Our Generate feeding ComfyUI's own model (an upscaler, loaded by ComfyUI's model management), twice."""
    api = {
        "1": {"class_type": "QwenImageLoader", "inputs": {"model": "qwen-image-tiny", "dtype": "auto",
                                                           "memory_mode": "auto", "attention": "auto"}},
        "2": {"class_type": "QwenImageGenerate", "inputs": {
            "pipe": ["1", 0], "prompt": "a lighthouse", "negative_prompt": "", "width": 64, "height": 64,
            "steps": 2, "true_cfg_scale": 1.0, "seed": 1, "batch_size": 1}},
        "3": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}},
        "4": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["3", 0], "image": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "qwen_live/mixed"}},
    }
    first = comfy.run(api)
    (image,) = saved_images(first)
    assert _png_size(comfy.base / "output" / image["subfolder"] / image["filename"]) == (128, 128)
    loads, releases = comfy.session_log().count("resident: ("), comfy.session_log().count("released (")
    api["2"]["inputs"]["seed"] = 2  # our Generate and the upscaler run again
    second = comfy.run(api)
    assert {"2", "4"}.isdisjoint(_cached(second))
    assert comfy.session_log().count("resident: (") == loads, "ComfyUI's upscaler did not cost us a reload"
    assert comfy.session_log().count("released (") == releases


def test_requeue_of_an_unchanged_graph_comes_from_the_cache(comfy: Comfy) -> None:
    """Regression: Preflight's IS_CHANGED was NaN, so every queue re-ran everything and asked the Hub."""
    path = REPO / "workflows" / "qwen_image_text_to_image.json"
    api = with_tiny_models(ui_to_api(json.loads(path.read_text(encoding="utf-8")), comfy.get("/object_info")))
    ours = {k for k, n in api.items() if n["class_type"].startswith("QwenImage")}
    comfy.run(api)
    served = comfy.hub.total_served()
    again = comfy.run(api)
    assert ours <= _cached(again), f"not cached: {sorted(ours - _cached(again))}"
    assert comfy.hub.total_served() == served, "the Downloader did not ask the Hub"

    downloader = next(k for k, n in api.items() if n["class_type"] == "QwenImageDownloader")
    target = comfy.base / "models" / "diffusers" / f"local/{DEFAULT_FAMILY.key}-tiny"
    (target / "NOTES.txt").write_text("a file added by hand")  # a real change in the model folder
    changed = comfy.run(api)
    assert downloader not in _cached(changed), "a new file in the folder runs the Downloader again"
    assert ours <= _cached(comfy.run(api)), "and the next re-queue is cached again"

    governor = next(k for k, n in api.items() if n["class_type"] == "QwenImagePixelGovernor")
    generate = next(k for k, n in api.items() if n["class_type"] == "QwenImageGenerate")
    api[governor]["inputs"]["width"] = 80  # a new size
    resized = comfy.run(api)
    assert {governor, generate}.isdisjoint(_cached(resized)) and downloader in _cached(resized)


def test_session_log_is_in_comfyui_user_folder(comfy: Comfy) -> None:
    log = comfy.base / "user" / "qwen-image" / "last_session.log"
    assert log.is_file() and "session started" in log.read_text(errors="replace")
    assert "resident: (" in log.read_text(errors="replace"), "the nodes' runs are logged there"


def test_cooperation_bench_runs_in_tiny_mode(tmp_path: Path) -> None:
    """bench/comfy_cooperation.py (the GPU measurement) in its CPU mode: Generate + ComfyUI's upscaler, twice."""
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    out = tmp_path / "coop.json"
    env = {k: v for k, v in os.environ.items() if k != "QWEN_HOME"}
    env.update({"COMFYUI_DIR": COMFYUI_DIR, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
                "QWEN_REPORTS_DIR": str(tmp_path / "reports")})
    run = subprocess.run([python, str(REPO / "bench" / "comfy_cooperation.py"), "--tiny", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2 and data["our_loads"] == 1 and data["our_reloads"] == 0
    assert all(r["native_output_shape"] == [1, 128, 128, 3] and r["ours_resident_after_native"] for r in data["rounds"])
