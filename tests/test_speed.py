"""qwen_core.speed: real-valued RoPE, speed options, the compile cache, regional compile, flash-attn 4 plumbing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qwen_core.cfg_batch import SplitTextAttnProcessor, install_split_attention, pad_and_stack, text_lengths
from qwen_core.errors import InvalidInputError
from qwen_core.options import ComputeChoice
from qwen_core.speed import attention, compile_cache
from qwen_core.speed.options import SpeedOptions, resolve_speed
from qwen_core.speed.rope import (
    apply_rope_real,
    install_real_rope,
    processor_class,
    real_rope_installed,
    remove_real_rope,
    to_real,
)


def _transformer(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from qwen_core.tiny_families import qwen_image_transformer as tiny

    t = tiny(seed).eval().to(dtype)
    with torch.no_grad():  # the tiny model's init is near-identity; make every block matter
        g = torch.Generator().manual_seed(seed)
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return t


def _forward(t: torch.nn.Module, side: int, lens: list[int], *, split: bool = True, seed: int = 1) -> torch.Tensor:
    """cond+uncond batched as qwen_core.cfg_batch issues it (split attention for different lengths)."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(t.parameters()).dtype
    hs = torch.randn(1, side * side, 16, generator=g).to(dtype)
    items = [(torch.randn(1, n, 16, generator=g).to(dtype), None) for n in lens]
    e, m = pad_and_stack(items)
    state = install_split_attention(t)
    lengths = text_lengths(items) if split and m is not None else None
    with torch.no_grad(), state.active(lengths):
        return t(hidden_states=torch.cat([hs] * len(lens)), encoder_hidden_states=e, encoder_hidden_states_mask=m,
                 timestep=torch.full((len(lens),), 0.5, dtype=dtype), img_shapes=[[(1, side, side)]] * len(lens),
                 attention_kwargs={"text_lengths": lengths} if lengths else None, return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class TestRealRope:
    def test_rotation_equals_the_complex_product(self):
        x = torch.randn(2, 5, 3, 8, dtype=torch.float64).float()
        angles = torch.rand(5, 4) * 6.28
        freqs = torch.polar(torch.ones_like(angles), angles)
        ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * freqs[None, :, None]).flatten(3)
        assert _rel(apply_rope_real(x, to_real(freqs)), ref) < 1e-6

    def test_table_must_be_complex_or_real_pairs(self):
        with pytest.raises(TypeError, match="rotary table"):
            to_real(torch.zeros(5, 4))

    @pytest.mark.parametrize("lens", [[7, 7], [9, 4], [3, 11]])
    def test_transformer_output_matches_diffusers_in_fp32(self, lens):
        t = _transformer()
        ref = _forward(t, 8, lens)
        install_real_rope(t)
        assert real_rope_installed(t)
        # Exact in float32: the same products in the same precision (measured: 0.0).
        assert _rel(_forward(t, 8, lens), ref) < 1e-6

    def test_bf16_within_rounding(self):
        t = _transformer(dtype=torch.bfloat16)
        ref = _forward(t, 8, [9, 4])
        install_real_rope(t)
        assert _rel(_forward(t, 8, [9, 4]), ref) < 1e-2

    def test_composes_with_the_split_wrapper_and_backend(self):
        t = _transformer()
        install_split_attention(t)
        t.set_attention_backend("_native_math")
        assert install_real_rope(t) == len(t.transformer_blocks)
        assert install_real_rope(t) == 0  # idempotent
        for block in t.transformer_blocks:
            outer = block.attn.processor
            assert isinstance(outer, SplitTextAttnProcessor) and isinstance(outer.inner, processor_class())
            assert outer.inner._attention_backend == "_native_math"
        t.set_attention_backend("native")  # still reaches the wrapped processor
        assert all(b.attn.processor.inner._attention_backend == "native" for b in t.transformer_blocks)
        remove_real_rope(t)
        assert not real_rope_installed(t)
        assert all(type(b.attn.processor.inner).__name__ == "QwenDoubleStreamAttnProcessor2_0"
                   for b in t.transformer_blocks)

    def test_blocks_get_real_tables_only_while_every_processor_is_ours(self):
        t = _transformer()
        install_real_rope(t)
        seen = []
        hook = t.transformer_blocks[0].register_forward_pre_hook(
            lambda _m, _a, kw: seen.append(kw["image_rotary_emb"][0].dtype), with_kwargs=True)
        _forward(t, 8, [7, 7])
        remove_real_rope(t)
        _forward(t, 8, [7, 7])
        hook.remove()
        assert seen == [torch.float32, torch.complex64]

    def test_a_transformer_with_real_rope_is_freed_without_a_garbage_collection(self):
        """Bug (H200 family run 4): the table hook's closure held the transformer it lives in, a cycle, so a
        released model's weights waited for the next garbage collection (the residency manager reported it)."""
        import gc
        import weakref

        t = _transformer()
        install_real_rope(t)
        ref = weakref.ref(t)
        gc.disable()
        try:
            del t
            assert ref() is None
        finally:
            gc.enable()


class TestSpeedOptions:
    @pytest.fixture(autouse=True)
    def _clean_env(self, monkeypatch):
        for name in ("QWEN_COMPILE", "QWEN_COMPUTE", "QWEN_COMPILE_DYNAMIC"):
            monkeypatch.delenv(name, raising=False)

    def test_compile_on_by_default_for_cuda_only(self):
        assert resolve_speed(device="cuda").compile and resolve_speed(device="cuda:1").compile
        assert not resolve_speed(device="cpu").compile

    def test_env_turns_it_off_or_on(self, monkeypatch):
        monkeypatch.setenv("QWEN_COMPILE", "0")
        assert not resolve_speed(device="cuda").compile
        monkeypatch.setenv("QWEN_COMPILE", "1")
        assert resolve_speed(device="cpu").compile
        assert not resolve_speed("off", device="cuda").compile  # the widget wins over the env

    def test_bad_env_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("QWEN_COMPILE", "maybe")
        with pytest.raises(InvalidInputError, match="QWEN_COMPILE"):
            resolve_speed(device="cuda")

    def test_compute_is_exact_unless_fp8_is_asked_for(self, monkeypatch):
        assert resolve_speed(device="cuda").compute is ComputeChoice.EXACT
        assert resolve_speed(compute_choice="fp8", device="cuda").compute is ComputeChoice.FP8
        monkeypatch.setenv("QWEN_COMPUTE", "fp8")
        assert resolve_speed(device="cuda").compute is ComputeChoice.FP8
        with pytest.raises(InvalidInputError, match="compute"):
            resolve_speed(compute_choice="int4")

    def test_fp8_on_cpu_stays_exact(self):
        from qwen_core.speed.apply import apply_speed

        class Pipe:
            transformer = _transformer()

        note = apply_speed(Pipe(), SpeedOptions(compute=ComputeChoice.FP8))
        assert "n/a" in note
        assert not any(type(m).__name__ == "Fp8Linear" for m in Pipe.transformer.modules())

    def test_loader_keys_differ_by_speed(self, tiny_model_dir):
        from qwen_core.loading import PipelineLoader

        a = PipelineLoader(tiny_model_dir, device="cpu", compile="off")
        b = PipelineLoader(tiny_model_dir, device="cpu", compile="on")
        c = PipelineLoader(tiny_model_dir, device="cpu", compile="off", compute="fp8")
        assert len({a.residency_key, b.residency_key, c.residency_key}) == 3
        assert b.plan.speed.compile and not a.plan.speed.compile


class TestCompileCache:
    @pytest.fixture(autouse=True)
    def _restore(self, monkeypatch, tmp_path):
        monkeypatch.setenv("QWEN_COMPILE_CACHE", str(tmp_path / "cc"))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        yield
        # monkeypatch restores TORCHINDUCTOR_CACHE_DIR; inductor re-reads it on its next lookup

    def test_keyed_folder_under_our_root(self, tmp_path):
        info = compile_cache.activate("cpu")
        assert info.ours and not info.warm
        assert info.path == tmp_path / "cc" / info.key
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(info.path)
        assert info.key.startswith(f"torch{torch.__version__}".replace("+", "+")) and "py" in info.key

    def test_marker_makes_the_next_activation_warm_atomically(self):
        info = compile_cache.activate("cpu")
        compile_cache.mark_warm(info, 12.5, "test")
        assert compile_cache.activate("cpu").warm
        assert [p.name for p in info.path.iterdir() if p.name.startswith(".marker-")] == []  # no temp file left

    def test_a_users_inductor_dir_is_respected(self, monkeypatch, tmp_path):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
        info = compile_cache.activate("cpu")
        assert not info.ours and info.path == tmp_path / "mine"
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")

    def test_qwen_home_is_the_fallback_root(self, monkeypatch, tmp_path):
        monkeypatch.delenv("QWEN_COMPILE_CACHE")
        monkeypatch.setenv("QWEN_HOME", str(tmp_path / "home"))
        assert compile_cache.cache_root() == tmp_path / "home" / "compile_cache"


@pytest.mark.slow
class TestRegionalCompile:
    """Inductor on the CPU (gcc): one compile of the tiny transformer serves every size and prompt length."""

    def test_one_graph_for_sizes_and_lengths(self, monkeypatch, tmp_path):
        from torch._dynamo.utils import counters

        from qwen_core.speed.compile import compile_blocks, compile_handle, uncompile_blocks

        monkeypatch.setenv("QWEN_COMPILE_CACHE", str(tmp_path / "cc"))
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        torch._dynamo.reset()
        t = _transformer()
        install_real_rope(t)
        eager = _forward(t, 8, [9, 4])
        messages: list[str] = []
        compile_blocks(t, notify=messages.append)
        try:
            assert _rel(_forward(t, 8, [9, 4]), eager) < 1e-5
            graphs = counters["stats"]["unique_graphs"]
            for side, lens in ((12, [6, 11]), (6, [20, 3]), (10, [5, 13])):
                _forward(t, side, lens)
            assert counters["stats"]["unique_graphs"] == graphs  # no recompile
            assert "compiling the transformer blocks" in messages[0] and "took" in messages[1]
            assert compile_cache.activate("cpu").warm and 2 in compile_handle(t).first_calls
        finally:
            uncompile_blocks(t)
            torch._dynamo.reset()
        assert all("forward" not in b.__dict__ for b in t.transformer_blocks)


class ClassCheckingProcessor:
    """Delegates to the processor it wraps after a class identity check (a guard dynamo cannot save)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __call__(self, attn: torch.nn.Module, *args: object, **kwargs: object) -> object:
        from diffusers.models.normalization import RMSNorm

        if type(attn.norm_q) is not RMSNorm:
            raise TypeError("expected diffusers' RMSNorm")
        return self.inner(attn, *args, **kwargs)


_COLD_START = """
import json, sys
import torch
from torch._dynamo.utils import counters
sys.path.insert(0, sys.argv[1])
from test_speed import _forward, _transformer
from qwen_core.speed import attention
from qwen_core.speed.apply import apply_attention_kernel
from qwen_core.speed.compile import compile_blocks
from qwen_core.speed.rope import install_real_rope, set_fused_kernels


def half_attention(q, k, v, softmax_scale=None, causal=False):  # a stand-in kernel whose output is told apart
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2) * 0.5, None


def rel(out, expected):
    return float((out - expected).norm() / expected.norm())


attention.set_kernel(half_attention)
ref = _transformer()
install_real_rope(ref)
t = _transformer()
install_real_rope(t)
set_fused_kernels(t, True)  # as apply_speed does: the fused ops' custom op and module go through the saved trace
handle = compile_blocks(t, notify=lambda _m: None)
result = {"rel": rel(_forward(t, 8, [9, 4]), _forward(ref, 8, [9, 4])),
          "traced_graphs": counters["stats"].get("unique_graphs", 0),
          "kernel_calls_loaded": counters["inductor"].get("extern_calls", 0),
          "precompile": all(f.precompile for f in handle.forwards),
          "switch_left_on": bool(torch._dynamo.config.caching_precompile)}
# The kernel switches after compiling (the NaN fallback makes one): each must run its own graph. In the process
# that loaded the saved traces only (one compile fewer): a new compile there, and its guards kept.
for kernel in ("flash4", "native") if sys.argv[2] == "switch" else ():
    apply_attention_kernel(t, kernel)
    apply_attention_kernel(ref, kernel)
    result[f"rel_after_{kernel}"] = rel(_forward(t, 8, [9, 4]), _forward(ref, 8, [9, 4]))
print(json.dumps(result))
"""


@pytest.mark.slow
class TestColdStartWithWarmCache:
    """Dynamo's own cache (precompile) in our keyed folder: a second process runs the compiled blocks without
    tracing them again (the 14 s of a cold start on an H200; bench/RESULTS.md)."""

    def _run(self, cache: Path, switch: str = "", **env: str) -> dict:
        import json
        import os
        import subprocess
        import sys

        full_env = {**os.environ, "QWEN_COMPILE_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "", **env}
        full_env.pop("TORCHINDUCTOR_CACHE_DIR", None)
        done = subprocess.run([sys.executable, "-c", _COLD_START, str(Path(__file__).parent), switch], env=full_env,
                              capture_output=True, text=True, timeout=900, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def test_second_process_does_not_trace_again(self, tmp_path):
        first = self._run(tmp_path / "cc", QWEN_COMPILE_PRECOMPILE="1")
        second = self._run(tmp_path / "cc", "switch", QWEN_COMPILE_PRECOMPILE="1")
        assert first["precompile"] and first["traced_graphs"] >= 1 and first["rel"] < 1e-5
        assert any((tmp_path / "cc").rglob(compile_cache.ARTIFACTS))  # the saved traces
        assert second["traced_graphs"] == 0 and second["rel"] < 1e-5  # loaded, not traced, and still exact
        # One saved trace for both blocks, loaded once (a compiled wrapper per block saved one per block: an H200
        # loaded 60 in 21 s), and dynamo's process-wide switch is back off outside our calls.
        assert second["kernel_calls_loaded"] == first["kernel_calls_loaded"] > 0
        assert not first["switch_left_on"] and not second["switch_left_on"]
        # Bugs: with the kernel object on the processor, the saved cache failed to pickle it (the switch to
        # flash-attn 4 raised) or dropped its guard (the switch back to SDPA ran the flash graph: 0.22 off); and
        # a new compile after loading took a global name the loaded trace held ("already exists in scope").
        assert second["rel_after_flash4"] < 1e-5 and second["rel_after_native"] < 1e-5, second

    @pytest.mark.parametrize("case", ["local_class", "class_check"])
    def test_a_graph_the_dynamo_cache_cannot_store_compiles_without_it(self, monkeypatch, tmp_path, case):
        """Two graphs dynamo cannot save: one holding a class defined inside a function (a user's attention
        processor, say; dynamo refuses it), and one with a class identity check in the traced code (a guard it
        cannot store: torch drops the trace, then asserts "guards_state must not be None"; the first fused q/k
        kernel did this on the H200). The first call falls back to a plain compile, says so, and gives the exact
        image."""
        from qwen_core.speed.compile import compile_blocks, uncompile_blocks

        monkeypatch.setenv("QWEN_COMPILE_CACHE", str(tmp_path / "cc"))
        monkeypatch.delenv(compile_cache.PRECOMPILE_ENV, raising=False)
        if not compile_cache.precompile_wanted():
            pytest.skip(f"torch {torch.__version__} has no dynamo cache")
        torch._dynamo.reset()

        def wrapping_processor() -> type:
            class LocalProcessor:  # defined in a function: dynamo cannot save it by name
                def __init__(self, inner: object) -> None:
                    self.inner = inner

                def __call__(self, *args: object, **kwargs: object) -> object:
                    return self.inner(*args, **kwargs)

            return LocalProcessor

        wrapper, said = {"local_class": (wrapping_processor(), "LocalProcessor"),
                         "class_check": (ClassCheckingProcessor, "AssertionError")}[case]
        t = _transformer()
        for block in t.transformer_blocks:
            block.attn.processor = wrapper(block.attn.processor)
        eager = _forward(t, 8, [9, 4], split=False)
        messages: list[str] = []
        handle = compile_blocks(t, notify=messages.append)
        try:
            assert _rel(_forward(t, 8, [9, 4], split=False), eager) < 1e-5
            assert not handle.forwards[0].precompile
            assert any("compiling without it" in m and said in m for m in messages), messages
            assert _rel(_forward(t, 8, [9, 4], split=False), eager) < 1e-5  # and the next call runs as usual
        finally:
            uncompile_blocks(t)
            torch._dynamo.reset()

    def test_a_compile_without_our_cache_takes_up_no_saved_trace(self, monkeypatch, tmp_path):
        """The benchmarks of other compile settings (bench/speed_sections.py): with the dynamo cache, a new
        compile of the same forward in the process took up the first one's trace whatever its settings (the
        H200's variants "compiled" in 0.7 s). ``use_cache=False`` compiles for real."""
        from torch._dynamo.utils import counters

        from qwen_core.speed.compile import compile_blocks, uncompile_blocks

        monkeypatch.setenv("QWEN_COMPILE_CACHE", str(tmp_path / "cc"))
        monkeypatch.delenv(compile_cache.PRECOMPILE_ENV, raising=False)
        if not compile_cache.precompile_wanted():
            pytest.skip(f"torch {torch.__version__} has no dynamo cache")
        torch._dynamo.reset()
        t = _transformer()
        install_real_rope(t)
        try:
            first = compile_blocks(t, notify=lambda _m: None)
            _forward(t, 8, [9, 4])
            assert first.forwards[0].precompile
            uncompile_blocks(t)
            torch._dynamo.reset()  # as the benchmark does between settings; the saved trace stays in memory
            traced = counters["stats"]["unique_graphs"]
            plain = compile_blocks(t, notify=lambda _m: None, use_cache=False)
            _forward(t, 8, [9, 4])
            assert not plain.forwards[0].precompile and plain.cache is None
            assert counters["stats"]["unique_graphs"] == traced + 1  # traced again, not taken up
        finally:
            uncompile_blocks(t)
            torch._dynamo.reset()

    def test_a_damaged_artifacts_file_costs_a_compile_not_the_image(self, monkeypatch, tmp_path, caplog):
        monkeypatch.setattr(compile_cache, "_loaded_artifacts", set())
        (tmp_path / compile_cache.ARTIFACTS).write_bytes(b"not torch's artifacts")
        assert compile_cache.load_artifacts(tmp_path) is False
        assert "could not be loaded" in caplog.text
        assert compile_cache.load_artifacts(tmp_path) is False  # tried once per process, not again

    @pytest.mark.parametrize(("value", "wanted"), [(None, True), ("0", False), ("off", False), ("1", True)])
    def test_the_switch_is_on_by_default(self, monkeypatch, value, wanted):
        if value is None:
            monkeypatch.delenv(compile_cache.PRECOMPILE_ENV, raising=False)
        else:
            monkeypatch.setenv(compile_cache.PRECOMPILE_ENV, value)
        assert compile_cache.precompile_wanted() is wanted

    def test_the_switch_is_ignored_where_saved_guards_do_not_load(self, monkeypatch, caplog):
        """A torch whose saved traces do not load back (H200, torch 2.11, before the repair below: the next
        process's first image failed) gets no precompile; said once."""
        import logging

        monkeypatch.setenv(compile_cache.PRECOMPILE_ENV, "1")
        monkeypatch.setattr(compile_cache, "repair_guard_pickling", lambda: False)
        monkeypatch.setattr(compile_cache, "_guards_round_trip", None)
        monkeypatch.setattr(compile_cache, "_precompile_refusal_logged", False)
        with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
            assert compile_cache.precompile_wanted() is False
            assert compile_cache.precompile_wanted() is False
        lines = [r.getMessage() for r in caplog.records if compile_cache.PRECOMPILE_ENV in r.getMessage()]
        assert len(lines) == 1 and "do not load back" in lines[0] and torch.__version__ in lines[0], lines

    def test_the_repair_makes_torch_211s_defaults_guard_load_back(self, monkeypatch):
        """torch 2.11's reducer of DefaultsSource: every dataclass field, two of which its constructor does not
        take (the TypeError of the H200 run). The repair passes the constructor's fields; 2.14 needs none."""
        import dataclasses
        import pickle

        from torch._dynamo.source import DefaultsSource, LocalSource

        def torch_211_reducer(self):
            return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

        guard = DefaultsSource(LocalSource("x"), 0)
        assert compile_cache.repair_guard_pickling() is True  # this torch: nothing to repair
        assert pickle.loads(pickle.dumps(guard)) == guard
        monkeypatch.setattr(DefaultsSource, "__reduce__", torch_211_reducer)
        with pytest.raises(TypeError):
            pickle.loads(pickle.dumps(guard))
        assert compile_cache.repair_guard_pickling() is True
        assert pickle.loads(pickle.dumps(guard)) == guard


class TestCompileHandleLifetime:
    def test_a_compiled_transformer_is_collected_when_dropped(self, monkeypatch, tmp_path):
        """Bug: the handle (a value of a weak-key table keyed by the transformer) held the transformer, so a
        released model compiled on the GPU (the default path) kept its weights forever."""
        import gc
        import weakref

        from qwen_core.speed.compile import compile_blocks

        monkeypatch.setenv("QWEN_COMPILE_CACHE", str(tmp_path / "cc"))
        t = _transformer()
        handle = compile_blocks(t, notify=lambda _m: None)  # installs only: nothing compiles before a call
        ref = weakref.ref(t)
        del t
        gc.collect()
        assert ref() is None and handle.transformer is None
        handle.remove()  # harmless once the transformer is gone


class TestFlash4Plumbing:
    """The flash-attn 4 route with a stand-in kernel (SDPA): selection, probe, routing, fallback."""

    @pytest.fixture
    def fake_kernel(self):
        calls = []

        def kernel(q, k, v, softmax_scale=None, causal=False):
            calls.append(q.shape)
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2))
            return out.transpose(1, 2), None

        attention.set_kernel(kernel)
        yield calls
        attention.set_kernel(None)

    def test_auto_prefers_it_on_sm90_when_the_probe_passes(self, monkeypatch, fake_kernel):
        from qwen_core import devices

        monkeypatch.setattr(attention, "status", lambda: ("4.0.0b36", ""))
        monkeypatch.setattr(attention, "probe", lambda d, t: None)
        backend, why = devices.get_attention_implementation("cuda", torch.bfloat16, compute_capability=(9, 0))
        assert backend == "flash4" and "passed the probe" in why
        backend, why = devices.get_attention_implementation("cuda", torch.bfloat16, compute_capability=(8, 9))
        assert backend != "flash4"
        backend, why = devices.get_attention_implementation("cuda", torch.bfloat16, "flash4", compute_capability=(8, 9))
        assert backend == "native" and "compute capability >= 9.0" in why

    def test_not_installed_keeps_sdpa(self, monkeypatch):
        from qwen_core import devices

        monkeypatch.setattr(attention, "status", lambda: (None, "flash-attn 4 is not installed"))
        backend, why = devices.get_attention_implementation("cuda", torch.bfloat16, "flash4", compute_capability=(9, 0))
        assert backend == "native" and "not installed" in why

    def test_probe_compares_with_sdpa(self, fake_kernel):
        assert attention.probe("cpu", torch.float32) is None
        attention.set_kernel(lambda q, k, v, **kw: torch.full_like(q, float("nan")))
        assert "NaN" in attention.probe("cpu", torch.float32)

    def test_routes_unmasked_attention_and_switches_back(self, fake_kernel):
        from qwen_core.load_policy import apply_attention

        t = _transformer()

        class Pipe:
            transformer = t

        ref = _forward(t, 8, [7, 7])
        assert apply_attention(Pipe(), "flash4") == "flash4"
        out = _forward(t, 8, [7, 7])
        assert fake_kernel and _rel(out, ref) < 1e-5
        fake_kernel.clear()
        _forward(t, 8, [9, 4], split=False)  # a padding mask goes through diffusers' dispatcher
        assert fake_kernel == []
        assert apply_attention(Pipe(), "native") == "native"  # the NaN fallback's switch
        _forward(t, 8, [7, 7])
        assert fake_kernel == []


class TestRealRopeOnlyWhenCompiling:
    """Regression (H200 run 2026-12-02): the fp32 real RoPE made the eager path 8% slower than diffusers' own
    (660.7 vs 609.2 ms/step); it pays only under compile, so eager keeps diffusers' processor."""

    def test_eager_keeps_diffusers_processor_and_compile_installs_ours(self, monkeypatch):
        from qwen_core.speed import apply as speed_apply
        from qwen_core.speed.apply import apply_speed

        monkeypatch.setattr(speed_apply, "compile_blocks", lambda transformer, **kwargs: None)

        class Pipe:
            transformer = _transformer()

        apply_speed(Pipe(), SpeedOptions(compile=False))
        assert not real_rope_installed(Pipe.transformer)
        assert "compiled" in apply_speed(Pipe(), SpeedOptions(compile=True))
        assert real_rope_installed(Pipe.transformer)
