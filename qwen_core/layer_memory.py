"""What a layer allocates while it computes, beyond its stored bytes and the activations a dense layer makes.

The streamed engine's activation reserve is the memory model's slope, measured on the bf16 model whose
``nn.Linear`` layers multiply with their stored weights. The layers of the user's own files do not:

- ``Fp8WeightLinear`` (ComfyUI's fp8 files) upcasts its fp8 weight to the compute dtype for every product: one
  full-size copy of the weight (plus the bias in the compute dtype). With ``fp8_matmul`` it quantises its input
  instead: a copy of the input in the compute dtype (the division by the row scales) beside its fp8 copy, so
  that part grows with the image (rows = tokens x batch);
- diffusers' ``GGUFLinear`` dequantises its blocks with torch code before the product: the result in fp16,
  its copy in the compute dtype and the intermediates of the unpacking (``GGUF_DEQUANT_BYTES``).

That memory lives only inside one layer's forward, so the engine reserves the largest such amount once,
beside the activations: for the full-size transformer in bf16 that is 72 MiB for an fp8 MLP matrix
(3072 x 12288), ~270 MiB for a Q8_0 one, ~480 MiB for the fp8-matmul input of the second MLP layer at
1328x1328 (batched CFG).
``tests/test_layer_memory.py`` measures every case on the CPU (a dispatch mode counting the bytes of the
tensors alive during a forward) and checks that these estimates bound it.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_core.sources.fp8_weights import Fp8WeightLinear

_E4M3 = getattr(torch, "float8_e4m3fn", None)

# Bytes alive per weight element while diffusers' torch code dequantises one GGUF matrix and casts it to the
# compute dtype (diffusers 0.42 ``dequantize_gguf_tensor`` + ``.to(compute_dtype)``), measured on the CPU with
# fp32 compute, the largest case (bf16 compute measured 0.8-2 bytes less), rounded up. With diffusers' CUDA
# kernels (``forward_cuda``) the product runs on the blocks and most of this is not allocated at all.
GGUF_DEQUANT_BYTES = {
    "Q4_0": 7.0, "Q4_1": 7.0, "Q8_0": 7.5, "Q2_K": 7.0, "Q3_K": 7.0, "Q4_K": 7.0, "Q6_K": 7.5, "Q5_K": 8.5,
    "Q5_0": 11.0, "Q5_1": 11.0, "BF16": 10.5, "IQ4_NL": 13.0, "IQ4_XS": 13.5,
}  # fmt: skip
GGUF_DEQUANT_BYTES_UNKNOWN = 14.0  # a type not measured here: more than any measured one


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _fp8_uses_matmul(layer: Fp8WeightLinear) -> bool:
    # Fp8WeightLinear.forward's own condition (the input's last dimension is in_features).
    return (layer.fp8_matmul and layer.weight.dtype == _E4M3 and layer.in_features % 16 == 0
            and layer.out_features % 16 == 0)


def _fp8_bytes(layer: Fp8WeightLinear, compute: torch.dtype, rows: int) -> int:
    size = _element_size(compute)
    bias = layer.bias.numel() * size if layer.bias is not None else 0
    if _fp8_uses_matmul(layer):
        # |x| (compute dtype), then x / scale (compute dtype) beside its fp8 copy; x itself is the caller's.
        return rows * layer.in_features * (size + 1) + layer.out_features * 4 + bias
    return layer.weight.numel() * size + bias  # weight.to(compute).mul_(scale): one copy


def _gguf_bytes(layer: nn.Module, compute: torch.dtype) -> int:
    weight = layer.weight
    quant = getattr(weight, "quant_type", None)
    bias = layer.bias.numel() * _element_size(compute) if getattr(layer, "bias", None) is not None else 0
    if quant is None:  # a dense weight in a GGUF layer: only the cast to the compute dtype
        return (weight.numel() * _element_size(compute) if weight.dtype != compute else 0) + bias
    name = getattr(quant, "name", str(quant))
    numel = 1
    for dim in getattr(weight, "quant_shape", weight.shape):
        numel *= int(dim)
    return int(numel * GGUF_DEQUANT_BYTES.get(name, GGUF_DEQUANT_BYTES_UNKNOWN)) + bias


def layer_transient_bytes(layer: nn.Module, compute: torch.dtype, rows: int) -> int:
    """Bytes ``layer``'s own forward allocates beyond its output (0 for dense layers). ``rows``: the number of
    input rows (tokens x batch) of the largest call, which only the fp8-matmul path depends on."""
    if isinstance(layer, Fp8WeightLinear):
        return _fp8_bytes(layer, compute, rows)
    if hasattr(layer, "compute_dtype") and isinstance(getattr(layer, "weight", None), torch.Tensor):
        return _gguf_bytes(layer, getattr(layer, "compute_dtype", None) or compute)  # diffusers' GGUFLinear
    return 0


def transient_bytes(module: nn.Module, compute: torch.dtype, rows: int) -> int:
    """The largest ``layer_transient_bytes`` among ``module``'s layers: what one forward needs on top of the
    dense model's activations, since layers run one at a time."""
    return max((layer_transient_bytes(m, compute, rows) for m in module.modules()), default=0)
