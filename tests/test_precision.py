"""Precision: `auto` measured on the model being trained and recorded; bf16 forced on any CPU trains like fp32."""

import json

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoModelForSequenceClassification

from afinar.api import train
from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.training import precision
from afinar.training.trainer import decide_precision

pytestmark = pytest.mark.usefixtures("one_thread")


def test_probe_times_real_steps_and_leaves_no_trace(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.random.get_rng_state()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    measured = precision.measure_cpu_bf16_speedup(model, batch_size=4, length=16, steps=2)
    assert measured["fp32_step_seconds"] > 0 and measured["bf16_step_seconds"] > 0
    assert measured["bf16_speedup"] == pytest.approx(measured["fp32_step_seconds"] / measured["bf16_step_seconds"],
                                                     rel=1e-2)
    assert modes and all(modes) and not model.training  # measured in training mode, then set back to eval
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched


def test_a_busy_spell_on_the_host_does_not_decide_the_precision(tiny_bert, monkeypatch):
    """Another process slows the last four of eight timed steps 4x (bf16 is 2x fp32 on this fake CPU). Timed in
    two phases, all bf16 steps fell in the spell (0.5x); alternating, each precision keeps undisturbed steps."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    calls = []

    def step(model, batch, bf16):
        calls.append(bf16)
        busy = 7 <= len(calls) <= 10  # two warm-up steps, then eight timed ones
        return (0.5 if bf16 else 1.0) * (4 if busy else 1)

    monkeypatch.setattr(precision, "_step_seconds", step)
    assert precision.measure_cpu_bf16_speedup(model, 4, 16, steps=4)["bf16_speedup"] == pytest.approx(2.0)


def test_probe_is_cached_per_machine_and_model_shape(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("AFINAR_CACHE", str(tmp_path))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    first = precision.cached_cpu_bf16_speedup(model, 4, 16)
    again = precision.cached_cpu_bf16_speedup(model, 4, 16)
    assert not first["cached"] and again["cached"] and again["bf16_speedup"] == first["bf16_speedup"]
    for parameter in model.bert.embeddings.parameters():  # frozen layers change the step: another entry
        parameter.requires_grad_(False)
    assert not precision.cached_cpu_bf16_speedup(model, 4, 16)["cached"]
    assert len(list((tmp_path / "precision").glob("*.json"))) == 2


@pytest.mark.parametrize("speedup, expected", [(3.1, "bf16"), (1.1, "fp32"), (0.7, "fp32")])
def test_auto_on_cpu_follows_the_measured_step_speedup(tiny_bert, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "cached_cpu_bf16_speedup", lambda *a: {"bf16_speedup": speedup})
    choice = precision.choose("auto", torch.nn.Linear(1, 1), 32, 40)
    assert choice.precision == expected
    assert f"{speedup:.2f}x" in choice.reason and "32x40 batch" in choice.reason
    assert precision.choose("bf16", torch.nn.Linear(1, 1), 32, 40).precision == "bf16"  # explicit: no probe


def test_a_cpu_without_native_bf16_is_fp32_without_a_probe(monkeypatch):
    """An AVX2-only CPU emulates bf16 about 30x slower: five probe steps of a real model there took minutes."""
    monkeypatch.setattr(precision, "cpu_identity", lambda: {"cpu": "AVX2 CPU", "flags": [], "torch": "", "threads": 2})

    def probe(*args):
        raise AssertionError("no bf16 step may run on a CPU that emulates bf16")

    monkeypatch.setattr(precision, "cached_cpu_bf16_speedup", probe)
    choice = precision.choose("auto", torch.nn.Linear(1, 1), 32, 40)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and choice.measured == {}


def test_one_hopeless_bf16_step_ends_the_probe(tiny_bert, monkeypatch):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    calls = []

    def step(model, batch, bf16):
        calls.append(bf16)
        return 30.0 if bf16 else 1.0  # emulated bf16

    monkeypatch.setattr(precision, "_step_seconds", step)
    measured = precision.measure_cpu_bf16_speedup(model, 4, 16, steps=4)
    assert calls == [False, True, False, True] and measured["timed_steps"] == 1  # warm-up, then one pair
    assert measured["bf16_speedup"] == pytest.approx(1 / 30, rel=1e-2)


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_a_gpu_follows_its_native_precision(monkeypatch, capability, expected):
    """`torch.cuda.is_bf16_supported()` answers yes on a T4 (7.5), where bf16 is emulated: the capability decides."""
    monkeypatch.setattr(precision, "on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    choice = precision.choose("auto", torch.nn.Linear(1, 1), 32, 40)
    assert choice.precision == expected and f"compute capability {capability[0]}.{capability[1]}" in choice.reason


def test_fp16_on_a_cpu_is_refused():
    with pytest.raises(AfinarError, match="fp16 needs a CUDA GPU"):
        precision.choose("fp16", torch.nn.Linear(1, 1), 32, 40)


def test_cpu_training_arguments_form_a_process_group_under_torchrun():
    """`use_cpu` is what makes Accelerate treat torchrun's CPU processes as one DDP job; bf16 on a CPU needs it."""
    assert precision.trainer_flags("bf16") == {"bf16": True, "fp16": False, "use_cpu": True}
    assert precision.trainer_flags("fp32")["use_cpu"]


@pytest.mark.parametrize("model_fixture", ["tiny_bert", "tiny_gpt2"])
def test_forced_bf16_trains_like_fp32_and_is_recorded(request, model_fixture, tweets_jsonl, tmp_path):
    """bf16 autocast runs on every CPU (emulated where not native): the encoder and the decoder classifier train
    in it to the same validation loss as fp32, yet not bit for bit (autocast really ran)."""
    model = request.getfixturevalue(model_fixture)
    train_file, test_file = tweets_jsonl
    results = {}
    for name in ("fp32", "bf16"):
        results[name] = train(load_config(overrides=tiny_overrides(model, train_file, test_file, tmp_path, **{
            "train.run_name": name, "train.precision": name, "train.epochs": 1})))
        manifest = json.loads((results[name].run_dir / "manifest.json").read_text())
        assert manifest["precision"] == {"precision": name, "reason": "set in the config (train.precision)",
                                         "measured": {}}
    fp32, bf16 = (results[n].metrics["validation"]["loss"] for n in ("fp32", "bf16"))
    assert bf16 == pytest.approx(fp32, rel=0.02) and bf16 != fp32


def test_auto_records_its_measurement_and_a_resume_keeps_the_decision(tiny_bert, tweets_jsonl, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # the probe runs on any CPU here
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{"train.max_steps": 4})
    result = train(load_config(overrides=overrides))
    recorded = json.loads((result.run_dir / "manifest.json").read_text())["precision"]
    assert recorded["precision"] in ("fp32", "bf16") and recorded["reason"].startswith("auto on CPU")
    assert recorded["measured"]["fp32_step_seconds"] > 0 and recorded["measured"]["batch"][0] == 16
    # a resumed run never measures again: the manifest's decision holds, even if this machine would now decide
    # otherwise (here: a probe that would fail)
    monkeypatch.setattr(precision, "choose", lambda *a: pytest.fail("measured again on resume"))
    resumed = load_config(overrides=overrides + ["train.resume=true"])
    choice = decide_precision(Run(result.run_dir), resumed.train, None, None)
    assert choice.to_dict() == recorded
