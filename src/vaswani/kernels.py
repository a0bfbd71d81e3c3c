"""Linear layers on prepacked weights, for decoding on a CPU.

A decoding step multiplies a few rows (one token per sentence or beam) by every weight matrix of the decoder
and by the output projection. At that size a CPU matrix multiplication spends much of its time re-arranging
the weight into the blocked layout its kernel reads, and does so again on every call. oneMKL (fp32) and
oneDNN (bf16) can pack a weight once and multiply by the packed copy many times; torch.compile's CPU
backend does the same with frozen weights. Inside `prepacked`, the linear layers of the given modules pack
their weights on first use and drop the packed copies on exit, so `generate` pays the packing once per call
and no memory stays behind.

Inside the block a packed layer computes the same function as `F.linear`, in the same precision: fp32 with
oneMKL when no autocast is active, bf16 with oneDNN under CPU autocast to bf16 (as autocast's own bf16
linear) or when the weights are bf16. It falls back to `F.linear` whenever the packed kernel would not
compute exactly that: gradients enabled, a tensor off the CPU, another dtype or autocast state than the one
packed for, a weight changed in place since it was packed, or a call with another number of rows than packed
for (the prompt of a language model, the encoder output projected once for cross-attention). Where the
kernels are missing (a torch without oneMKL, or a CPU without bf16 support in oneDNN), nothing is packed
and every call is a plain `F.linear`; `prepacking_available` tells which.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Below this many rows a step gains too little to repay the packing (measured in docs/PERFORMANCE.md).
MIN_ROWS = 4


def prepacking_available(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can multiply by prepacked weights in `dtype` (fp32 or bf16)."""
    if dtype == torch.float32:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    if dtype == torch.bfloat16:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
    return False


def _compute_dtype(weight_dtype: torch.dtype, input_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype F.linear multiplies in here and now: autocast's under CPU autocast, else the weight's (the
    input's must then be the same). None: a case the packed kernels do not cover."""
    covered = (torch.float32, torch.bfloat16)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        covers = dtype == torch.bfloat16 and weight_dtype in covered and input_dtype in covered
        return dtype if covers else None
    return weight_dtype if weight_dtype in covered and input_dtype == weight_dtype else None


class PackedLinear:
    """One weight (and bias) packed for `rows`-row multiplications in `dtype`; call it as F.linear."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int, dtype: torch.dtype) -> None:
        self.weight, self.bias, self.rows, self.dtype = weight, bias, rows, dtype
        self.versions = self._versions()
        with torch.no_grad():
            if dtype == torch.float32:
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
                self.packed_bias = None if bias is None else bias.detach()
            else:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows)
                self.packed_bias = None if bias is None else bias.detach().to(dtype)

    def _versions(self) -> tuple[int, int]:
        """In-place changes since packing (an optimizer step, load_state_dict) make the packed copy stale."""
        return self.weight._version, -1 if self.bias is None else self.bias._version

    def applies_to(self, x: Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.numel() == self.rows * x.size(-1)
            and self._versions() == self.versions
            and _compute_dtype(self.weight.dtype, x.dtype) == self.dtype
        )

    def __call__(self, x: Tensor) -> Tensor:
        if self.dtype == torch.float32:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.packed_bias, self.rows)
        return torch.ops.mkldnn._linear_pointwise(
            x.to(self.dtype), self.packed, self.packed_bias, "none", [], ""
        )


def pack(weight: Tensor, bias: Tensor | None, rows: int) -> PackedLinear | None:
    """A PackedLinear for multiplying `rows` rows by `weight` in the current autocast state, or None where
    the kernels do not apply (not a CPU tensor, an uncovered dtype, too few rows, kernels missing)."""
    if weight.device.type != "cpu" or rows < MIN_ROWS:
        return None
    dtype = _compute_dtype(weight.dtype, weight.dtype)  # inputs come in the weight's dtype (or autocast's)
    if dtype is None or not prepacking_available(dtype):
        return None
    return PackedLinear(weight, bias, rows, dtype)


def _packed_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add: rows x in_features x out_features."""
    return 2 * math.prod(x_shape) * out_shape[-1]


def flop_formulas() -> dict:
    """The packed kernels' FLOPs, for torch.utils.flop_counter.FlopCounterMode(custom_mapping=...): its own
    table knows only the aten matmuls."""
    ops = [torch.ops.mkl._mkl_linear] if prepacking_available(torch.float32) else []
    if prepacking_available(torch.bfloat16):
        ops.append(torch.ops.mkldnn._linear_pointwise)
    return dict.fromkeys(ops, _packed_linear_flops)


class PackedWeights:
    """The packed copies of one module's weights for `rows`-row inputs, each made on its first use in that
    shape (so a weight that decoding never multiplies at `rows` rows, such as cross-attention's key and
    value projection, is never packed)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.packed: dict[str, PackedLinear | None] = {}

    def linear(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if name not in self.packed:
            if x.numel() != self.rows * x.size(-1) or torch.is_grad_enabled():
                return F.linear(x, weight, bias)
            self.packed[name] = pack(weight, bias, self.rows)
        packed = self.packed[name]
        if packed is not None and packed.applies_to(x):
            return packed(x)
        return F.linear(x, weight, bias)


def linear(packs: PackedWeights | None, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), by the packed copy of `weight` (`name` within `packs`) where that computes
    the same; `packs` None (outside `prepacked`): F.linear."""
    if packs is None:
        return F.linear(x, weight, bias)
    return packs.linear(name, x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) that multiplies by a prepacked copy of its weight
    inside `prepacked`, where that computes the same function."""

    packs: PackedWeights | None = None

    def prepack(self, rows: int) -> None:
        self.packs = PackedWeights(rows)

    def unpack(self) -> None:
        self.packs = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.packs, "weight", x, self.weight, self.bias)


@contextmanager
def prepacked(modules: Iterable[nn.Module], rows: int) -> Iterator[None]:
    """Within the block, the linear layers of `modules` (and of their submodules) multiply `rows`-row inputs
    by packed copies of their weights, each packed on first use; the copies are dropped on exit.

    Modules take part by having `prepack(rows)` and `unpack()` methods (`Linear`, `MultiHeadAttention`).
    With fewer than MIN_ROWS rows nothing is packed."""
    if rows < MIN_ROWS:
        yield
        return
    targets = [
        m
        for module in modules
        for m in module.modules()
        if callable(getattr(m, "prepack", None)) and callable(getattr(m, "unpack", None))
    ]
    try:
        for module in targets:
            module.prepack(rows)
        yield
    finally:
        for module in targets:
            module.unpack()
