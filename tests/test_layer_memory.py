"""What the streamed engine must hold for the layers of the user's own files (fp8, GGUF), measured on the CPU.

Regression for the H200 run of 2026-12-02 (bench/RESULTS.md "Single files: fp8 and GGUF"): fp8 and GGUF Q8_0
transformers ran out of memory in 16 / 12 GiB caps where bf16 streamed fine. The planner sized residency and
slots from stored bytes correctly, but its activation reserve was the dense model's: it had no room for what an
fp8 or GGUF layer allocates inside its own forward (the upcast or dequantised weight, or the fp8-matmul copy
of the input), and it sized fp8-storage slots as if every block were bf16. ``tests/alloc_tracker.py`` counts
the bytes of the tensors alive during a forward (a CPU stand-in for the CUDA allocator's peak).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from alloc_tracker import AllocTracker
from single_files import comfy_models_dir, write_gguf_transformer, write_transformer
from torch import nn

from qwen_core.layer_memory import layer_transient_bytes, transient_bytes
from qwen_core.sources.fp8_weights import Fp8WeightLinear, set_fp8_matmul
from qwen_core.streaming import (
    FIXED_OVERHEAD_GIB,
    GIB,
    disable_streamed_offload,
    enable_streamed_offload,
    module_bytes,
    plan_resident,
    plan_transformer,
)

E4M3 = torch.float8_e4m3fn
PIXELS = 64 * 64  # the tiny forwards: 16 image tokens per image, batch 2 (batched CFG), 8 text tokens


def _fp8_layer(rows: int, cols: int, *, bias: bool = True, seed: int = 0) -> Fp8WeightLinear:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 20).to(E4M3)
    scale = torch.rand(rows, generator=g) * 0.01 + 1e-3
    return Fp8WeightLinear(w, scale, torch.randn(rows, generator=g).to(torch.bfloat16) if bias else None)


def _gguf_layer(kind: Any, rows: int, cols: int, dtype: torch.dtype) -> nn.Module:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = torch.randint(0, 256, (rows, cols // block * size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    layer = GGUFLinear(cols, rows, True, compute_dtype=dtype, device="meta")
    layer.weight = GGUFParameter(raw, quant_type=kind)
    layer.bias = nn.Parameter(torch.zeros(rows, dtype=dtype), requires_grad=False)
    return layer


def _beyond_output(layer: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes ``layer(x)`` allocates, less its output (the output is an activation, counted elsewhere)."""
    with torch.no_grad(), AllocTracker() as t:
        y = layer(x)
    return t.peak - y.numel() * y.element_size()


class TestLayerWorkingMemory:
    def test_a_dense_linear_allocates_nothing_but_its_output(self) -> None:
        layer = nn.Linear(256, 512)
        assert _beyond_output(layer, torch.randn(8, 256)) == 0
        assert layer_transient_bytes(layer, torch.float32, rows=8) == 0 == transient_bytes(layer, torch.float32, 8)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_fp8_upcast_holds_one_weight_copy(self, dtype: torch.dtype) -> None:
        layer = _fp8_layer(512, 1024)
        measured = _beyond_output(layer, torch.randn(4, 1024, dtype=dtype))
        one_copy = 512 * 1024 * torch.empty((), dtype=dtype).element_size()
        estimate = layer_transient_bytes(layer, dtype, rows=4)
        assert one_copy <= measured <= estimate  # one copy, not two (``w.to(dtype) * s`` held two)
        assert estimate - one_copy <= 512 * 4  # the estimate is that copy plus the bias in the compute dtype

    def test_in_place_upcast_gives_the_same_values(self) -> None:
        layer = _fp8_layer(64, 128, bias=False)
        for dtype in (torch.float32, torch.bfloat16):
            old = layer.weight.to(dtype) * layer.weight_scale.to(dtype)[:, None]
            assert torch.equal(layer.dequantized_weight(dtype), old)
        assert layer.weight.dtype == E4M3  # the stored payload is untouched

    def test_fp8_matmul_copies_its_input(self) -> None:
        layer = _fp8_layer(64, 1024)
        layer.fp8_matmul = True
        rows = 512  # many rows: the input's copies, not the weight, are what this path allocates
        measured = _beyond_output(layer, torch.randn(rows, 1024))
        assert rows * 1024 * 4 <= measured <= layer_transient_bytes(layer, torch.float32, rows=rows)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_gguf_type_diffusers_dequantises_is_bounded(self, dtype: torch.dtype) -> None:
        from diffusers.quantizers.gguf.utils import dequantize_functions

        for kind in dequantize_functions:
            layer = _gguf_layer(kind, 64, 1024, dtype)
            measured = _beyond_output(layer, torch.randn(4, 1024, dtype=dtype))
            estimate = layer_transient_bytes(layer, dtype, rows=4)
            assert 64 * 1024 * 2 <= measured <= estimate, kind.name  # at least the fp16 result; never more


# ---- the plan against a measured streamed forward ---------------------------------------------------------
class _Pipe:
    """The transformer alone, as bench/files_bench.py hands it to the engine."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer, self.text_encoder, self.vae = transformer, None, None


@pytest.fixture(scope="module")
def transformers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """Builders of the tiny transformer from its files: dense fp32 (the control), fp8-scaled (upcast and fp8
    matmul), GGUF Q8_0 and Q4_0 (written at test time, loaded through the product's loader)."""
    from qwen_core.sources.comfy_files import SingleFilesSource
    from qwen_core.sources.configs import write_configs_folder

    root = tmp_path_factory.mktemp("layer-memory")
    comfy_models_dir(root, tiny_model_dir, transformer_fmt="fp32", te_fmt="fp32", vae_fmt="fp32")
    configs = write_configs_folder(tiny_model_dir, root / "configs")
    d = root / "diffusion_models"
    paths = {"fp32": d / "qwen_image_tiny_fp32.safetensors",
             "fp8-scaled": write_transformer(tiny_model_dir, d / "t_fp8s.safetensors", "fp8-scaled"),
             "Q8_0": write_gguf_transformer(tiny_model_dir, d / "t-Q8_0.gguf", "Q8_0"),
             "Q4_0": write_gguf_transformer(tiny_model_dir, d / "t-Q4_0.gguf", "Q4_0")}  # fmt: skip
    te = root / "text_encoders" / "qwen_2.5_vl_tiny_fp32.safetensors"
    vae = root / "vae" / "qwen_image_vae.safetensors"

    def build(kind: str) -> nn.Module:
        fmt, _, matmul = kind.partition("+")
        source = SingleFilesSource(paths[fmt], te, vae, configs=configs)
        transformer = source.build(torch.float32, source.light_components()).transformer
        if matmul:
            assert set_fp8_matmul(transformer, True) > 0
        return transformer

    return {"build": build}


def _inputs(model: nn.Module) -> dict[str, Any]:
    cfg, side = model.config, 4  # 64x64 pixels: 4x4 tokens
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(2, side * side, cfg.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(2, 8, cfg.joint_attention_dim, generator=g),
            "encoder_hidden_states_mask": None, "timestep": torch.full((2,), 0.5),
            "img_shapes": [[(1, side, side)]] * 2, "return_dict": False}


def _forward_peak(model: nn.Module) -> tuple[int, torch.Tensor]:
    kw = _inputs(model)
    with torch.no_grad(), AllocTracker() as t:
        out = model(**kw)[0]
    return t.peak, out


@pytest.fixture(scope="module")
def dense_activation_slope(transformers: dict[str, Any]) -> float:
    """GiB per megapixel of the dense model's forward: the memory model's "activations" entry, measured here."""
    peak, _ = _forward_peak(transformers["build"]("fp32"))
    return peak / GIB / (PIXELS / 1e6)


class TestPlannedWorkingSet:
    @pytest.mark.parametrize("kind", ["fp32", "fp8-scaled", "fp8-scaled+matmul", "Q8_0", "Q4_0"])
    @pytest.mark.parametrize("budget_gib", [1e-4, 100.0], ids=["all-streamed", "all-resident"])
    def test_a_streamed_forward_fits_what_the_plan_counts(self, transformers: dict[str, Any], kind: str,
                                                          budget_gib: float, dense_activation_slope: float) -> None:
        model = transformers["build"](kind)
        blocks = list(model.transformer_blocks)
        stored = [module_bytes(b) for b in blocks]
        nonblock = module_bytes(model) - sum(stored)
        _, ref = _forward_peak(model)
        pipe = _Pipe(model)
        handle = enable_streamed_offload(pipe, "cpu", budget_gib=budget_gib, max_pixels=PIXELS, num_slots=1,
                                         act_gib_per_mpix=dense_activation_slope, cfg_batching=False)
        try:
            plan, slots = handle.plan, list(handle.transformer.slots)
            held = nonblock + sum(stored[i] for i in plan.resident) + sum(
                s.staging.nbytes + (s.dequant.nbytes if s.dequant is not None else 0) for s in slots)
            peak, out = _forward_peak(model)
        finally:
            disable_streamed_offload(pipe)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        planned = (plan.nonblock_gib + len(plan.resident) * plan.block_gib + len(slots) * plan.slot_gib
                   + plan.reserve_gib - FIXED_OVERHEAD_GIB) * GIB
        assert held + peak <= planned, f"{kind}: {held} held + {peak} during the forward > {planned:.0f} planned"
        if kind == "fp32":  # dense: nothing beyond the activations, as before
            assert transient_bytes(model, torch.float32, rows=32) == 0

    def test_the_transient_is_what_lifts_the_peak(self, transformers: dict[str, Any],
                                                  dense_activation_slope: float) -> None:
        """On the tiny fp8 model the layers' own memory is a large part of the forward's peak: a plan without
        it (the one of 2026-12-02) is short by more than its slack."""
        peak, _ = _forward_peak(transformers["build"]("fp8-scaled"))
        dense = dense_activation_slope * GIB * PIXELS / 1e6
        assert peak > dense * 1.1


# ---- full-size plans on the meta device (no memory) -----------------------------------------------------------
def _full_size(kind: str) -> nn.Module:
    """Qwen-Image's transformer (diffusers' default config is the 20B model) on the meta device, its block
    Linear layers as an fp8 file (``Fp8WeightLinear``) or a GGUF file (``GGUFLinear``) load them."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.utils import logging as dlogging

    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = QwenImageTransformer2DModel().to(torch.bfloat16)
    finally:
        dlogging.set_verbosity(verbosity)
    if kind == "bf16":
        return model
    for block in model.transformer_blocks:
        for name, lin in list(block.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            parent, _, attr = name.rpartition(".")
            if kind.startswith("fp8"):
                new = Fp8WeightLinear(torch.empty(lin.weight.shape, dtype=E4M3, device="meta"),
                                      torch.empty((), device="meta"), lin.bias)
            else:
                new = _meta_gguf(kind, lin)
            setattr(block.get_submodule(parent), attr, new)
    if kind == "fp8+matmul":
        set_fp8_matmul(model, True)
    return model


def _meta_gguf(kind: str, lin: nn.Linear) -> nn.Module:
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    new = GGUFLinear(lin.in_features, lin.out_features, lin.bias is not None, compute_dtype=torch.bfloat16,
                     device="meta")
    new.weight = GGUFParameter(torch.empty(lin.out_features, lin.in_features // block * size, dtype=torch.uint8,
                                           device="meta"), quant_type=qtype)
    new.bias = lin.bias
    return new


class TestFullSizePlans:
    MOD = 3072 * 6 * 3072  # img_mod / txt_mod: the largest matrix of a block (3072 -> 18432)
    ROWS = 2 * (1328 * 1328 // 256)  # batched CFG at 1328x1328

    def test_bf16_plans_are_unchanged(self) -> None:
        model = _full_size("bf16")
        block = max(module_bytes(b) for b in model.transformer_blocks)
        nonblock = module_bytes(model) - 60 * block
        for budget in [b / 4 for b in range(16, 321)]:  # 4 .. 80 GiB
            new = plan_transformer(model, budget, max_pixels=1328 * 1328)
            old = plan_resident(60, block, nonblock, budget, max_pixels=1328 * 1328)
            assert (new.resident, new.reserve_gib, new.transient_gib) == (old.resident, old.reserve_gib, 0.0), budget
            assert abs(new.slot_gib - old.slot_gib) < 1e-4  # exact slot = the block + alignment padding

    @pytest.mark.parametrize("kind,transient", [
        ("fp8", MOD * 2 + 6 * 3072 * 2),  # one bf16 copy of img_mod's weight + its bias
        ("fp8+matmul", ROWS * 4 * 3072 * 3 + 3072 * 4 + 3072 * 2),  # the MLP's 12288-wide input: bf16 + fp8 copies
        ("Q8_0", int(MOD * 7.5) + 6 * 3072 * 2),  # diffusers' dequantisation of img_mod, fp32-measured bound
        ("Q4_K", int(MOD * 7.0) + 6 * 3072 * 2),
    ])  # fmt: skip
    def test_quantised_plans_reserve_the_largest_layer_and_fit(self, kind: str, transient: int) -> None:
        model = _full_size(kind)
        for budget in (10.0, 12.0, 14.0):  # the 12 and 16 GiB caps less the bench's 2 GiB margin
            plan = plan_transformer(model, budget, max_pixels=1328 * 1328)
            assert plan.transient_gib == pytest.approx(transient / GIB, rel=1e-6)
            held = plan.nonblock_gib + len(plan.resident) * plan.block_gib + 2 * plan.slot_gib
            assert held + plan.reserve_gib <= budget
            if plan.streamed:
                assert plan.slot_gib == pytest.approx(plan.block_gib, rel=1e-3)  # slots hold the stored bytes
            assert "inside one layer" in plan.summary()

    def test_fp8_storage_slot_of_an_fp8_file_is_its_stored_size(self) -> None:
        """fp8 storage re-quantises only bf16 matrices: an fp8 file's blocks sit in their slots as stored, not
        x1.5 as the bf16 formula said."""
        plan = plan_transformer(_full_size("fp8"), 12.0, max_pixels=1328 * 1328, fp8=True)
        assert plan.slot_gib == pytest.approx(plan.block_gib, rel=1e-3)
        bf16 = plan_transformer(_full_size("bf16"), 12.0, max_pixels=1328 * 1328, fp8=True)
        assert bf16.slot_gib == pytest.approx(1.5 * bf16.block_gib, rel=2e-3)  # + the per-row scales
