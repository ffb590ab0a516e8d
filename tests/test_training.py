"""Fault tolerance: SIGKILL mid-run then --resume reaches the same result; checkpoints; NaN guard; the
length-bucketed batch order."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, afinar_cmd, sets, sigkill_at_checkpoint, tiny_overrides, tweet_rows
from transformers import AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, TrainingArguments
from transformers.trainer_pt_utils import get_length_grouped_indices

from afinar.core.config import load_config
from afinar.core.errors import AfinarError
from afinar.core.runs import Run
from afinar.data.sources import tokenize
from afinar.tasks.registry import train
from afinar.training.trainer import LengthBucketSampler, LengthBucketTrainer, last_checkpoint


@pytest.fixture(scope="module")
def tweet_lengths(tiny_bert) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return np.array([len(ids) for ids in tokenizer([r["text"] for r in tweet_rows("train", 3200)])["input_ids"]])


def padding_share(lengths: np.ndarray, order: list[int], batch: int) -> float:
    groups = [lengths[order[i:i + batch]] for i in range(0, len(order), batch)]
    return 1 - sum(g.sum() for g in groups) / sum(g.max() * len(g) for g in groups)


def test_length_bucket_sampler_covers_every_row_reproducibly_with_less_padding_than_trainer(tweet_lengths):
    sampler = LengthBucketSampler(tweet_lengths, unit=32, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(len(tweet_lengths)))  # every row once
    assert list(LengthBucketSampler(tweet_lengths, unit=32, seed=7)) == first  # seed and epoch fix the order
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == sorted(first) and second != first  # a new order each epoch
    assert tweet_lengths[first[:32]].max() == tweet_lengths.max()  # the longest batch first
    torch.manual_seed(0)
    trainers = get_length_grouped_indices(tweet_lengths.tolist(), 32)
    ours, theirs = padding_share(tweet_lengths, first, 32), padding_share(tweet_lengths, trainers, 32)
    assert ours < 0.03 and ours < theirs / 2, (ours, theirs)
    order = list(LengthBucketSampler(tweet_lengths[:70], unit=32, seed=7))  # 2 full groups and 6 rows over
    assert sorted(order) == list(range(70))
    assert sorted(tweet_lengths[order[64:]]) == sorted(tweet_lengths[:70])[:6]  # the shortest 6 come last


def test_trainer_batches_follow_the_bucket_sampler_and_its_epoch(tiny_bert, tmp_path):
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in tweet_rows("train", 240)])
    train_ds = tokenize(rows, tokenizer, 64, use_cache=False)
    trainer = LengthBucketTrainer(
        model=BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3),
        args=TrainingArguments(str(tmp_path), per_device_train_batch_size=8, seed=3, report_to="none",
                               train_sampling_strategy="group_by_length"),
        train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer))
    loader = trainer.get_train_dataloader()
    loader.set_epoch(2)
    lengths = np.array(train_ds["length"])
    expected = LengthBucketSampler(lengths, unit=8, seed=3)
    expected.set_epoch(2)
    order = list(expected)
    padded = [batch["attention_mask"].numel() for batch in loader]
    assert padded == [lengths[order[i:i + 8]].max() * 8 for i in range(0, 240, 8)]


def test_halving_the_batch_and_doubling_accumulation_keeps_every_step_s_rows(tiny_bert, tmp_path):
    """What the out-of-memory retry does: the bucket groups are whole optimizer steps, so 16 x 1 and 8 x 2 see
    the same rows in each step and the same order over the epoch (a retry from a checkpoint skips exactly the
    rows already trained)."""
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in tweet_rows("train", 240)])
    train_ds = tokenize(rows, tokenizer, 64, use_cache=False)
    orders = []
    for per_device, accumulate in ((16, 1), (8, 2)):
        trainer = LengthBucketTrainer(
            model=BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3),
            args=TrainingArguments(str(tmp_path), per_device_train_batch_size=per_device, seed=3, report_to="none",
                                   gradient_accumulation_steps=accumulate, train_sampling_strategy="group_by_length"),
            train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer))
        orders.append(list(trainer._get_train_sampler()))
    assert orders[0] == orders[1]


def resumable(model, train_file, test_file, out, name):
    return tiny_overrides(model, train_file, test_file, out, **{
        "train.run_name": name, "train.max_steps": 40, "train.eval_every": 20, "train.batch_size": 8,
        "train.logging_steps": 5, "train.learning_rate": 3e-4, "train.keep_checkpoints": True,
        "train.precision": "fp32"})


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_bert, tweets_jsonl, tmp_path):
    """fp32: a resumed bf16 run keeps its recorded precision (test_precision), and bf16 under autocast trains
    through the same checkpointing; its emulated twin here cost 35 s a run on CPUs without native bf16."""
    train_file, test_file = tweets_jsonl
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(afinar_cmd("train", *sets(resumable(tiny_bert, train_file, test_file, tmp_path, "whole"))),
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    sigkill_at_checkpoint(afinar_cmd("train", *sets(resumable(tiny_bert, train_file, test_file, tmp_path, "killed"))),
                          killed / "checkpoints" / "checkpoint-20", env)
    run = Run.open(killed)
    assert run.status() == "running" and not (killed / "metrics.json").exists()  # marked unfinished
    with pytest.raises(AfinarError, match="not finished"):
        run.require_finished()

    resumed = subprocess.run(afinar_cmd("train", str(killed / "config.yaml"), "--resume"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    assert "precision fp32, as decided when the run started" in resumed.stderr
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((killed / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert got[split] == expected[split]  # exactly, on CPU
    assert got["train"]["steps"] == expected["train"]["steps"] == 40
    assert Run.open(killed).status() == "finished"


def test_last_checkpoint_skips_any_checkpoint_not_written_to_the_end(tmp_path, monkeypatch):
    run = Run(tmp_path)

    def checkpoint(step, damage=None):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_0.pth", "rng_state_1.pth"):
            torch.save({"step": step}, folder / name)
        (folder / "model.safetensors").write_bytes(b"x" * 16)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if damage:
            damage(folder)

    def truncate(path: Path):
        path.write_bytes(path.read_bytes()[:-30])

    checkpoint(10)
    checkpoint(20)
    checkpoint(30, lambda f: (f / "trainer_state.json").write_text('{"glob'))
    checkpoint(40, lambda f: (f / "optimizer.pt").write_bytes(b""))
    checkpoint(50, lambda f: truncate(f / "optimizer.pt"))
    checkpoint(60, lambda f: truncate(f / "scheduler.pt"))
    checkpoint(70, lambda f: (f / "model.safetensors").unlink())
    assert last_checkpoint(run).endswith("checkpoint-20")
    monkeypatch.setenv("WORLD_SIZE", "2")  # each rank writes its own RNG state, without a barrier
    checkpoint(80, lambda f: (f / "rng_state_1.pth").unlink())
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


@pytest.mark.slow  # the sft twin below runs the same lifecycle under torchrun in `make test`
def test_two_process_torchrun_matches_one_process(tiny_bert, tweets_jsonl, tmp_path):
    """`afinar train --nproc 2` runs DDP (gloo on CPU) through torchrun; batch_size is global, so the
    effective batch and the step count match the single-process run, and only rank 0 writes the folder. The
    first step sees the same 16 rows either way, so its loss and gradient norm agree (up to dropout masks): a
    rank training alone (half the gradient) or a loss scaled by the process count (twice) cannot pass. In fp32:
    every CPU run passes `use_cpu`, the flag that forms the gloo group (bf16 needs it too; see test_precision),
    and bf16 autocast changes nothing in how DDP reduces gradients."""
    train_file, test_file = tweets_jsonl
    results, first_steps = {}, {}
    for nproc in (1, 2):
        overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
            "train.run_name": f"p{nproc}", "train.max_steps": 20, "train.eval_every": 10,
            "train.precision": "fp32"})
        done = subprocess.run(afinar_cmd("train", "--nproc", str(nproc), *sets(overrides)), capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((tmp_path / f"p{nproc}" / "metrics.json").read_text())
        first_steps[nproc] = Run.open(tmp_path / f"p{nproc}").read_log()[0]
        assert done.stdout.count("run folder:") == 1  # rank 1 prints and writes nothing
        manifest = json.loads((tmp_path / f"p{nproc}" / "manifest.json").read_text())
        assert manifest["precision"]["precision"] == "fp32"
    two = results[2]
    assert "torch.distributed.run" in done.stderr and "--nproc_per_node=2" in done.stderr
    assert two["train"]["steps"] == results[1]["train"]["steps"] == 20
    assert two["validation"]["n"] == results[1]["validation"]["n"]  # no padded duplicates in evaluation
    assert first_steps[2]["loss"] == pytest.approx(first_steps[1]["loss"], rel=0.01)
    assert first_steps[2]["grad_norm"] == pytest.approx(first_steps[1]["grad_norm"], rel=0.1)
    assert abs(two["validation"]["loss"] / results[1]["validation"]["loss"] - 1) < 0.02
    assert abs(two["test"]["loss"] / results[1]["test"]["loss"] - 1) < 0.02


def _language_model_data(task: str, folder: Path) -> dict:
    """The smallest data each language-model task trains on: tweets as documents (causal_lm), self-instruct seed
    tasks as conversations (sft)."""
    if task == "causal_lm":
        documents, valid = folder / "train.txt", folder / "valid.txt"
        documents.write_text("".join(r["text"].strip() + "\n" for r in tweet_rows("train", 120)), encoding="utf-8")
        valid.write_text("".join(r["text"].strip() + "\n" for r in tweet_rows("test", 40)), encoding="utf-8")
        return {"data.source": documents, "data.validation": valid, "lm.block_size": 32, "lm.stride": 32,
                "train.learning_rate": 1e-2}
    seed = folder / "seed.jsonl"
    lines = (SHARED / "self_instruct_seed" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines(True)
    seed.write_text("".join(lines[:48]), encoding="utf-8")
    return {"data.source": seed, "data.max_length": 128, "lm.block_size": 64, "lm.stride": 64,
            "sft.generation_samples": 1, "sft.max_new_tokens": 4, "sft.validity_samples": 2,
            # fully trained: LoRA adapters barely move a random model's near-uniform loss, which would compare
            # nothing (the adapters' merge on save is tested in test_sft)
            "lora.enabled": False, "train.learning_rate": 1e-2}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("task", [pytest.param("causal_lm", marks=pytest.mark.slow), "sft"])
def test_two_process_torchrun_language_models_match_one_process(tiny_gpt2, tmp_path, task):
    """The language-model tasks under `afinar train --nproc 2`: both ranks train and are scored, rank 0 alone
    saves the model and measures on it (forgetting, generations) after the barrier, and both exit 0. Their
    token-normalised losses (`num_items_in_batch`, counted over both ranks) give the validation loss of one
    process, within the classification test's tolerance. The one-process baseline runs in this process (a second
    fresh process would only add its imports); fp32 only: the classification test's bf16 twin covers bf16.
    `make test` runs sft (masked responses, the harder count); causal_lm's packed blocks share its path and run
    with `pytest -m slow`, which keeps the suite inside its 10 minutes on CPUs without native bf16."""
    data = _language_model_data(task, tmp_path)
    results, logs = {}, {}
    for nproc in (1, 2):
        overrides = [f"{k}={v}" for k, v in {
            "task": task, "model.name": tiny_gpt2, "train.output_dir": tmp_path, "train.run_name": f"p{nproc}",
            "train.max_steps": 8, "train.eval_every": 8, "train.batch_size": 8, "train.warmup_ratio": 0,
            "train.logging_steps": 4, "train.early_stopping_patience": None, "train.precision": "fp32",
            "lm.max_eval_tokens": 256, **data}.items()]
        if nproc == 1:
            train(load_config(overrides=overrides))
        else:
            done = subprocess.run(afinar_cmd("train", "--nproc", "2", *sets(overrides)), capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.count("run folder:") == 1  # rank 1 prints and writes nothing
            assert "--nproc_per_node=2" in done.stderr
        run = Run.open(tmp_path / f"p{nproc}")
        assert run.status() == "finished" and (run.path / "summary.md").is_file()
        results[nproc], logs[nproc] = json.loads((run.path / "metrics.json").read_text()), run.read_log()
        assert {"domain", "general"} <= set(results[nproc]["forgetting"])  # measured on the saved model, on rank 0
        if task == "sft":
            assert len(results[nproc]["generations"]) == 1
    one, two = results[1], results[2]
    assert two["train"]["steps"] == one["train"]["steps"] == 8
    # the first step sees the same 8 rows either way: a rank training alone (half the gradient) or a loss scaled by
    # the process count (twice) shows in its gradient norm
    assert logs[2][0]["loss"] == pytest.approx(logs[1][0]["loss"], rel=0.01)
    assert logs[2][0]["grad_norm"] == pytest.approx(logs[1][0]["grad_norm"], rel=0.1)
    assert one["validation"]["loss"] < logs[1][0]["loss"] - 0.5  # training moved the loss: the check below bites
    assert abs(two["validation"]["loss"] / one["validation"]["loss"] - 1) < 0.02, (one["validation"],
                                                                                   two["validation"])
    # the base model's perplexity is the same measurement in both runs
    assert two["forgetting"]["general"]["base_perplexity"] == pytest.approx(
        one["forgetting"]["general"]["base_perplexity"], rel=1e-4)


SLURM = Path(__file__).resolve().parents[1] / "examples" / "slurm"


def test_the_slurm_example_is_valid_bash_and_hands_slurms_variables_to_afinar_train():
    for script in ("train.sbatch", "launch.sh"):
        assert subprocess.run(["bash", "-n", str(SLURM / script)]).returncode == 0, script
    launcher = (SLURM / "launch.sh").read_text()
    assert '--node-rank "$SLURM_NODEID"' in launcher and '--nnodes "$SLURM_JOB_NUM_NODES"' in launcher


@pytest.mark.slow
def test_two_nodes_of_one_process_train_what_one_node_of_two_processes_trains(tiny_bert, tweets_jsonl, tmp_path):
    """Two "nodes" on localhost, each started by the Slurm example's launcher with Slurm's variables faked, join
    through torchrun's c10d rendezvous and share the output directory; their run equals `--nproc 2` on one node
    (the same two ranks, the same seeds: the same batches and dropout masks)."""
    import socket

    train_file, test_file = tweets_jsonl
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(afinar_cmd()[0]).parent}:{os.environ['PATH']}"}
    results = {}
    for layout in ("nodes", "processes"):
        overrides = tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
            "train.run_name": layout, "train.max_steps": 12, "train.eval_every": 6, "train.precision": "fp32"})
        if layout == "processes":
            done = subprocess.run(afinar_cmd("train", "--nproc", "2", *sets(overrides)), capture_output=True,
                                  text=True, timeout=300, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            slurm = {"SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_JOB_ID": "4242",
                     "AFINAR_RDZV_PORT": str(port)}
            nodes = [subprocess.Popen(["bash", str(SLURM / "launch.sh"), *sets(overrides)], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env={**env, **slurm, "SLURM_NODEID": str(rank)}) for rank in (0, 1)]
            outputs = [node.communicate(timeout=300) for node in nodes]
            for node, (out, err) in zip(nodes, outputs):
                assert node.returncode == 0, err[-3000:]
            assert "--nnodes=2" in outputs[1][1] and "--node_rank=1" in outputs[1][1]
            assert f"--rdzv_endpoint=127.0.0.1:{port}" in outputs[0][1] and "--rdzv_id=4242" in outputs[0][1]
            assert sum(out.count("run folder:") for out, _ in outputs) == 1  # global rank 0 alone writes
        results[layout] = json.loads((tmp_path / layout / "metrics.json").read_text())
    nodes, processes = results["nodes"], results["processes"]
    assert nodes["train"]["steps"] == processes["train"]["steps"] == 12
    assert nodes["validation"]["loss"] == pytest.approx(processes["validation"]["loss"], rel=1e-4)
    assert nodes["test"]["accuracy"] == processes["test"]["accuracy"]


def test_gradient_accumulation_gives_the_loss_and_gradient_of_the_whole_batch(tiny_bert, tweets_jsonl, tmp_path):
    """16 rows as 2 x 8 accumulated log the loss and gradient norm of one batch of 16 (a classifier's loss is a
    batch mean, which `Trainer` must divide by the accumulation steps). Dropout off: the same function exactly."""
    from transformers import AutoModelForMaskedLM

    model = tmp_path / "no-dropout"
    AutoModelForMaskedLM.from_pretrained(tiny_bert, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(model)
    train_file, test_file = tweets_jsonl
    first = {}
    for name, per_step, accumulate in (("whole", 16, 1), ("accumulated", 8, 2)):
        first[name] = train(load_config(overrides=tiny_overrides(model, train_file, test_file, tmp_path, **{
            "train.run_name": name, "train.max_steps": 1, "train.batch_size": per_step,
            "train.gradient_accumulation_steps": accumulate, "train.group_by_length": False,
            "train.precision": "fp32"})))
    whole, accumulated = (Run(first[n].run_dir).read_log()[0] for n in ("whole", "accumulated"))
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-4)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


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


def test_a_full_disk_seen_by_torch_save_is_reported_even_when_status_cannot_be_written(
        tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    """A real full disk surfaces as torch.save's RuntimeError, not OSError(ENOSPC), and then status.json cannot
    be written either: the one-line error still names the last complete checkpoint."""
    import errno

    original_save, original_status = torch.save, Run.set_status

    def save(obj, path, *args, **kwargs):
        if "checkpoint-8" in str(path) and str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return original_save(obj, path, *args, **kwargs)

    def set_status(self, state, detail=""):
        if state == "failed":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "status.json"))
        return original_status(self, state, detail)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Run, "set_status", set_status)
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.max_steps": 12, "train.eval_every": 4}))
    with pytest.raises(AfinarError, match=r"disk full while writing .*file write failed.*; the last complete "
                                          r"checkpoint is .*checkpoint-4: free space") as info:
        train(config)
    assert "\n" not in str(info.value)
    assert last_checkpoint(Run(tmp_path / "r")).endswith("checkpoint-4")  # checkpoint-8 was cut short: skipped


def test_out_of_memory_in_one_of_several_processes_is_an_error_not_a_lone_retry(
        tiny_bert, tweets_jsonl, tmp_path, monkeypatch):
    """Under DDP a rank that retried alone would leave the others waiting in an all-reduce (30 minutes)."""
    from transformers import TrainerCallback

    from afinar.training import trainer as training

    class RunsOutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(training, "world_size", lambda: 2)  # what this process sees as one of two ranks
    train_file, test_file = tweets_jsonl
    config = load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.max_steps": 8, "train.eval_every": 4, "train.batch_size": 16}))
    with pytest.raises(AfinarError, match=r"out of memory at step 5 in one of 2 processes, which cannot retry "
                                          r"alone; .*--resume --set train.batch_size=8 --set "
                                          r"train.gradient_accumulation_steps=2"):
        train(config, callbacks=[RunsOutOfMemory()])


def test_resume_may_split_the_same_effective_batch_differently(tiny_bert, tweets_jsonl, tmp_path):
    train_file, test_file = tweets_jsonl
    run = Run.create(load_config(overrides=tiny_overrides(tiny_bert, train_file, test_file, tmp_path)))
    again = load_config(run.path / "config.yaml", ["train.batch_size=8", "train.gradient_accumulation_steps=2",
                                                   "train.resume=true"])
    assert Run.create(again).path == run.path
    other = load_config(run.path / "config.yaml", ["train.batch_size=4", "train.resume=true"])  # 4 x 2: not 16
    with pytest.raises(AfinarError, match=r"train.batch_size: 16 -> 8"):
        Run.create(other)


def test_sharded_models_are_saved_by_every_rank_together(tmp_path, monkeypatch):
    """FSDP and ZeRO-3 gather the shards in a collective: rank 0 saving alone would hang or write placeholders."""
    from afinar.training.trainer import save_best

    class ShardedTrainer:
        is_fsdp_enabled, is_deepspeed_enabled = True, False
        model = torch.nn.Linear(2, 2)
        saved: list[str] = []

        def save_model(self, output_dir):
            self.saved.append(output_dir)

    class Tokenizer:
        def save_pretrained(self, folder):
            raise AssertionError("only the main process writes the tokenizer")

    monkeypatch.setenv("RANK", "1")
    trainer = ShardedTrainer()
    save_best(Run(tmp_path), trainer, Tokenizer(), lora=False)
    assert trainer.saved == [str(tmp_path / "model")]
    with pytest.raises(AfinarError, match="lora.enabled with train.fsdp or train.deepspeed"):
        load_config(overrides=["lora=true", "train.fsdp=full_shard"])


def test_sigterm_marks_the_run_failed_with_the_cause(tiny_bert, tweets_jsonl, tmp_path):
    """torchrun stops the other processes with SIGTERM when one dies: the run must not stay `running`."""
    train_file, test_file = tweets_jsonl
    process = subprocess.Popen(afinar_cmd("train", *sets(tiny_overrides(tiny_bert, train_file, test_file, tmp_path, **{
        "train.max_steps": 10_000, "train.eval_every": 2, "train.batch_size": 8, "train.precision": "fp32"}))),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r" / "checkpoints" / "checkpoint-2").exists():  # training is under way
        assert process.poll() is None and time.time() < deadline, "run ended before it could be stopped"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and "stopped by SIGTERM" in stderr
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "failed" and "stopped by SIGTERM" in status["detail"]


def test_head_learning_rate_reaches_a_decoder_classifiers_score_head(tiny_gpt2, tmp_path):
    """Decoder classifiers name their head `score`, not `classifier`: the head rate once reached encoders only."""
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from afinar.training.trainer import LengthBucketTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=3)
    trainer = LengthBucketTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4,
                                                                      use_cpu=True, report_to=[]))
    trainer.head_learning_rate = 1e-2
    groups = trainer.create_optimizer().param_groups
    head = {id(p) for group in groups if group["lr"] == 1e-2 for p in group["params"]}
    assert head == {id(p) for p in model.score.parameters()}
    assert all(group["lr"] == 1e-4 for group in groups if not {id(p) for p in group["params"]} & head)


def test_early_stopping_patience_starts_once_an_f1_leaves_zero():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from afinar.training.trainer import PatientUntilLearning

    args = TrainingArguments("unused", metric_for_best_model="eval_f1", greater_is_better=True,
                             load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    callback, state, control = PatientUntilLearning(early_stopping_patience=2), TrainerState(), TrainerControl()
    for f1 in (0.0, 0.0, 0.0, 0.0):  # nothing found yet: never a failure to improve
        state.best_metric = 0.0 if state.best_metric is None else state.best_metric
        callback.on_evaluate(args, state, control, {"eval_f1": f1})
    assert callback.early_stopping_patience_counter == 0 and not control.should_training_stop
    state.best_metric = 0.3
    for f1 in (0.2, 0.1):  # learnt, then no better twice: stopped
        callback.on_evaluate(args, state, control, {"eval_f1": f1})
    assert control.should_training_stop
