"""Which layers a LoRA may touch, and whether a LoRA fits them (named first bad key on a mismatch).

The layer shapes come from the real transformer when it is loaded, or from its config alone: the
transformer is built on the meta device (no memory, about a second for the 20 B model), so a LoRA for
another model is refused when the LoRA node runs, before 40 GB of weights are read.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from qwen_core.families import ModelFamily
from qwen_core.lora.files import LoraFile
from qwen_core.lora.spec import LoraError

Shapes = dict[str, tuple[int, int]]  # layer name -> (out_features, in_features)


def linear_shapes(transformer: nn.Module) -> Shapes:
    """Every linear layer (``nn.Linear``, or a swapped-in layer such as ``Fp8Linear`` with the same features)."""
    shapes: Shapes = {}
    for name, module in transformer.named_modules():
        out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if isinstance(out_f, int) and isinstance(in_f, int) and name:
            shapes[name] = (out_f, in_f)
    return shapes


def meta_shapes(family: ModelFamily, config: Mapping[str, Any]) -> Shapes:
    """Layer shapes of ``family``'s transformer built from ``config`` on the meta device (cached)."""
    return dict(_meta_shapes(family.key, json.dumps(dict(config), sort_keys=True, default=str)))


@functools.lru_cache(maxsize=4)
def _meta_shapes(family_key: str, config_json: str) -> tuple[tuple[str, tuple[int, int]], ...]:
    import diffusers
    from accelerate import init_empty_weights

    from qwen_core.families import get_family

    library, cls_name = get_family(family_key).components["transformer"]
    cls = getattr(diffusers, cls_name)  # from our own family table, never from a file
    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with init_empty_weights():
        model = cls.from_config(config)
    return tuple(linear_shapes(model).items())


def check_fits(lora: LoraFile, shapes: Shapes, model_name: str) -> None:
    """Raise ``LoraError`` naming the first layer of ``lora`` that ``shapes`` lacks or has another shape."""
    for layer, factors in lora.layers.items():
        key = lora.keys.get(layer, layer)
        target = shapes.get(layer)
        if target is None:
            read_as = f" (read as layer `{layer}`)" if key != layer else ""
            raise LoraError(f"{lora.path.name}: key `{key}`{read_as} is not a layer of {model_name}'s transformer: "
                            f"this LoRA is for another model ({lora.format} keys).",
                            fix=f"Use a LoRA trained for {model_name}.")
        out_f, in_f = target
        if factors.down.shape[1] != in_f or factors.up.shape[0] != out_f:
            got = f"{factors.up.shape[0]}x{factors.down.shape[1]}"
            raise LoraError(f"{lora.path.name}: key `{key}` changes layer `{layer}` as {got} (out x in), but the "
                            f"layer is {out_f}x{in_f}: this LoRA is for another model size.",
                            fix=f"Use a LoRA trained for {model_name}.")


def check_stack(specs: Any, family: ModelFamily, config: Mapping[str, Any] | None, model_name: str) -> list[LoraFile]:
    """Every LoRA of ``specs`` read from its header and checked against the transformer ``config`` describes
    (no weights needed). Without a config (a source that has none) only the files themselves are checked."""
    from qwen_core.lora.files import describe_file

    shapes = meta_shapes(family, config) if config else None
    described = []
    for spec in specs:
        lora = describe_file(spec.path, family)
        if shapes is not None:
            check_fits(lora, shapes, model_name)
        described.append(lora)
    return described
