"""Four costs a CPU training step pays that `Trainer` leaves alone (measured in bench/NOTES.md):

- Dropout masks. torch draws them one Mersenne-Twister number per element on one thread, about 20 ns each: 16% of
  a MiniLM step on 2 cores. `FastDropout` takes 16 random bits per element from numpy's SFC64 (the fastest of
  numpy's generators here, twice PCG64) at several times the speed; the keep probability is the same to 1/65,536,
  and each mask's seed is drawn from torch's generator, so `set_seed` and resuming from a checkpoint (which
  restores that generator) reproduce the run.
- Activations composed of Python operations: GPT-2's `gelu_new` is six elementwise passes forward and more backward
  (15% of a GPT-2-small step); torch's fused `gelu(approximate="tanh")` computes the same function in one.
- Page faults. glibc serves allocations above its mmap threshold (32 MB at most) with fresh pages from the kernel and
  returns them on free, so a tensor as large as MiniLM's embedding gradient (47 MB) is faulted in again every step.
  Raising the threshold keeps freed memory in the heap for the next step.
- LoRA's sum. peft adds `B(A(x)) * scaling` to the frozen layer's output in three passes over a (tokens x outputs)
  tensor as large as the layer's own; `lora_addmm_forward` does it in the low-rank GEMM's accumulate (4% of a
  GPT-2-small LoRA step).

`apply` does all four for a model trained on the CPU (on GPUs torch's dropout is fused and fast).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers.activations import GELUTanh, NewGELUActivation

ATTENTION = "afinar_sdpa"  # `sdpa` for inference and dropout-free layers, `FastDropout` on attention weights otherwise
_INT16_MIN = -(2**15)


def dropout_multiplier(shape: torch.Size, p: float) -> torch.Tensor:
    """Inverted dropout's multiplier: 1 / (1 - p) where an element is kept, with probability 1 - p (quantised to
    1/65,536), and 0 where it is dropped. Built in numpy: one pass from random bits to float32, where torch's
    compare, cast and scale take three."""
    n = shape.numel()
    seed = int(torch.randint(0, 2**62, ()))  # from torch's generator: seeded and checkpointed with it
    bits = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
    kept = bits >= _INT16_MIN + round(p * 2**16)
    return torch.from_numpy(np.multiply(kept, np.float32(1.0 / (1.0 - p)), dtype=np.float32)).view(shape)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (what `nn.functional.dropout` computes in training) with a `dropout_multiplier`."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    return x * dropout_multiplier(x.shape, p).to(x.dtype)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with `dropout_multiplier` masks (never in place; the identity in evaluation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p) if self.training else x


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention, except that dropout on the attention weights (training only) uses
    `FastDropout`'s masks: SDPA draws them with torch's slow generator."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    q_len, k_len = scores.shape[-2:]
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if attention_mask is None and causal and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = fast_dropout(scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype), dropout)
    return (weights @ value).transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to `threshold` bytes from the heap and keep freed memory there (process
    wide). False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, threshold))


def lora_addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's plain LoRA forward, `base(x) + B(A(dropout(x))) * scaling`, with the scaled low-rank product added
    into the base output by one `addmm`: the (tokens x outputs) tensor is written once instead of three times
    forward, and not scaled again backward. Anything but one plain adapter in fp32 takes peft's own forward."""
    if (self.disable_adapters or self.merged or len(self.active_adapters) != 1 or self.lora_variant or kwargs
            or torch.is_autocast_enabled(x.device.type)):
        return type(self).forward(self, x, *args, **kwargs)
    (name,) = self.active_adapters
    result = self.base_layer(x, *args)
    hidden = self.lora_A[name](self.lora_dropout[name](x))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                       self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return flat.view(result.shape)


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:
        return []
    return [module for module in model.modules() if type(module) is Linear]


def _replace(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    """Swap every submodule of exactly `kind` for `make(it)`, in its train/eval mode; returns how many."""
    count = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is kind:
                setattr(module, name, make(child).train(child.training))
                count += 1
    return count


class FusedGELUNew(GELUTanh):
    """torch's fused tanh-approximate gelu standing in for GPT-2's `NewGELUActivation` (the same function); its own
    type so that `restore` finds it (a model may use `GELUTanh` natively, which stays)."""


def apply(model: nn.Module) -> list[str]:
    """Switch `model` (trained on the CPU) to fast dropout masks, its attention to `attention` where it uses SDPA
    with dropout, its LoRA layers to `lora_addmm_forward`, and the allocator to keeping freed memory; returns what
    was done, for the log. Call it after wrapping the model in LoRA."""
    done = []
    replaced = _replace(model, nn.Dropout, lambda layer: FastDropout(layer.p, layer.inplace))
    if replaced:
        done.append(f"{replaced} dropout layers draw masks with numpy's SFC64")
    fused = _replace(model, NewGELUActivation, lambda _: FusedGELUNew())
    if fused:
        done.append(f"{fused} gelu_new activations computed by torch's fused tanh-approximate gelu")
    base = getattr(model, "get_base_model", lambda: model)()
    attention_dropout = any(getattr(base.config, key, 0) or 0 for key in
                            ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout"))
    if attention_dropout and getattr(base.config, "_attn_implementation", None) == "sdpa":
        _register_attention()
        base.set_attn_implementation(ATTENTION)
        done.append("attention-weight dropout draws masks with numpy's SFC64")
    lora = _lora_layers(model)
    for layer in lora:
        layer.forward = lora_addmm_forward.__get__(layer)
    if lora:
        done.append(f"{len(lora)} LoRA layers add their low-rank product with one addmm")
    if keep_freed_memory():
        done.append("glibc keeps freed memory for reuse (no page faults on each step's large tensors)")
    return done


def restore(model: nn.Module) -> None:
    """Everything `apply` changed in the model, undone: stock `nn.Dropout` and `NewGELUActivation` modules,
    transformers' `sdpa` attention and peft's LoRA forward, so a saved, merged or exported model carries nothing of
    afinar's. (The allocator setting is process-wide and stays.)"""
    _replace(model, FastDropout, lambda layer: nn.Dropout(layer.p, layer.inplace))
    _replace(model, FusedGELUNew, lambda _: NewGELUActivation())
    for layer in _lora_layers(model):
        layer.__dict__.pop("forward", None)
    base = getattr(model, "get_base_model", lambda: model)()
    if getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTENTION:
        base.set_attn_implementation("sdpa")
