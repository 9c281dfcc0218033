"""The core rebuild's seams: the model-family table, typed pipeline state, and the one model-switch sequence."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qwen_core import families
from qwen_core.errors import InvalidInputError, ModelLoadError
from qwen_core.memory import ResidencyManager, get_residency_manager, switch_model
from qwen_core.pipeline_state import peek_state, state_of

ROOT = Path(__file__).resolve().parents[1]


class TestFamilies:
    def test_qwen_image_is_described_by_its_classes_and_card_defaults(self):
        family = families.get_family("qwen-image")
        assert family.pipeline_class == "QwenImagePipeline"
        assert family.components["transformer"] == ("diffusers", "QwenImageTransformer2DModel")
        assert family.weighted_components == ("transformer", "text_encoder", "vae")
        assert (family.default_width, family.default_height, family.default_steps) == (1328, 1328, 50)
        assert families.family_for_repo("qwen/qwen-image-2512") is family

    def test_unknown_family_names_the_known_ones(self):
        with pytest.raises(InvalidInputError, match="`family`.*'flux'.*qwen-image"):
            families.get_family("flux")

    def test_image_count_rules(self):
        assert families.QWEN_IMAGE.check_image_count(0) is None
        assert "no input image" in families.QWEN_IMAGE.check_image_count(1)
        edit = families.ModelFamily("e", "Edit", "X", {}, families.TextEncoderKind.QWEN2_5_VL,
                                    image_inputs=families.ImageInputs(1, 3))
        assert [edit.check_image_count(n) is None for n in range(5)] == [False, True, True, True, False]


class TestNoAttributesOnForeignObjects:
    def test_qwen_core_sets_no_private_attribute_on_other_objects(self):
        """Regression (core rebuild): five `_qwen_*` attributes were stuck on diffusers objects."""
        offenders = []
        for path in (ROOT / "qwen_core").rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_qwen"):
                        offenders.append(f"{path.name}:{node.lineno} .{target.attr}")
                if (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("setattr", "getattr")
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                        and str(node.args[1].value).startswith("_qwen")):
                    offenders.append(f"{path.name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
        assert offenders == []

    @pytest.mark.slow
    def test_loaded_pipeline_state_lives_in_pipeline_state(self, tiny_model_dir):
        from qwen_core.loading import PipelineLoader

        get_residency_manager().release_all()
        loader = PipelineLoader(tiny_model_dir, device="cpu")
        pipe = loader.load()
        try:
            state = peek_state(pipe)
            assert state is not None and state.load_plan == loader.plan and state.placement == loader.placement
            assert state.attention_backend == loader.attention_backend
            assert not [name for name in vars(pipe) if name.startswith("_qwen")]
            # A second handle on the same model reads the plan from the state, not from the pipeline object.
            again = PipelineLoader(tiny_model_dir, device="cpu")
            assert again.load() is pipe and again.placement == loader.placement
        finally:
            loader.unload()

    def test_state_is_created_once_and_dies_with_the_object(self):
        import gc

        from qwen_core import pipeline_state

        class Thing:
            pass

        thing = Thing()
        assert peek_state(thing) is None
        assert state_of(thing) is state_of(thing)
        held = len(pipeline_state._states)
        del thing
        gc.collect()
        assert len(pipeline_state._states) == held - 1  # held weakly: a released pipeline takes its state along


class TestOneSwitch:
    def test_switch_releases_the_old_key_then_loads(self):
        manager = ResidencyManager(2, settle_s=0.0, release=lambda obj, settle_s: None)
        manager.acquire("a", lambda: object())
        loaded = []
        report = manager.switch(lambda: ["a"] if manager.release("a") else [], lambda: loaded.append(1))
        assert report.released_keys == ["a"] and loaded == [1] and "a" not in manager
        assert report.before is not None and report.released is not None and report.after is not None

    def test_acquire_goes_through_the_same_sequence(self):
        manager = ResidencyManager(1, settle_s=0.0, release=lambda obj, settle_s: None)
        manager.acquire("a", lambda: object())
        manager.acquire("b", lambda: object())
        assert manager.last_switch is not None and manager.last_switch.released_keys == ["a"]
        assert manager.resident_keys() == ["b"]

    def test_failed_load_propagates_with_the_report_error_and_nothing_resident(self):
        manager = get_residency_manager()
        manager.release_all()

        def boom() -> None:
            manager.acquire("broken", lambda: (_ for _ in ()).throw(RuntimeError("disk gone")))

        with pytest.raises(ModelLoadError, match="disk gone"):
            switch_model(None, boom)
        assert manager.resident_keys() == [] and "disk gone" in (manager.last_switch.error or "")
