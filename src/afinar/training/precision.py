"""The floating-point precision a run trains in: decided once, for a measured reason, and recorded.

`auto` on a GPU follows what the device does natively: bf16 from compute capability 8.0 (Ampere) on, fp16 with
loss scaling below it (`torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated, on a T4 or a
V100). On a CPU it depends on the chip: with native bf16 (AVX512-BF16, AMX, Arm's BF16) a bf16 matmul runs 2-4x
an fp32 one; without it bf16 is emulated, about 30x slower, and `auto` is fp32 without measuring anything. A bare
matmul overstates what a training step gains (casts, softmax, layer norms and the optimizer stay in fp32), so on
a CPU with native bf16 `auto` times a few forward/backward steps of the very model about to be trained, on a
batch of the run's size and typical length, in fp32 and under bf16 autocast, and takes bf16 only when it is
clearly faster; a first bf16 step far slower than fp32's ends the timing at once. The measurement is cached per
machine and model shape (`$AFINAR_CACHE/precision`); the run records the decision, its reason and the figures in
its manifest, and a resumed run or another rank reuses that record instead of measuring again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from afinar.core.assets import cache_dir
from afinar.core.errors import AfinarError
from afinar.core.runs import on_cpu, write_json

log = logging.getLogger(__name__)

BF16_WORTH_IT = 1.3  # bf16 keeps 8 mantissa bits; only a clear step speed-up pays for that
HOPELESS = 0.5  # a first bf16 step at under half fp32's speed: no amount of timing brings it to BF16_WORTH_IT
PROBE_VERSION = 4  # bump when what the probe measures changes
NATIVE_BF16_CAPABILITY = (8, 0)  # CUDA compute capability from which bf16 runs natively (Ampere)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # fp32 | bf16 | fp16
    reason: str
    measured: dict[str, Any] = field(default_factory=dict)  # the probe's figures, when one ran

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> PrecisionChoice:
        return cls(record["precision"], record["reason"], record.get("measured") or {})


def trainer_flags(precision: str) -> dict[str, bool]:
    """`TrainingArguments` flags for a decided precision. `use_cpu` on a CPU-only machine: transformers 5 refuses
    bf16 without it, and under torchrun it is what makes Accelerate form a gloo process group (without it each
    CPU process trains alone, as if it were rank 0 of one)."""
    if precision == "fp16" and on_cpu():
        raise AfinarError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on a CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": on_cpu()}


def cpu_identity() -> dict[str, Any]:
    """What a CPU's bf16 speed depends on: its model, its bf16/matrix extensions, torch and the thread count."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = {f for f in value.split() if "bf16" in f or "amx" in f or "vnni" in f}
    except OSError:
        import platform

        name = platform.processor() or platform.machine()
    return {"cpu": name, "flags": sorted(flags), "torch": torch.__version__, "threads": torch.get_num_threads()}


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU reports a bf16 instruction set (x86 `avx512_bf16` / `amx_bf16`, Arm `bf16`); None when its
    flags cannot be read (not Linux), so only a measurement can tell."""
    identity = cpu_identity()
    if not Path("/proc/cpuinfo").is_file():
        return None
    return any("bf16" in flag for flag in identity["flags"])


def _model_shape(model: torch.nn.Module) -> list:
    """Class, parameter shapes and which train: what the cost of a step depends on (LoRA and freezing included)."""
    return [type(model).__name__, *[(name, list(p.shape), p.requires_grad) for name, p in model.named_parameters()]]


def _step_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    """One forward/backward pass, timed."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        output = model(**batch)
    # every head's outputs (logits; QA's start and end logits), so the whole model is in the backward pass
    sum(value.float().mean() for value in output.values() if torch.is_tensor(value) and value.is_floating_point()
        ).backward()
    return time.perf_counter() - started


def measure_cpu_bf16_speedup(model: torch.nn.Module, batch_size: int, length: int, steps: int = 4) -> dict[str, Any]:
    """Seconds per forward/backward step of `model` on a (batch_size x length) batch in fp32 and under bf16
    autocast, on this CPU, in training mode: evaluation takes other kernels (MiniLM's fused SDPA attention gains
    1.15x from bf16 on an AVX512-BF16 EPYC where its training step gains 1.84x). fp32 and bf16 steps alternate, so
    another process's load falls on both alike (timed one after the other, a busy spell during the bf16 steps
    once measured 0.29x where the idle machine gives 1.84x). Leaves no trace: gradients are cleared, torch's
    random state and the model's mode are restored."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (batch_size, length), generator=generator),
             "attention_mask": torch.ones(batch_size, length, dtype=torch.long)}
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        try:
            model.train()
            _step_seconds(model, batch, False)  # warm-up: kernel selection, first allocations
            _step_seconds(model, batch, True)
            fp32 = bf16 = float("inf")  # the fastest of `steps` each: the least disturbed by a busy host
            for step in range(steps):
                fp32 = min(fp32, _step_seconds(model, batch, False))
                bf16 = min(bf16, _step_seconds(model, batch, True))
                if fp32 / bf16 < HOPELESS:  # emulated: the remaining (slow) steps could not change the answer
                    break
        finally:
            model.train(was_training)
            for parameter in model.parameters():
                parameter.grad = None
    return {"fp32_step_seconds": round(fp32, 5), "bf16_step_seconds": round(bf16, 5),
            "bf16_speedup": round(fp32 / bf16, 3), "batch": [batch_size, length], "timed_steps": step + 1,
            "cached": False}


def cached_cpu_bf16_speedup(model: torch.nn.Module, batch_size: int, length: int) -> dict[str, Any]:
    """`measure_cpu_bf16_speedup`, remembered per machine, model shape and batch shape."""
    key = json.dumps([PROBE_VERSION, cpu_identity(), _model_shape(model), batch_size, length])
    file = cache_dir() / "precision" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    if file.is_file():
        try:
            return {**json.loads(file.read_text(encoding="utf-8")), "cached": True}
        except (OSError, ValueError):
            pass  # unreadable: measure again
    measured = measure_cpu_bf16_speedup(model, batch_size, length)
    try:
        write_json(file, measured)
    except OSError as exc:
        log.warning("could not cache the precision probe in %s: %s", file.parent, exc)
    return measured


def choose(requested: str, model: torch.nn.Module, batch_size: int, length: int) -> PrecisionChoice:
    """What `requested` (auto | fp32 | bf16 | fp16) means here, and why."""
    if requested != "auto":
        trainer_flags(requested)  # fp16 on a CPU fails here, before anything is measured
        return PrecisionChoice(requested, "set in the config (train.precision)")
    if not on_cpu():
        return _choose_on_gpu()
    if cpu_has_native_bf16() is False:
        identity = cpu_identity()
        flags = ", ".join(identity["flags"]) or "none"
        return PrecisionChoice("fp32", f"auto on CPU ({identity['cpu'] or 'unknown'}): no native bf16 "
                                       f"(bf16/AMX/VNNI flags: {flags}), so bf16 would be emulated, far slower")
    measured = cached_cpu_bf16_speedup(model, batch_size, length)
    speedup = measured["bf16_speedup"]
    worth = speedup >= BF16_WORTH_IT
    reason = (f"auto on CPU ({cpu_identity()['cpu'] or 'unknown'}, {os.cpu_count()} cores): a forward/backward "
              f"step of this model on a {batch_size}x{length} batch measured {speedup:.2f}x as fast under bf16 "
              f"autocast as in fp32 ({'at least' if worth else 'below'} the {BF16_WORTH_IT}x that pays for bf16)")
    return PrecisionChoice("bf16" if worth else "fp32", reason, measured)


def _choose_on_gpu() -> PrecisionChoice:
    """bf16 where the GPU computes it natively, fp16 (with `Trainer`'s loss scaling) on older CUDA GPUs."""
    if not torch.cuda.is_available():
        return PrecisionChoice("fp32", "auto: this accelerator has no bf16 or fp16 support known to afinar")
    name, capability = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    if capability >= NATIVE_BF16_CAPABILITY:
        return PrecisionChoice("bf16", f"auto: {name} (compute capability {capability[0]}.{capability[1]}) "
                                       f"computes bf16 natively")
    return PrecisionChoice("fp16", f"auto: {name} (compute capability {capability[0]}.{capability[1]}) has no "
                                   f"native bf16; fp16 with loss scaling")
