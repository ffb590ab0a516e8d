"""Fault tolerance: SIGKILL mid-run then --resume reaches the same result; checkpoints; NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from afinar.classify import train
from afinar.config import load_config
from afinar.errors import AfinarError
from afinar.runs import Run
from afinar.training import last_checkpoint

from test_classify import tiny_overrides


def afinar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "afinar", *args]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def resumable(model, train_file, test_file, out, name):
    return tiny_overrides(model, train_file, test_file, out, **{
        "train.run_name": name, "train.max_steps": 120, "train.eval_every": 20, "train.batch_size": 8,
        "train.logging_steps": 5, "train.learning_rate": 3e-4, "train.keep_checkpoints": True})


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(afinar_cmd("train", *sets(resumable(tiny_bert, train_file, test_file, tmp_path, "whole"))),
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(afinar_cmd("train", *sets(resumable(tiny_bert, train_file, test_file, tmp_path,
                                                                   "killed"))),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "checkpoint-40" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    run = Run.open(killed)
    assert run.status() == "running" and not (killed / "metrics.json").exists()  # marked unfinished
    with pytest.raises(AfinarError, match="not finished"):
        run.require_finished()

    resumed = subprocess.run(afinar_cmd("train", str(killed / "config.yaml"), "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((killed / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert got[split] == expected[split]  # exactly, on CPU
    assert got["train"]["steps"] == expected["train"]["steps"] == 120
    assert Run.open(killed).status() == "finished"


def test_last_checkpoint_skips_one_that_was_being_written(tmp_path):
    run = Run(tmp_path)
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "optimizer.pt").write_bytes(b"x")
        (folder / "rng_state.pth").write_bytes(b"x")
        (folder / "trainer_state.json").write_text('{"global_step": %d}' % step if complete else '{"glob')
    assert last_checkpoint(run).endswith("checkpoint-20")
    assert last_checkpoint(Run(tmp_path / "none")) is None


def test_resume_finds_the_unfinished_run_without_a_name(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    overrides = [o for o in tiny_overrides(tiny_bert, train_file, test_file, tmp_path) if "run_name" not in o]
    first = Run.create(load_config(overrides=overrides))
    again = Run.create(load_config(overrides=overrides + ["train.resume=true"]))
    assert again.path == first.path


def test_finished_run_cannot_be_resumed_or_overwritten(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{"train.max_steps": 2})
    train(load_config(overrides=overrides))
    with pytest.raises(AfinarError, match="already exists"):
        train(load_config(overrides=overrides))
    with pytest.raises(AfinarError, match="already finished"):
        train(load_config(overrides=overrides + ["train.resume=true"]))


def test_non_finite_loss_stops_with_the_step_and_cause(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.learning_rate": 1e12, "train.logging_steps": 1, "train.max_steps": 30, "train.warmup_ratio": 0})
    with pytest.raises(AfinarError, match=r"(training loss|gradient norm) became (nan|inf) at step \d+; "
                                          r"the learning rate"):
        train(load_config(overrides=overrides))
    assert Run.open(Path(tmp_path) / "r").status() == "failed"


def test_two_process_torchrun_matches_one_process(tiny_bert, tweets_jsonl, tmp_path):
    """`afinar train --nproc 2` runs DDP (gloo on CPU) through torchrun; batch_size is global, so the
    effective batch and the step count match the single-process run, and only rank 0 writes the folder."""
    train_file, test_file = tweets_jsonl
    results = {}
    for nproc in (1, 2):
        overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
            "train.run_name": f"p{nproc}", "train.max_steps": 20, "train.eval_every": 10})
        done = subprocess.run(afinar_cmd("train", "--nproc", str(nproc), *sets(overrides)), capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((tmp_path / f"p{nproc}" / "metrics.json").read_text())
        assert done.stdout.count("run folder:") == 1  # rank 1 prints and writes nothing
    two = results[2]
    assert "torch.distributed.run" in done.stderr and "--nproc_per_node=2" in done.stderr
    assert two["train"]["steps"] == results[1]["train"]["steps"] == 20
    assert two["validation"]["n"] == results[1]["validation"]["n"]  # no padded duplicates in evaluation
    assert abs(two["validation"]["loss"] / results[1]["validation"]["loss"] - 1) < 0.02
    assert abs(two["test"]["loss"] / results[1]["test"]["loss"] - 1) < 0.02


def test_out_of_memory_halves_the_batch_keeps_the_effective_batch_and_continues(tiny_bert, tweets_jsonl, tmp_path,
                                                                                  caplog):
    """A GPU out-of-memory error (raised here on the CPU at step 5, after the step-4 checkpoint, while the
    per-device batch is 16) costs a retry at 8 x 2 accumulation from that checkpoint, not the run."""
    import torch
    from transformers import TrainerCallback

    class RunsOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5 and args.per_device_train_batch_size > 8:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    train_file, test_file = tweets_jsonl
    base = {"train.max_steps": 8, "train.eval_every": 4, "train.batch_size": 16, "train.keep_checkpoints": True}
    plain = train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path,
                                                       **base, **{"train.run_name": "plain"})))
    with caplog.at_level("WARNING", logger="afinar"):
        retried = train(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path,
                                                             **base, **{"train.run_name": "oom"})),
                        callbacks=[RunsOutOfMemory()])
    assert "out of memory at step 5: retrying with 8 per device x 2 accumulation steps" in caplog.text
    assert "checkpoint-4" in caplog.text and Run.open(retried.run_dir).status() == "finished"
    state = json.loads((retried.run_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == plain.metrics["train"]["steps"] == 8
    # same samples in the same order with the same effective batch: the same model, up to float summation order
    assert retried.metrics["validation"]["loss"] == pytest.approx(plain.metrics["validation"]["loss"], rel=1e-3)


def test_full_disk_fails_in_one_line_and_keeps_the_last_checkpoint(tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    import errno

    from transformers import Trainer

    saves = []
    original = Trainer._save_checkpoint

    def save_then_fill_the_disk(self, *args, **kwargs):
        if saves:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "checkpoints" / "tmp"))
        saves.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_fill_the_disk)
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.max_steps": 12, "train.eval_every": 4}))
    with pytest.raises(AfinarError, match=r"disk full while writing .*; the last complete checkpoint is "
                                          r".*checkpoint-4: free space, then `afinar train .* --resume`"):
        train(config)
    run = Run.open(tmp_path / "r")
    assert run.status() == "failed" and last_checkpoint(run).endswith("checkpoint-4")
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)  # space freed: the run continues and finishes
    resumed = train(load_config(tmp_path / "r" / "config.yaml", ["train.resume=true"]))
    assert resumed.metrics["train"]["steps"] == 12 and run.status() == "finished"
