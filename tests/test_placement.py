"""Placement (issue 16): which card runs which component, in one process.

There is no second device on this box, so the placement logic is tested with device strings (spec, planner,
loader, governor with fake readings per card), and the tensor moves with real runs where every device string
is "cpu" while the boundary hooks are installed anyway and a recording mover checks what they move where.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen_core import devices, governor, memory_model
from qwen_core.errors import InvalidInputError
from qwen_core.load_policy import LoadPlan, next_plan
from qwen_core.loading import PipelineLoader
from qwen_core.memory import get_residency_manager
from qwen_core.options import MemoryMode
from qwen_core.placement import plan as planner
from qwen_core.placement.spec import Placement, even_split, parse_devices

GIB = 1024**3
FULL = memory_model.family_model().weights("bf16")  # the measured Qwen-Image weights: 38.06 + 15.45 + 0.24 GiB
# Full-size parameter counts, to make the tiny model's loader reason about the real weights.
PARAMS = {"transformer": int(38.06 * GIB / 2), "text_encoder": int(15.45 * GIB / 2), "vae": int(0.24 * GIB / 2)}


@pytest.fixture(autouse=True)
def _nothing_resident():
    get_residency_manager().release_all()
    yield
    get_residency_manager().release_all()


def cards(*free: float) -> list[planner.Card]:
    return [planner.Card(f"cuda:{i}", f) for i, f in enumerate(free)]


def fake_cuda(monkeypatch, *free: float) -> None:
    """``devices.probe_hardware`` reports len(free) CUDA cards with these free GiB (bf16-capable)."""

    def probe(device: str = "cuda") -> devices.HardwareProbe:
        index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
        return devices.HardwareProbe(cuda_available=True, cuda_device_count=len(free), device_name="fake card",
                                     vram_total_gb=max(free), vram_free_gb=free[min(index, len(free) - 1)],
                                     compute_capability=(9, 0), ram_total_gb=256.0, ram_available_gb=200.0)

    monkeypatch.setattr(devices, "probe_hardware", probe)


def full_size(monkeypatch, loader: PipelineLoader) -> None:
    monkeypatch.setattr(type(loader.source.folder), "num_params", lambda self, name: PARAMS.get(name, 0))


class TestSpec:
    def test_texts_become_placements(self):
        assert parse_devices("single", "cuda").key == "single"
        assert parse_devices("", "cpu").is_single
        te = parse_devices("text_encoder=cuda:1", "cuda")
        assert (te.main, te.text_encoder, te.is_split) == ("cuda:0", "cuda:1", False)
        both = parse_devices("dit=cuda:0,cuda:1;  te=CPU", "cuda:0")
        assert both.transformer == ("cuda:0", "cuda:1") and both.text_encoder == "cpu" and both.is_split
        assert both.key == "transformer=cuda:0,cuda:1 text_encoder=cpu"
        assert parse_devices(both.key, "cuda") == both  # the key reads back as the same placement
        assert parse_devices("text_encoder=cuda:0", "cuda").is_single  # already on the main card
        assert parse_devices("transformer=cuda:1", "cuda").main == "cuda:1"

    @pytest.mark.parametrize(("text", "message"), [
        ("cuda:1", "is not component=device"),
        ("vae=cuda:1", "VAE runs on the transformer's"),
        ("unet=cuda:1", "unknown component 'unet'"),
        ("te=cuda:1 te=cpu", "named twice"),
        ("te=gpu1", "'gpu1' is not a device"),
        ("dit=cuda:0,cuda:0", "names a device twice"),
        ("dit=cuda:0,cpu", "CUDA devices only"),
        ("te=mps", "mps is a single device"),
        ("auto", "the loader resolves it"),
    ])  # fmt: skip
    def test_mistakes_are_refused_naming_the_field(self, text, message):
        with pytest.raises(InvalidInputError, match=message) as err:
            parse_devices(text, "cuda")
        assert err.value.field == "devices" and err.value.fix  # every refusal says what to do

    def test_blocks_split_evenly_or_as_planned(self):
        assert even_split(60, 4) == (15, 15, 15, 15) and even_split(60, 7) == (9, 9, 9, 9, 8, 8, 8)
        placed = Placement(("cuda:0", "cuda:1"))
        assert placed.blocks_per_device(60) == (30, 30)
        assert placed.with_split((34, 26)).describe(60).startswith("transformer blocks 34 on cuda:0 + 26 on cuda:1")
        with pytest.raises(InvalidInputError, match="does not cover 60 blocks"):
            placed.with_split((10, 10)).blocks_per_device(60)


class TestPlanner:
    """The ``auto`` placement from fake free-VRAM readings per card (full-size bf16 weights)."""

    @pytest.mark.parametrize(("free", "key", "split"), [
        ((79.0,), "single", ()),  # one card
        ((79.0, 79.0), "single", ()),  # the model and 1328x1328 fit one H100: no cross-card traffic
        ((47.0, 47.0), "transformer=cuda:0 text_encoder=cuda:1", ()),  # 48 GB cards: moving the TE is enough
        # it is not: split, resident (card 0 also holds the decode: 35 blocks with the gpu slope of 3.40 GiB/MP)
        ((44.5, 44.5), "transformer=cuda:0,cuda:1 text_encoder=cuda:1", (35, 25)),
        ((44.5, 44.5, 44.5), "transformer=cuda:0,cuda:1 text_encoder=cuda:1", (35, 25)),  # the fewest cards
        ((23.0, 23.0), "transformer=cuda:0 text_encoder=cuda:1", ()),  # 2x24 GB: no split fits; TE moved, streamed
        ((30.0, 10.0), "single", ()),  # nowhere to put the text encoder
    ])  # fmt: skip
    def test_auto_decisions(self, free, key, split):
        decision = planner.plan_placement(FULL, cards(*free), 60)
        assert (decision.placement.key, decision.placement.block_split) == (key, split), decision.reason

    def test_a_split_fits_every_card_at_the_reference_size(self):
        decision = planner.plan_placement(FULL, cards(44.5, 44.5), 60)
        ref = memory_model.family_model().reference_pixels
        loads = {c.device: c for c in planner.card_loads(decision.placement, FULL, 60)}
        main = loads["cuda:0"]
        assert main.main and main.weights.get("text_encoder") is None and main.weights.get("vae") == 0.24
        assert memory_model.window_pixels("gpu", 44.5, weights=main.weights) >= ref
        other = loads["cuda:1"]
        assert planner.blocks_card_pixels(44.5, other.weights.total) >= ref
        total = sum(c.weights.total for c in loads.values())
        assert total == pytest.approx(FULL.total)  # every GiB is somewhere, once

    def test_split_blocks_respects_each_cards_room(self):
        assert planner.split_blocks(60, [20.0, 20.0], 0.5) == (30, 30)
        assert planner.split_blocks(60, [10.0, 30.0], 0.5) == (15, 45)
        assert planner.split_blocks(60, [5.0, 200.0], 0.5) == (1, 59)  # in proportion, at least one each
        assert planner.split_blocks(60, [5.0, 25.0], 0.5) == (10, 50)  # both cards full
        assert planner.split_blocks(60, [10.0, 10.0], 0.5) is None  # 40 blocks of room for 60
        assert planner.split_blocks(60, [0.2, 100.0], 0.5) is None  # a card with no room for one block


class TestLoader:
    """The loader with fake CUDA cards: devices resolved, the memory decisions see only the main card's weights."""

    def test_text_encoder_on_another_card(self, tiny_model_dir, monkeypatch):
        fake_cuda(monkeypatch, 24.0, 24.0)
        loader = PipelineLoader(tiny_model_dir, placement="te=cuda:1")
        assert loader.devices == Placement(("cuda:0",), "cuda:1")
        assert loader.residency_key[-1] == "transformer=cuda:0 text_encoder=cuda:1"
        assert loader.plan.placement == loader.devices and loader.plan.other_cards == (("cuda:1", 24.0),)
        assert "devices transformer=cuda:0 text_encoder=cuda:1" in loader.plan.describe()
        full_size(monkeypatch, loader)
        assert set(loader.main_card_bytes(torch.bfloat16)) == {"transformer", "vae"}
        # choose_memory_mode for the main card without the text encoder: 24 GB holds it streamed, not resident.
        plan = loader.refresh_plan(loader.plan, rechoose=True)
        assert plan.memory_mode is MemoryMode.STREAMED and plan.vram_gib == 24.0
        situation = loader.governor_inputs()["situation"]
        assert situation.weights.get("text_encoder") is None and situation.other_cards == ()
        assert set(loader.unsupported_memory_modes) == {"model_offload", "group_offload", "sequential"}

    def test_the_text_encoder_card_must_hold_it(self, tiny_model_dir, monkeypatch):
        fake_cuda(monkeypatch, 24.0, 24.0)
        loader = PipelineLoader(tiny_model_dir, placement="te=cuda:1")
        full_size(monkeypatch, loader)
        fake_cuda(monkeypatch, 24.0, 12.0)  # something else took cuda:1 meanwhile
        with pytest.raises(InvalidInputError, match=r"`devices`: the text encoder needs 15.4 GiB .* cuda:1, which "
                                                    r"has 12.0 GiB free"):
            loader.refresh_plan(loader.plan, rechoose=True)

    def test_a_48_gb_card_runs_resident_once_the_text_encoder_moves(self, tiny_model_dir, monkeypatch):
        fake_cuda(monkeypatch, 47.0, 47.0)
        single = PipelineLoader(tiny_model_dir)
        full_size(monkeypatch, single)
        assert single.refresh_plan(single.plan, rechoose=True).memory_mode is not MemoryMode.GPU
        placed = PipelineLoader(tiny_model_dir, placement="te=cuda:1")
        assert placed.refresh_plan(placed.plan, rechoose=True).memory_mode is MemoryMode.GPU
        placed.plan = placed.refresh_plan(placed.plan, rechoose=True)
        decision = governor.clamp_image_size(1328, 1328, **placed.governor_inputs())
        assert not decision.scaled and decision.memory_mode == "gpu"

    def test_auto_plans_from_the_cards_readings(self, tiny_model_dir, monkeypatch):
        fake_cuda(monkeypatch, 44.5, 44.5)
        loader = PipelineLoader(tiny_model_dir, placement="auto")
        assert loader.devices.is_single and "one card" in loader.devices_reason  # the tiny model fits anywhere
        fake_cuda(monkeypatch, 44.5, 44.5)
        monkeypatch.setattr(type(loader.source.folder), "num_params", lambda self, name: PARAMS.get(name, 0))
        split = PipelineLoader(tiny_model_dir, placement="auto")
        # The tiny transformer has 2 blocks (of 19 GiB each, as the full-size weights are spread over them).
        assert split.devices.transformer == ("cuda:0", "cuda:1") and split.devices.block_split == (1, 1)
        assert split.plan.memory_mode is MemoryMode.GPU and "split" in split.devices_reason

    def test_split_windows_are_bounded_by_every_card(self, tiny_model_dir, monkeypatch):
        fake_cuda(monkeypatch, 44.5, 30.0)
        loader = PipelineLoader(tiny_model_dir, placement="transformer=cuda:0,cuda:1")
        full_size(monkeypatch, loader)
        loader.plan = loader.refresh_plan(loader.plan, rechoose=True)
        assert loader.plan.memory_mode is MemoryMode.GPU  # a split runs resident
        situation = loader.governor_inputs()["situation"]
        (other,) = situation.other_cards
        assert other.device == "cuda:1" and other.weights.total == pytest.approx(38.06 / 2)  # 1 of 2 blocks
        window = governor.memory_window(situation)
        main_only = governor.memory_window(dataclasses.replace(situation, other_cards=()))
        ours = planner.blocks_card_pixels(30.0, other.weights.total)
        assert window.pixels == min(main_only.pixels, ours)
        tight = dataclasses.replace(situation, other_cards=(dataclasses.replace(other, vram_gb=21.0),))
        squeezed = governor.memory_window(tight)
        assert squeezed.pixels < main_only.pixels and "cuda:1" in squeezed.reason

    @pytest.mark.parametrize(("kwargs", "field", "message"), [
        ({"placement": "te=cuda:5"}, "devices", "cuda:5: only 2 CUDA device"),
        ({"placement": "te=cuda:1", "memory_mode": "model_offload"}, "memory_mode", "use gpu or streamed"),
        ({"placement": "dit=cuda:0,cuda:1", "memory_mode": "streamed"}, "memory_mode", "use gpu"),
        ({"placement": "dit=cuda:1", "device": "cuda:0"}, "devices", "but device is cuda:0"),
    ])  # fmt: skip
    def test_impossible_combinations_are_refused(self, tiny_model_dir, monkeypatch, kwargs, field, message):
        fake_cuda(monkeypatch, 24.0, 24.0)
        with pytest.raises(InvalidInputError, match=message) as err:
            PipelineLoader(tiny_model_dir, **kwargs)
        assert err.value.field == field

    def test_placed_oom_ladder(self):
        te = LoadPlan(MemoryMode.GPU, torch.bfloat16, placement=Placement(("cuda:0",), "cuda:1"))
        step = next_plan(te, "oom")
        assert step.memory_mode is MemoryMode.STREAMED and step.pixel_scale == 0.75  # never an offload mode
        step = next_plan(step, "oom")
        assert step.memory_mode is MemoryMode.STREAMED and step.max_memory_fraction == 0.7
        split = LoadPlan(MemoryMode.GPU, torch.bfloat16, placement=Placement(("cuda:0", "cuda:1")))
        assert next_plan(split, "oom") is None  # resident or nothing
        assert next_plan(split, "transient") == split


class Recorder:
    """A ``Mover`` that records (what was moved, target device) and moves for real."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.device]] = []

    def __call__(self, obj, device):
        from qwen_core.placement.hooks import send

        kinds = sorted({type(v).__name__ for v in (obj.values() if isinstance(obj, dict) else obj)})
        self.calls.append(("+".join(kinds), device))
        return send(obj, device)


def _generate(loader: PipelineLoader) -> torch.Tensor:
    from qwen_core.generator import QwenImageGenerator

    request = dict(width=64, height=48, steps=2, true_cfg_scale=4.0, seed=5)
    return QwenImageGenerator(loader).generate("a red fox", "blurry", **request).images


@pytest.mark.slow
class TestRealRuns:
    """Every device is the CPU, the placement machinery runs anyway: same image, and the hooks did their moves."""

    def test_split_and_text_encoder_hooks_give_the_same_image(self, tiny_model_dir, monkeypatch):
        from qwen_core.pipeline_state import state_of
        from qwen_core.placement import hooks

        reference = _generate(PipelineLoader(tiny_model_dir, device="cpu"))
        get_residency_manager().release_all()
        recorder = Recorder()
        original = hooks.apply_placement
        monkeypatch.setattr(hooks, "apply_placement", lambda pipe, placement, **kw: original(pipe, placement,
                                                                                               mover=recorder, **kw))
        placed = PipelineLoader(tiny_model_dir, device="cpu", placement=Placement(("cpu", "cpu"), "cpu", (1, 1)))
        images = _generate(placed)
        assert torch.equal(images, reference)
        handle = state_of(placed.pipeline).devices
        assert handle.block_counts == (1, 1) and "1 on cpu + 1 on cpu" in placed.placement
        assert handle.pinned is placed.pipeline.vae
        cpu = torch.device("cpu")
        assert {device for _, device in recorder.calls} == {cpu}
        # Per prompt (prompt, negative): the text encoder's args and kwargs there, its output (with the KV cache)
        # back. Per transformer call (2 steps x cond/uncond): args and kwargs to the main card, block 1's args and
        # kwargs to its card, norm_out's args and kwargs back to the main card, the output back to the caller.
        kinds = [kind for kind, _ in recorder.calls]
        assert sum("DynamicCache" in kind for kind in kinds) == 2
        assert len(recorder.calls) == 2 * 3 + 4 * (2 + 2 + 2 + 1)
        assert len(handle.hooks) == 2 + 2 + 1 + 1  # text encoder pre+post, transformer pre+post, block 1, norm_out

    def test_streamed_engine_on_the_main_card_text_encoder_on_its_own(self, tiny_model_dir):
        from qwen_core.pipeline_state import state_of

        reference = _generate(PipelineLoader(tiny_model_dir, device="cpu"))
        get_residency_manager().release_all()
        placed = PipelineLoader(tiny_model_dir, device="cpu", memory_mode="streamed",
                                placement=Placement(("cpu",), "cpu"))
        images = _generate(placed)
        # Batched CFG in the streamed engine: within float32 noise of two forwards.
        assert float((images - reference).abs().max()) < 1e-5
        state = state_of(placed.pipeline)
        assert state.streaming is not None and state.streaming.text_encoder is None  # not streamed: placed
        assert state.streaming.options["placed_elsewhere"] == ("text_encoder",)
        assert "text encoder on cpu" in placed.placement

    @pytest.mark.parametrize("family", ["qwen-image-edit-2509", "qwen-image-layered", "qwen-image-2.1"])
    def test_other_families_give_the_same_image(self, tiny_family_dir, family, monkeypatch):
        """Edit-2509 and Layered feed the input image through the text encoder: its pixel values cross to the
        encoder's device too. 2.1 has its own transformer class and a Qwen3-VL encoder."""
        import numpy as np
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

        from qwen_core.families import FAMILIES
        from qwen_core.generator import QwenImageGenerator

        monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 128 * 128)  # the edit pipelines resize to ~1 MP: keep it small
        monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 64 * 64)
        folder = tiny_family_dir(family)
        takes = FAMILIES[family].image_inputs.maximum
        images = [torch.from_numpy(np.random.RandomState(0).rand(1, 48, 64, 3).astype(np.float32))] if takes else None

        def run(**kwargs) -> torch.Tensor:
            generator = QwenImageGenerator(PipelineLoader(folder, device="cpu", **kwargs))
            layers = 2 if family == "qwen-image-layered" else None
            result = generator.generate("a red fox", "blurry", images=images, width=64, height=48, steps=2, seed=5,
                                        true_cfg_scale=4.0, layers=layers)
            get_residency_manager().release_all()
            return result.images

        reference = run()
        assert torch.equal(run(placement=Placement(("cpu", "cpu"), "cpu")), reference)

    def test_execution_device_is_pinned_to_the_main_card(self, tiny_model_dir):
        """diffusers' own choice would be the text encoder's card (alphabetical); the VAE's accelerate hook
        makes it the main card. Checked with a stand-in device object (nothing is allocated on it)."""
        from qwen_core.placement.hooks import apply_placement, remove_placement

        loader = PipelineLoader(tiny_model_dir, device="cpu")
        pipe = loader.load()
        handle = apply_placement(pipe, Placement(("cpu",), "cpu"))
        assert pipe._execution_device == torch.device("cpu")
        pipe.vae._hf_hook.execution_device = torch.device("cuda", 3)
        assert pipe._execution_device == torch.device("cuda", 3)
        remove_placement(handle)
        assert not hasattr(pipe.vae, "_hf_hook") and handle.hooks == []


class TestLoaderNode:
    """ComfyUI runs one process: the Loader offers placement, and says where one-image parallelism lives."""

    def test_widgets(self):
        from nodes.loader import QwenImageLoader

        optional = QwenImageLoader.INPUT_TYPES()["optional"]
        choices, options = optional["devices"]
        assert choices[:2] == ["single", "auto"] and choices[-1] == "custom" and options["default"] == "single"
        assert "--context-parallel" in options["tooltip"] and "one process" in options["tooltip"]
        assert optional["custom_devices"][0] == "STRING" and optional["custom_devices"][1]["tooltip"]

    @pytest.mark.parametrize(("devices", "custom", "verdict"), [
        ("single", "", True),
        ("text_encoder=cuda:1", "", True),
        ("auto", "", True),
        ("custom", "te=cuda:1 dit=cuda:0,cuda:2", True),
        ("custom", "", "`custom_devices`: is empty"),
        ("custom", "te=gpu", "`custom_devices`: 'gpu' is not a device"),
        ("custom", "vae=cuda:1", "`custom_devices`: the VAE runs"),
    ])  # fmt: skip
    def test_validation_names_the_widget(self, devices, custom, verdict):
        from nodes.loader import QwenImageLoader

        result = QwenImageLoader.VALIDATE_INPUTS(model="x", devices=devices, custom_devices=custom)
        assert result is True if verdict is True else verdict in result

    def test_the_handle_carries_the_placement(self, tiny_model_dir, tmp_path, monkeypatch):
        from nodes import common
        from nodes.loader import QwenImageLoader

        home = tmp_path / "diffusers"
        home.mkdir()
        (home / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
        monkeypatch.setenv("QWEN_HOME", str(home))
        (handle,) = QwenImageLoader().load("tiny", "auto", "auto", "auto", devices="custom", custom_devices="te=cpu")
        assert handle.devices == "te=cpu" and handle.loader_kwargs()["placement"] == "te=cpu"
        assert handle.key != common.PipeHandle(handle.path).key  # another resident model
        assert common.generator_for(handle).loader.devices.is_single  # te=cpu on a CPU-only box: one device
        with pytest.raises(InvalidInputError, match="`custom_devices`"):
            QwenImageLoader().load("tiny", "auto", "auto", "auto", devices="custom", custom_devices="te=")


class TestPreflight:
    """With several cards, Preflight shows each reading and the same ``auto`` placement the loader plans."""

    VERSIONS = {"torch": "2.11.0+cu130", "diffusers": "0.42.1", "transformers": "5.24.0", "huggingface_hub": "2.4.0",
                "accelerate": "1.15.0", "safetensors": "0.8.0"}
    LISTING = {f"{name}/diffusion_pytorch_model.safetensors": n * 2 for name, n in PARAMS.items()}

    def _report(self, free: tuple[float, ...]):
        from qwen_core.devices import DeviceConfig
        from qwen_core.preflight import perform_preflight_checks

        cfg = DeviceConfig("cuda", torch.bfloat16, "native", "test", "Test GPU", 48.0, free[0], 256.0, 200.0, (9, 0),
                           True)
        return perform_preflight_checks(device_config=cfg, file_sizes=self.LISTING, versions=self.VERSIONS,
                                        cuda_info={}, disk_free=lambda p: 10**13, cards=cards(*free))

    @pytest.mark.parametrize("free", [(47.0, 47.0), (44.5, 44.5), (23.0, 23.0)])
    def test_preflight_and_the_loader_agree(self, tiny_model_dir, monkeypatch, free):
        report = self._report(free)
        check = report.check("devices")
        assert check.measured.startswith("2 CUDA cards: cuda:0") and report.profile.devices in check.recommendation
        fake_cuda(monkeypatch, *free)
        monkeypatch.setattr(type(PipelineLoader(tiny_model_dir).source.folder), "num_params",
                            lambda self, name: PARAMS.get(name, 0))
        loader = PipelineLoader(tiny_model_dir, placement="auto")
        loader.plan = loader.refresh_plan(loader.plan, rechoose=True)
        assert loader.devices.key == report.profile.devices
        if not loader.devices.is_split:  # the tiny model splits its 2 blocks differently from the measured 60
            assert loader.plan.memory_mode.value == report.profile.memory_mode
            decision = governor.clamp_image_size(1328, 1328, **loader.governor_inputs())
            assert decision.max_pixels == report.profile.max_pixels

    def test_one_card_reports_as_before(self):
        report = self._report((47.0,))
        assert report.profile.devices == "single" and all(c.name != "devices" for c in report.checks)
        assert report.profile.memory_mode != "gpu"  # 47 GiB cannot hold all 54 GiB of weights
