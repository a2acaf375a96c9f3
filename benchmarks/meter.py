"""The meter of the real-size benchmarks: networks built on the meta device (no weight is allocated),
one forward's FLOPs under ``FlopCounterMode`` with attention fused as on a GPU, the peak of its live
activation bytes, and the formatting of bytes and FLOPs."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

GIB = 1024**3
BF16 = torch.bfloat16


def meta(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    """An input of ``shape`` with no data: its forward counts FLOPs and bytes, never computes."""
    return torch.empty(*shape, device="meta", dtype=dtype)


def meta_ids(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, device="meta", dtype=torch.long)


def causal_mask(length: int) -> torch.Tensor:
    """A ready 4-d mask: transformers uses it as given (building one from position ids on meta
    would read tensor values to look for packed sequences)."""
    return torch.ones(1, 1, length, length, device="meta", dtype=torch.bool)


def build(factory: Callable[[], nn.Module], dtype: torch.dtype = BF16) -> nn.Module:
    """The module ``factory`` makes, built on the meta device (shapes only), cast to ``dtype``, frozen in
    eval mode."""
    with torch.device("meta"):
        module = factory()
    return module.to(dtype).eval().requires_grad_(False)


class FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` on 4-d inputs to the fused (memory-efficient)
    kernel, as a GPU runs it: FlopCounterMode then counts it with its attention formula, and the
    score matrix never exists (on meta, SDPA would otherwise take the unfused math path)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self._fused(func, args, kwargs)

    @staticmethod
    def _fused(func, args, kwargs):
        def bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
            return query, key, value, attn_mask, is_causal, scale

        query, key, value, mask, is_causal, scale = bind(*args, **kwargs)
        if query.dim() != 4:
            return func(*args, **kwargs)
        heads = query.shape[1]
        if key.shape[1] != heads:  # grouped-query attention: the kernel reads shared heads
            key, value = (
                t.as_strided((t.shape[0], heads, *t.shape[2:]), (t.stride(0), 0, *t.stride()[2:]))
                for t in (key, value)
            )
        bias = None
        if mask is not None:
            bias = mask if mask.dtype != torch.bool else torch.zeros_like(mask, dtype=query.dtype)
            bias = bias.expand(query.shape[0], heads, query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, False, 0.0, bool(is_causal), scale=scale
        )[0]


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of tensors created during a forward that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.seen: set[int] = set()
        self.current = 0
        self.peak = 0

    def _release(self, tensor_id: int, storage: int) -> None:
        self.seen.discard(tensor_id)
        self.refs[storage] -= 1
        if self.refs[storage] == 0:
            del self.refs[storage]
            self.current -= self.sizes.pop(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in self.seen:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.refs:
                self.refs[key] = 0
                self.sizes[key] = storage.nbytes()
                self.current += self.sizes[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            self.seen.add(id(t))
            weakref.finalize(t, self._release, id(t), key)
        return out


@dataclass
class Cost:
    flops: int
    activation_bytes: int


def measure(fn: Callable[[], object]) -> Cost:
    """FLOPs and peak live activation bytes of ``fn`` (a forward on meta tensors)."""
    tracker = LiveBytes()
    with torch.no_grad(), FusedAttention(), FlopCounterMode(display=False) as counter, tracker:
        fn()
    return Cost(counter.get_total_flops(), tracker.peak)


def weight_bytes(params: int, quantizable: int = 0, precision: str = "bf16") -> float:
    """Bytes of weights: bf16 / fp32 for all; int8 / nf4 store ``quantizable`` (linear weight)
    parameters at 1 / 0.5 byte and the rest in bf16 (scales and absmax blocks not included)."""
    per_quantized = {"bf16": 2.0, "fp32": 4.0, "int8": 1.0, "nf4": 0.5}[precision]
    rest = 4.0 if precision == "fp32" else 2.0
    return quantizable * per_quantized + (params - quantizable) * rest


def gib(n: float, digits: int = 2) -> str:
    return f"{n / GIB:.{digits}f}"


def tflops(flops: float) -> str:
    return f"{flops / 1e12:,.3f}"
