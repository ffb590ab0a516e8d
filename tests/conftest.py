"""Shared fixtures: tiny models built from configs (no network), small real data files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The project's real data lives beside the repository (../shared/data), read in place, never written.
SHARED = Path(os.environ.get("AFINAR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TWEETS = SHARED / "tweet_sentiment_extraction"
LABELS = ["negative", "neutral", "positive"]
# different lengths in one batch: short rows are right-padded, so decoder pooling must find the last real token
TEXTS = ["ok", "I love this so much, best day of the whole year honestly!!", "", "this is awful",
         "meh", "not sure what to think about the new phone yet, it is fine I guess"]


@pytest.fixture(scope="session", autouse=True)
def afinar_cache(tmp_path_factory):
    """Converted assets go to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("afinar-cache")
    os.environ["AFINAR_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two spinning OpenMP
    threads per process make every step several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with the real MiniLM WordPiece tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from afinar.core.assets import model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm-l6"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with OpenAI's real BPE files (from the gpt2-tokenizer asset); no pad token, as GPT-2."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from afinar.core.assets import model_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(model_path("gpt2-tokenizer"))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tweet_rows(split: str, n: int) -> list[dict]:
    """The first `n` rows of the real hub-format tweet JSONL."""
    with open(TWEETS / f"mteb_format_{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


@pytest.fixture
def tweets_jsonl(tmp_path) -> tuple[Path, Path]:
    """Small train/test JSONL files cut from the real tweet data."""
    paths = []
    for split, n in (("train", 240), ("test", 60)):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in tweet_rows(split, n)), encoding="utf-8")
        paths.append(path)
    return tuple(paths)


def tiny_overrides(model, train_file, test_file, out, **extra) -> list[str]:
    """`key=value` overrides for a few-second run of a tiny model on the small tweet files; `extra` wins."""
    sets = {"model.name": str(model), "data.source": str(train_file), "data.test": str(test_file),
            "train.output_dir": str(out), "train.run_name": "r", "train.epochs": 2, "train.batch_size": 16,
            "train.learning_rate": 1e-3, "train.logging_steps": 2, "data.max_length": 32,
            "train.early_stopping_patience": None, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def afinar_cmd(*args: str) -> list[str]:
    """The CLI in a fresh process (SIGKILL, torchrun)."""
    return [sys.executable, "-m", "afinar", *args]


def sigkill_at_checkpoint(command: list[str], checkpoint: Path, env: dict[str, str]) -> None:
    """Start `command` (an `afinar train`) and SIGKILL it once `checkpoint` is complete (its trainer state
    written): a run killed mid-training, as a crash or an out-of-memory kill leaves it."""
    import signal
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (checkpoint / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def make_run(model: Path, folder: Path, name: str = "r") -> Path:
    """A finished run folder around an untrained classifier head: what export needs, without training."""
    import torch

    from afinar.core.config import load_config
    from afinar.core.models import load_classifier, load_tokenizer
    from afinar.core.runs import Run

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 120), ("test", 20)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tweet_rows(split, n)))
    config = load_config(overrides=[f"model.name={model}", f"data.source={data / 'train.jsonl'}",
                                    f"data.test={data / 'test.jsonl'}", f"train.output_dir={folder}",
                                    f"train.run_name={name}", "data.max_length=32"])
    run = Run.create(config)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(config.model)
    load_classifier(config.model, LABELS, tokenizer).save_pretrained(run.model_dir)
    tokenizer.save_pretrained(run.model_dir)
    run.set_status("finished")
    return run.path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from afinar.core.assets import model_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def seed_tasks(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "seed.jsonl"
    """The first `n` of the 175 real Self-Instruct seed tasks, as a JSONL file of their own."""
    lines = (SHARED / "self_instruct_seed" / "seed_tasks.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


def sft_overrides(model, data, out, **extra) -> list[str]:
    sets = {"task": "sft", "model": str(model), "data.source": str(data), "train.output_dir": str(out),
            "train.run_name": "r", "train.max_steps": 12, "train.batch_size": 8, "train.learning_rate": 3e-3,
            "train.eval_every": 4, "train.logging_steps": 2, "train.early_stopping_patience": None,
            "data.max_length": 160, "lm.max_eval_tokens": 256, "lm.block_size": 64, "lm.stride": 64,
            "sft.validity_samples": 8, "sft.generation_samples": 2, "sft.max_new_tokens": 8, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


@pytest.fixture(scope="session")
def sft_run(tiny_llama, tmp_path_factory):
    """One finished sft run of the tiny Llama (SmolLM2's tokenizer and template) on self-instruct seed tasks."""
    import afinar
    from afinar.core.config import load_config

    folder = tmp_path_factory.mktemp("sft")
    return afinar.train(load_config(overrides=sft_overrides(tiny_llama, seed_tasks(folder, 80), folder)))


def postgres_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin folder (Debian's layout), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A PostgreSQL server (Debian's `postgresql`, which `.ci/run` installs) in a fresh data directory on a free
    loopback port, trusting local connections; stopped and removed afterwards. Yields its URL."""
    binaries = postgres_binaries()
    if binaries is None:
        raise FileNotFoundError("no PostgreSQL server binary under /usr/lib/postgresql: apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="afinar-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: its own system user runs it
        as_owner = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def run(*command: str) -> None:
        subprocess.run([*as_owner, *command], check=True, capture_output=True, timeout=120)

    data = folder / "data"
    run(str(binaries / "initdb"), "-D", str(data), "-U", "afinar", "--auth=trust", "-E", "UTF8")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql://afinar@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
