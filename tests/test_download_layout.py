"""The download layouts against the Hub stand-in (tests/hub_server.py): ComfyUI files and configs only.

``comfyui``: a Comfy-Org repo's ``split_files/<kind>/<name>`` land in ``<models>/<kind>/<name>`` (diffusion_models,
text_encoders, vae, loras), by the same resumable, verified engine; the bookkeeping stays in
``<models>/.qwen_download/<org>/<repo>``. ``configs``: a diffusers repo without weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from download_helpers import FAST, blob, cli_env, run_cli
from hub_server import HubServer

from qwen_core import paths
from qwen_core.download import DownloadHooks, DownloadOptions, Layout, download_repo, resolve_endpoint
from qwen_core.download.cleanup import cleanup_partials
from qwen_core.download.layout import STAGING_DIR, Placement, comfy_destination
from qwen_core.download.repo import placement_for
from qwen_core.download.types import EXIT_OFFLINE_MISSING, EXIT_USAGE, EXIT_VERIFY
from qwen_core.errors import DownloadError, InvalidInputError

pytest_plugins = ["download_fixtures"]  # the `hub` fixture
COMFY = "Comfy-Org/Qwen-Image_ComfyUI"
DM = "split_files/diffusion_models/qwen_image_fp8_e4m3fn.safetensors"
DM_BF16 = "split_files/diffusion_models/qwen_image_bf16.safetensors"
TE = "split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "split_files/vae/qwen_image_vae.safetensors"
LORA = "split_files/loras/Qwen-Image-Lightning-8steps-V1.0.safetensors"
CLIP_VISION = "split_files/clip_vision/siglip.safetensors"
DEFAULTS = {DM: "diffusion_models", TE: "text_encoders", VAE: "vae"}


def comfy_repo(hub: HubServer, repo: str = COMFY) -> dict[str, bytes]:
    """A small Comfy-Org repo: the default three, files one must ask for, a kind this layout does not fill."""
    files = {DM: blob(2_000_000, 1), DM_BF16: blob(700_000, 2), TE: blob(900_000, 3), VAE: blob(300_000, 4),
             LORA: blob(200_000, 5), CLIP_VISION: blob(100_000, 6), "README.md": b"# Qwen-Image for ComfyUI\n"}
    hub.add_repo(repo, files)
    return files


def fetch(hub: HubServer, repo: str, models: Path, **kw):  # noqa: ANN201
    """download_repo into ComfyUI's models folder ``models`` (comfyui layout unless ``layout`` is given)."""
    messages: list[str] = []
    kw.setdefault("layout", Layout.COMFYUI)
    options = DownloadOptions(endpoint=resolve_endpoint(hub.url), local_dir=models, http=FAST, workers=4, **kw)
    return download_repo(repo, options, DownloadHooks(on_message=messages.append)), messages


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(folder: Path) -> set[str]:
    """Every file below ``folder`` (relative), the download bookkeeping included."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


class TestComfyLayout:
    def test_files_land_in_comfyui_folders_verified(self, hub: HubServer, tmp_path: Path) -> None:
        """The must-show: `download --layout comfyui` puts each file in its ComfyUI folder, sha256-verified."""
        files = comfy_repo(hub)
        models = tmp_path / "models"
        result, _ = fetch(hub, COMFY, models)
        assert set(result.files) == set(DEFAULTS) and result.layout is Layout.COMFYUI
        for path, kind in DEFAULTS.items():
            landed = models / kind / path.rsplit("/", 1)[-1]
            assert landed.is_file() and not landed.is_symlink(), landed
            assert sha(landed.read_bytes()) == sha(files[path]), f"{landed} is not the repo's file"
        assert [str(d) for d in result.destinations] == [str(models / DEFAULTS[p] / p.rsplit("/", 1)[-1])
                                                         for p in result.files]
        # ComfyUI's folders hold the files and nothing else; the bookkeeping is one hidden folder per repo.
        assert tree(models) - {p for p in tree(models) if p.startswith(f"{STAGING_DIR}/")} == {
            "diffusion_models/qwen_image_fp8_e4m3fn.safetensors", "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
            "vae/qwen_image_vae.safetensors"}  # fmt: skip
        staging = models / STAGING_DIR / "Comfy-Org" / "Qwen-Image_ComfyUI"
        assert json.loads((staging / "plan.json").read_text())["repo_id"] == COMFY
        assert not list(models.rglob("*.part")), "no partial may remain after success"
        assert not (models / "split_files").exists()
        hub.reset_counters()
        again, _ = fetch(hub, COMFY, models)
        assert hub.total_served() == 0 and again.files_present == 3, "a complete set is never fetched again"
        rehashed, _ = fetch(hub, COMFY, models, verify=True)
        assert hub.total_served() == 0 and rehashed.files_present == 3

    def test_a_file_that_does_not_verify_never_reaches_the_folder(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub)
        hub.faults.corrupt = True  # right length, one byte flipped: only the sha256 can tell
        with pytest.raises(DownloadError) as info:
            fetch(hub, COMFY, tmp_path / "models", allow_patterns="qwen_image_vae.safetensors")
        assert info.value.exit_code == EXIT_VERIFY
        assert not (tmp_path / "models" / "vae" / "qwen_image_vae.safetensors").exists()

    def test_a_damaged_local_copy_is_fetched_again_with_verify(self, hub: HubServer, tmp_path: Path) -> None:
        files = comfy_repo(hub)
        models = tmp_path / "models"
        fetch(hub, COMFY, models)
        vae = models / "vae" / "qwen_image_vae.safetensors"
        damaged = bytearray(vae.read_bytes())
        damaged[100] ^= 0xFF
        vae.write_bytes(bytes(damaged))
        hub.reset_counters()
        fetch(hub, COMFY, models, verify=True)
        assert vae.read_bytes() == files[VAE] and hub.total_served() == len(files[VAE])

    def test_an_interrupted_file_resumes_from_its_partial(self, hub: HubServer, tmp_path: Path) -> None:
        files = comfy_repo(hub)
        models = tmp_path / "models"
        where = Placement.comfy(models, COMFY)
        stage = where.stage(DM)
        stage.part.parent.mkdir(parents=True, exist_ok=True)
        stage.part.write_bytes(files[DM][:1_200_000])  # as a killed run leaves it
        stage.sidecar.write_text(json.dumps({"path": DM, "size": len(files[DM]), "sha256": sha(files[DM]),
                                             "etag": None}))
        assert stage.part.is_relative_to(models / STAGING_DIR), "the partial is kept out of ComfyUI's folders"
        result, messages = fetch(hub, COMFY, models, allow_patterns="diffusion_models/qwen_image_fp8*")
        assert result.files_resumed == 1 and any("resuming at 1.2 MB" in m for m in messages)
        assert hub.bytes_served[DM] == len(files[DM]) - 1_200_000, "only the missing tail is fetched"
        assert (models / "diffusion_models" / "qwen_image_fp8_e4m3fn.safetensors").read_bytes() == files[DM]

    def test_files_chosen_by_name_folder_or_glob(self, hub: HubServer, tmp_path: Path) -> None:
        files = comfy_repo(hub)
        models = tmp_path / "models"
        result, _ = fetch(hub, COMFY, models, allow_patterns="qwen_image_bf16.safetensors\nloras/",
                          ignore_patterns="*fp8*")
        assert set(result.files) == {DM_BF16, LORA}
        assert (models / "diffusion_models" / "qwen_image_bf16.safetensors").read_bytes() == files[DM_BF16]
        assert (models / "loras" / "Qwen-Image-Lightning-8steps-V1.0.safetensors").read_bytes() == files[LORA]
        full, _ = fetch(hub, COMFY, models, allow_patterns=f"{DM}, split_files/vae/*", dry_run=True)
        assert set(full.files) == {DM, VAE}

    def test_a_file_of_another_kind_is_refused_by_name_before_any_write(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub)
        with pytest.raises(DownloadError) as info:
            fetch(hub, COMFY, tmp_path / "models", allow_patterns="*.safetensors")
        assert info.value.exit_code == EXIT_USAGE and CLIP_VISION in str(info.value)
        assert "diffusion_models, text_encoders, vae, loras" in str(info.value)
        assert not (tmp_path / "models").exists() and hub.total_served() == 0

    def test_pickles_and_two_files_for_one_place_are_refused(self, hub: HubServer, tmp_path: Path) -> None:
        hub.add_repo("Comfy-Org/Odd_ComfyUI", {"split_files/vae/a.safetensors": b"v" * 3000,
                                               "split_files/text_encoders/a.safetensors": b"t" * 3000,
                                               "split_files/loras/old.ckpt": b"p" * 3000})
        with pytest.raises(DownloadError, match="pickled") as info:
            fetch(hub, "Comfy-Org/Odd_ComfyUI", tmp_path / "models", allow_patterns="loras/*")
        assert info.value.exit_code == EXIT_USAGE and "split_files/loras/old.ckpt" in str(info.value)
        shared = tmp_path / "models" / "shared"  # two kinds in one folder (a hand-written extra_model_paths.yaml)
        with pytest.raises(DownloadError, match="both be written") as info:
            fetch(hub, "Comfy-Org/Odd_ComfyUI", tmp_path / "models", allow_patterns="a.safetensors",
                  comfy_dirs={"vae": shared, "text_encoders": shared})
        assert info.value.exit_code == EXIT_USAGE and not shared.exists()

    def test_a_diffusers_repo_names_the_comfy_org_repo_to_use(self, hub: HubServer, tmp_path: Path) -> None:
        hub.add_repo("Qwen/Qwen-Image", {"model_index.json": b"{}", "vae/config.json": b"{}"})
        with pytest.raises(DownloadError) as info:
            fetch(hub, "Qwen/Qwen-Image", tmp_path / "models")
        assert info.value.exit_code == EXIT_USAGE and "no split_files/ folder" in str(info.value)
        assert COMFY in str(info.value) and "--layout" in str(info.value)

    def test_an_unknown_repo_needs_patterns_and_is_told_what_it_has(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub, "someone/Other_ComfyUI")
        with pytest.raises(DownloadError) as info:
            fetch(hub, "someone/Other_ComfyUI", tmp_path / "models")
        message = str(info.value)
        assert info.value.exit_code == EXIT_USAGE and "--allow" in message
        assert "vae/qwen_image_vae.safetensors" in message and "clip_vision" not in message

    def test_comfy_dirs_put_a_kind_elsewhere(self, hub: HubServer, tmp_path: Path) -> None:
        """ComfyUI's own folder of a kind (extra_model_paths.yaml) wins over <models>/<kind>."""
        files = comfy_repo(hub)
        elsewhere = tmp_path / "big-disk" / "diffusion_models"
        result, _ = fetch(hub, COMFY, tmp_path / "models", comfy_dirs={"diffusion_models": elsewhere})
        assert (elsewhere / "qwen_image_fp8_e4m3fn.safetensors").read_bytes() == files[DM]
        assert not (tmp_path / "models" / "diffusion_models").exists()
        assert elsewhere / "qwen_image_fp8_e4m3fn.safetensors" in result.destinations

    def test_a_file_already_in_the_folder_is_verified_not_fetched(self, hub: HubServer, tmp_path: Path) -> None:
        """A file ComfyUI's own model download already put there is adopted once its sha256 matches."""
        files = comfy_repo(hub)
        models = tmp_path / "models"
        (models / "vae").mkdir(parents=True)
        (models / "vae" / "qwen_image_vae.safetensors").write_bytes(files[VAE])
        result, _ = fetch(hub, COMFY, models)
        assert VAE not in hub.bytes_served and result.files_present == 1

    def test_two_repos_fill_the_same_folders_with_their_own_bookkeeping(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub)
        edit = "split_files/diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors"
        hub.add_repo("Comfy-Org/Qwen-Image-Edit_ComfyUI", {edit: blob(400_000, 9)})
        models = tmp_path / "models"
        fetch(hub, COMFY, models)
        result, _ = fetch(hub, "Comfy-Org/Qwen-Image-Edit_ComfyUI", models)
        assert result.files == (edit,) and any("Comfy-Org/Qwen-Image_ComfyUI" in n for n in result.notes)
        assert sorted(p.name for p in (models / "diffusion_models").iterdir()) == [
            "qwen_image_edit_2509_fp8_e4m3fn.safetensors", "qwen_image_fp8_e4m3fn.safetensors"]
        assert len(list((models / STAGING_DIR).rglob("plan.json"))) == 2

    def test_offline_verifies_the_comfyui_files(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub)
        models = tmp_path / "models"
        fetch(hub, COMFY, models)
        result, _ = fetch(hub, COMFY, models, offline=True, verify=True)
        assert result.engine == "offline" and set(result.files) == set(DEFAULTS)
        (models / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors").unlink()
        with pytest.raises(DownloadError) as info:
            fetch(hub, COMFY, models, offline=True)
        assert info.value.exit_code == EXIT_OFFLINE_MISSING and TE in str(info.value)

    def test_dry_run_and_the_xet_engine(self, hub: HubServer, tmp_path: Path) -> None:
        files = comfy_repo(hub)
        dry, _ = fetch(hub, COMFY, tmp_path / "models", dry_run=True)
        assert dry.dry_run and not (tmp_path / "models").exists()
        assert dry.destinations[dry.files.index(VAE)] == tmp_path / "models" / "vae" / "qwen_image_vae.safetensors"
        result, messages = fetch(hub, COMFY, tmp_path / "models", engine="xet", allow_patterns="vae/*")
        assert result.engine == "http" and any("not used for the comfyui layout" in m for m in messages)
        assert (tmp_path / "models" / "vae" / "qwen_image_vae.safetensors").read_bytes() == files[VAE]

    def test_cleanup_removes_the_partials_of_a_comfyui_download(self, tmp_path: Path) -> None:
        where = Placement.comfy(tmp_path / "models", COMFY)
        stage = where.stage(DM)
        stage.part.parent.mkdir(parents=True)
        stage.part.write_bytes(b"x" * 1000)
        report = cleanup_partials(None, placement=where, hub_cache=tmp_path / "hub-cache")
        assert report.removed == [stage.part] and report.bytes_freed == 1000


class TestPlacement:
    @pytest.mark.parametrize("path", ["split_files/unet/x.safetensors", "split_files/vae", "vae/x.safetensors",
                                      "split_files/vae/../../x", "split_files/vae/.qwen_download/x.part",
                                      "split_files/vae//x", "split_files/clip_vision/x.safetensors"])
    def test_a_path_outside_the_four_folders_has_no_place(self, path: str, tmp_path: Path) -> None:
        with pytest.raises(InvalidInputError):
            comfy_destination(path)
        assert not Placement.comfy(tmp_path, COMFY).places(path)

    def test_names_inside_a_kind_keep_their_sub_folders(self, tmp_path: Path) -> None:
        where = Placement.comfy(tmp_path, COMFY, {"loras": tmp_path / "my-loras"})
        assert where.final("split_files/loras/qwen/a.safetensors") == tmp_path / "my-loras" / "qwen" / "a.safetensors"
        assert where.local_name("split_files/loras/qwen/a.safetensors") == "qwen/a.safetensors"
        assert where.staging == tmp_path / STAGING_DIR / "Comfy-Org" / "Qwen-Image_ComfyUI"

    def test_known_comfy_org_repos_belong_to_known_families(self) -> None:
        from qwen_core.download import COMFY_REPOS
        from qwen_core.families import known_repo_ids

        assert {d for r in COMFY_REPOS for d in r.diffusers_repos} <= set(known_repo_ids())
        assert all(comfy_destination(p) for r in COMFY_REPOS for p in r.defaults)

    def test_options_are_validated_with_the_parameter_named(self) -> None:
        assert DownloadOptions(layout="comfyui files").layout is Layout.COMFYUI
        assert DownloadOptions(layout="configs only").layout is Layout.CONFIGS
        with pytest.raises(InvalidInputError, match="layout"):
            DownloadOptions(layout="flat")
        with pytest.raises(InvalidInputError, match="comfy_dirs"):
            DownloadOptions(layout="comfyui", comfy_dirs={"clip_vision": Path("x")})
        with pytest.raises(InvalidInputError, match="comfy_dirs"):
            DownloadOptions(comfy_dirs={"vae": Path("x")})  # only for the comfyui layout

    def test_the_default_models_folder_is_the_one_above_the_store(self, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("QWEN_HOME", raising=False)
        paths.register_models_dirs([])
        with pytest.raises(InvalidInputError, match="ComfyUI's models folder"):
            placement_for(COMFY, DownloadOptions(layout="comfyui"))
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "ComfyUI" / "models" / "diffusers"))
        where = placement_for(COMFY, DownloadOptions(layout="comfyui"))
        assert where.final(VAE) == tmp_path / "ComfyUI" / "models" / "vae" / "qwen_image_vae.safetensors"
        monkeypatch.delenv("QWEN_HOME")
        paths.register_models_dirs([tmp_path / "Comfy2" / "models" / "diffusers"])  # what the bridge does in ComfyUI
        try:
            where = placement_for(COMFY, DownloadOptions(layout="comfyui"))
        finally:
            paths.register_models_dirs([])
        assert where.root == tmp_path / "Comfy2" / "models"


class TestConfigsLayout:
    def test_configs_only_is_a_valid_configs_folder_without_weights(self, hub: HubServer, tmp_path: Path,
                                                                     tiny_model_dir: Path) -> None:
        from qwen_core.sources.configs import check_configs_folder

        files = {p.relative_to(tiny_model_dir).as_posix(): p for p in tiny_model_dir.rglob("*") if p.is_file()}
        hub.add_repo("Qwen/Qwen-Image", files)
        target = tmp_path / "diffusers" / "Qwen" / "Qwen-Image"
        result, _ = fetch(hub, "Qwen/Qwen-Image", target, layout="configs")
        weights = [p for p in result.files if p.endswith((".safetensors", ".bin"))]
        assert result.files and not weights and "model_index.json" in result.files
        assert not list(target.rglob("*.safetensors"))
        assert check_configs_folder(target).family.key == "qwen-image"
        # The full download later into the same folder fetches only what is missing: the weights.
        hub.reset_counters()
        full, _ = fetch(hub, "Qwen/Qwen-Image", target, layout="diffusers")
        assert full.files_present == len(result.files)
        assert hub.total_served() == sum(p.stat().st_size for path, p in files.items() if path not in result.files)

    def test_patterns_narrow_the_configs_and_never_add_weights(self, hub: HubServer, tmp_path: Path) -> None:
        hub.add_repo("org/model", {"model_index.json": b"{}", "vae/config.json": b"{}",
                                   "vae/diffusion_pytorch_model.safetensors": b"w" * 5000,
                                   "tokenizer/vocab.json": b"{}", "tokenizer/weights.bin": b"w" * 2000})
        result, _ = fetch(hub, "org/model", tmp_path / "m", layout="configs", allow_patterns="*")
        assert set(result.files) == {"model_index.json", "vae/config.json", "tokenizer/vocab.json"}

    def test_a_comfy_org_repo_names_the_family_diffusers_repo(self, hub: HubServer, tmp_path: Path) -> None:
        comfy_repo(hub)
        with pytest.raises(DownloadError) as info:
            fetch(hub, COMFY, tmp_path / "m", layout="configs")
        assert info.value.exit_code == EXIT_USAGE and "Qwen/Qwen-Image" in str(info.value)


class TestCli:
    def test_layout_comfyui_prints_where_each_file_went(self, hub: HubServer, tmp_path: Path) -> None:
        files = comfy_repo(hub)
        models = tmp_path / "ComfyUI" / "models"
        args = [COMFY, "--layout", "comfyui", "--out-dir", str(models), "--endpoint", hub.url]
        dry = run_cli([*args, "--dry-run"], env=cli_env())
        assert dry.returncode == 0, dry.stderr
        assert f"{VAE} -> {models / 'vae' / 'qwen_image_vae.safetensors'}" in dry.stdout
        done = run_cli(args, env=cli_env())
        assert done.returncode == 0, done.stderr
        assert set(done.stdout.split()) == {str(models / kind / p.rsplit("/", 1)[-1]) for p, kind in DEFAULTS.items()}
        for path, kind in DEFAULTS.items():
            assert (models / kind / path.rsplit("/", 1)[-1]).read_bytes() == files[path]

    def test_layout_configs(self, hub: HubServer, tmp_path: Path) -> None:
        hub.add_repo("Qwen/Qwen-Image", {"model_index.json": b"{}", "vae/config.json": b"{}",
                                         "vae/diffusion_pytorch_model.safetensors": b"w" * 5000})
        out = tmp_path / "configs"
        done = run_cli(["Qwen/Qwen-Image", "--layout", "configs", "--out-dir", str(out), "--endpoint", hub.url],
                       env=cli_env())
        assert done.returncode == 0, done.stderr
        assert tree(out) - {p for p in tree(out) if p.startswith(STAGING_DIR)} == {"model_index.json", "vae/config.json"}


class TestDownloaderNode:
    """The node's `layout` widget, headless (the bridge's fallback folders) and with ComfyUI's folder_paths."""

    @pytest.fixture
    def store(self, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        models = tmp_path / "ComfyUI" / "models"
        monkeypatch.setenv("QWEN_HOME", str(models / "diffusers"))  # headless: the bridge's models/diffusers
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the user's own mirror: loopback allowed
        return models

    def test_layout_is_the_last_required_widget_and_defaults_to_diffusers(self) -> None:
        from nodes.downloader import LAYOUTS, QwenImageDownloader

        required = QwenImageDownloader.INPUT_TYPES()["required"]
        assert list(required)[-1] == "layout" and required["layout"][1]["default"] == "diffusers"
        assert required["layout"][0] == list(LAYOUTS) == ["diffusers", "comfyui files", "configs only"]
        assert "qwen_image_fp8_e4m3fn.safetensors" in required["layout"][1]["tooltip"]

    def test_comfyui_files_land_in_comfyui_folders(self, hub: HubServer, store: Path) -> None:
        from nodes.downloader import QwenImageDownloader

        files = comfy_repo(hub)
        before = QwenImageDownloader.IS_CHANGED(repo_id=COMFY, layout="comfyui files")
        out = QwenImageDownloader().download(COMFY, "main", "", "", 2, "", False, "comfyui files")
        model_path, report = out["result"]
        assert Path(model_path) == store / "diffusion_models"
        for path, kind in DEFAULTS.items():
            landed = store / kind / path.rsplit("/", 1)[-1]
            assert landed.read_bytes() == files[path] and str(landed) in report
        assert not (store / "diffusers" / "Comfy-Org").exists(), "nothing in models/diffusers for this layout"
        assert QwenImageDownloader.IS_CHANGED(repo_id=COMFY, layout="comfyui files") == before, \
            "the node's own files must not make the next queue run it again"
        (store / "vae" / "other.safetensors").write_bytes(b"x")
        assert QwenImageDownloader.IS_CHANGED(repo_id=COMFY, layout="comfyui files") != before

    def test_configs_only_returns_the_configs_folder(self, hub: HubServer, store: Path) -> None:
        from nodes.downloader import QwenImageDownloader

        hub.add_repo("Qwen/Qwen-Image", {"model_index.json": b"{}", "vae/config.json": b"{}",
                                         "vae/diffusion_pytorch_model.safetensors": b"w" * 5000})
        model_path, _ = QwenImageDownloader().download("Qwen/Qwen-Image", "main", "", "", 2, "", False,
                                                       "configs only")["result"]
        assert Path(model_path) == store / "diffusers" / "Qwen" / "Qwen-Image"
        assert (Path(model_path) / "vae" / "config.json").is_file()
        assert not list(Path(model_path).rglob("*.safetensors"))

    def test_errors_name_the_node_fields(self, hub: HubServer, store: Path) -> None:
        from nodes.downloader import QwenImageDownloader

        hub.add_repo("Qwen/Qwen-Image", {"model_index.json": b"{}"})
        with pytest.raises(DownloadError) as info:
            QwenImageDownloader().download("Qwen/Qwen-Image", "main", "", "", 2, "", False, "comfyui files")
        assert "the `repo_id` field" in str(info.value) and "the `layout` field" in str(info.value)
        assert COMFY in str(info.value) and "--" not in str(info.value)
        with pytest.raises(InvalidInputError, match="layout"):
            QwenImageDownloader().download("Qwen/Qwen-Image", "main", "", "", 2, "", False, "flat")

    def test_inside_comfyui_the_kind_folders_come_from_folder_paths(self, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """ComfyUI lists models/unet before models/diffusion_models: downloads go to the folder named for the kind."""
        import types

        from nodes import comfy_bridge as bridge

        models = tmp_path / "models"
        extra = tmp_path / "extra" / "loras"
        table = {"diffusers": [models / "diffusers"], "diffusion_models": [models / "unet", models / "diffusion_models"],
                 "text_encoders": [models / "text_encoders", models / "clip"], "vae": [models / "vae"],
                 "loras": [extra, models / "loras"]}  # fmt: skip
        fake = types.SimpleNamespace(models_dir=str(models), get_folder_paths=lambda key: [str(p) for p in table[key]])
        monkeypatch.setattr(bridge, "folder_paths", fake)
        assert bridge.comfy_models_dir() == models
        assert bridge.comfy_download_dirs() == {"diffusion_models": models / "diffusion_models",
                                                "text_encoders": models / "text_encoders", "vae": models / "vae",
                                                "loras": extra}
