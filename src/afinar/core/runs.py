"""The run folder: everything needed to understand and reproduce a result, written atomically.

    runs/<time>-<model>-<data>/
      config.yaml       resolved configuration (rerun with `afinar train config.yaml`)
      manifest.json     versions, machine, data sources and sha256 fingerprints, notes on what was changed
      status.json       running | finished | failed: an unfinished run is never reported as finished
      train_log.jsonl   loss and validation metrics at each logging / evaluation step
      metrics.json      final validation and test metrics
      summary.md        a short human-readable account
      model/            the best model and tokenizer (safetensors)
      checkpoints/      Trainer checkpoints for resuming
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afinar.core.config import Config, load_config, to_dict, to_yaml
from afinar.core.errors import AfinarError

PACKAGES = ("afinar", "torch", "transformers", "datasets", "peft", "accelerate", "tokenizers", "scikit-learn",
            "numpy")


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def earlier_record(out: Path, record: str, config: Config, resume: bool, holds: str) -> dict | None:
    """What a resumable command (compare, curve) wrote into `out` before, to continue from: None in a fresh folder;
    an error when the folder holds `holds` already and `resume` is off, or when it was made with another config."""
    if not (out / record).exists():
        return None
    if not resume:
        raise AfinarError(f"{out} already holds {holds}; pick another --out, or --resume to finish it")
    if not (out / "config.yaml").is_file() or (out / "config.yaml").read_text(encoding="utf-8") != to_yaml(config):
        raise AfinarError(f"{out} holds {holds} of another configuration (see its config.yaml); --resume needs the "
                          f"same one")
    return read_json(out / record)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(text).name or text).strip("-")[:40] or "run"


def on_cpu() -> bool:
    """True where this process trains on the CPU: no CUDA, XPU or Apple GPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MB: the host's resident set (`ru_maxrss`: KiB on Linux, bytes on
    macOS) and, on a CUDA GPU, the most memory torch allocated there."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_host_memory_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        peak["peak_gpu_memory_mb"] = round(sys.modules["torch"].cuda.max_memory_allocated() / 2**20, 1)
    return peak


def world_size() -> int:
    """Processes in this run (torchrun sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Under torchrun only rank 0 writes the run folder."""
    return int(os.environ.get("RANK", "0")) == 0


def same_on_every_rank(value: Any) -> Any:
    """Rank 0's value on all ranks (their clocks may disagree on the timestamp in a run name, their timings on
    a measured choice)."""
    if world_size() <= 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # joins the process group torchrun set up; on a CPU-only machine only `cpu=True` makes it a gloo group
    # (otherwise Accelerate sees no distributed run and the broadcast returns each rank's own value)
    PartialState(cpu=on_cpu())
    return broadcast_object_list([value])[0]


def wait_for_every_rank() -> None:
    """A barrier under torchrun (nothing in one process): what rank 0 wrote is there for every rank after it."""
    if world_size() <= 1:
        return
    from accelerate import PartialState

    PartialState(cpu=on_cpu()).wait_for_everyone()


def _comparable(config: Config) -> Config:
    """The settings that decide what a run computes. Aside: resume, the run's name and output folder, what is kept
    on disk, the evaluation batch, and how the effective batch (`batch_size` x `gradient_accumulation_steps`) is
    split into accumulation steps, which a resumed run may change to fit in memory (same rows per step)."""
    import dataclasses

    train = config.train
    return dataclasses.replace(config, train=dataclasses.replace(
        train, resume=False, run_name=None, output_dir="", keep_checkpoints=False, save_total_limit=0,
        eval_batch_size=None, batch_size=train.batch_size * train.gradient_accumulation_steps,
        gradient_accumulation_steps=1))


def _settings(config: Config) -> dict[str, Any]:
    """`_comparable(config)` as dotted keys and JSON values (as the manifest keeps them)."""
    flat = {}
    for key, value in to_dict(_comparable(config)).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return json.loads(json.dumps(flat))


def _settings_record(config: Config) -> dict[str, Any]:
    """What a run started with, for the manifest: a user edits config.yaml, never this."""
    settings = _settings(config)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"started_with": {"settings": settings, "sha256": digest}}


def _differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in after.items() if before.get(key) != value]


def _latest_unfinished(output_dir: Path, config: Config) -> str | None:
    """The newest unfinished run in `output_dir` whose config equals this one (resume and name aside)."""
    if not output_dir.is_dir():
        return None
    for folder in sorted((p for p in output_dir.iterdir() if (p / "config.yaml").is_file()),
                         key=lambda p: p.stat().st_mtime, reverse=True):
        run = Run(folder)
        if run.status() != "finished" and _comparable(run.config()) == _comparable(config):
            return folder.name
    return None


@dataclass
class Run:
    """A run folder and the small set of files in it."""

    path: Path

    @classmethod
    def create(cls, config: Config) -> Run:
        """A new run folder, or with `train.resume` the folder to continue. The output folder is made absolute
        and the resolved name written into the saved config, so `afinar train <run>/config.yaml --resume` finds
        the same folder from anywhere. A generated name is claimed atomically: two runs started in the same
        second get two folders."""
        config.train.output_dir = str(Path(config.train.output_dir).expanduser().resolve())
        output_dir = Path(config.train.output_dir)
        name = config.train.run_name
        if name is None and config.train.resume:
            name = _latest_unfinished(output_dir, config)
        # rank 0 claims or judges the folder, and every rank follows its verdict
        name, problem = same_on_every_rank(cls._claim(output_dir, name, config) if is_main_process() else None)
        if problem:
            raise AfinarError(problem)
        config.train.run_name = name
        run = cls(output_dir / name)
        if is_main_process():
            if "started_with" not in run.manifest():
                run.update_manifest(_settings_record(config))
            write_atomic(run.path / "config.yaml", to_yaml(config))
        run.set_status("running")
        return run

    @classmethod
    def _claim(cls, output_dir: Path, name: str | None, config: Config) -> tuple[str, str | None]:
        """(folder name, why it cannot be used or None), the folder made. A generated name that is taken gets a
        suffix (-2, -3, ...); `mkdir` without `exist_ok` makes the claim atomic between processes."""
        if name is None:
            stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(config.model.name)}-{_slug(config.data.source)}"
            output_dir.mkdir(parents=True, exist_ok=True)
            for number in itertools.count(1):
                candidate = stem if number == 1 else f"{stem}-{number}"
                try:
                    (output_dir / candidate).mkdir()
                    return candidate, None
                except FileExistsError:
                    continue
        run = cls(output_dir / name)
        problem = run.conflict(config)
        if problem is None:
            run.path.mkdir(parents=True, exist_ok=True)
        return name, problem

    def conflict(self, config: Config) -> str | None:
        """Why this folder cannot be (re)used for `config`, if it cannot. A resumed run must be a run, unfinished,
        and resumed with the settings it started with: anything else would leave a record of something that
        never ran."""
        if not (self.path.exists() and any(self.path.iterdir())):
            return None
        if not config.train.resume:
            return f"run folder {self.path} already exists; pick another train.run_name or pass --resume"
        if not (self.path / "config.yaml").is_file():
            return (f"{self.path} is not an afinar run folder (no config.yaml), so there is nothing to resume; pick "
                    f"another train.run_name")
        if self.status() == "finished":
            return f"run {self.path} has already finished; nothing to resume"
        # against the manifest's record of what the run started with: config.yaml is the file a user edits, and
        # `afinar train <run>/config.yaml --resume` reads it back (runs from before the record: config.yaml)
        recorded = (self.manifest().get("started_with") or {}).get("settings") or _settings(self.config())
        changed = _differences(recorded, _settings(config))
        if changed:
            return (f"run {self.path} was started with other settings ({'; '.join(changed)}); resuming would "
                    f"train on a mix of both: restore them, or start a new run without --resume")
        return None

    @classmethod
    def open(cls, path: str | Path) -> Run:
        run = cls(Path(path))
        if not (run.path / "config.yaml").is_file():
            raise AfinarError(f"{path} is not an afinar run folder (no config.yaml)")
        return run

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def config(self) -> Config:
        return load_config(self.path / "config.yaml")

    @contextmanager
    def recording(self, keep_checkpoints: bool) -> Iterator[Run]:
        """Mark the run failed when the body raises (and re-raise), finished when it completes. A finished run
        needs only model/, so its checkpoints (optimizer state included) are removed unless kept."""
        try:
            yield self
        except BaseException as exc:
            try:
                self.set_status("failed", f"{type(exc).__name__}: {exc}")
            except OSError:  # a full disk cannot take status.json either: the error itself must still be seen
                pass
            raise
        self.set_status("finished")
        if not keep_checkpoints and is_main_process():
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def set_status(self, state: str, detail: str = "") -> None:
        if not is_main_process():
            return
        write_json(self.path / "status.json", {"state": state, "detail": detail, "time": time.time()})

    def status(self) -> str:
        file = self.path / "status.json"
        return read_json(file)["state"] if file.is_file() else "unknown"

    def require_finished(self) -> None:
        state = self.status()
        if state != "finished" or not self.model_dir.is_dir():
            raise AfinarError(f"run {self.path} is {state}, not finished; resume it with "
                              f"`afinar train {self.path / 'config.yaml'} --resume`")

    def write(self, name: str, data: Any) -> None:
        """A JSON file (dict or list) or text (str) into the run folder (by the main process only)."""
        if not is_main_process():
            return
        if isinstance(data, str):
            write_atomic(self.path / name, data)
        else:
            write_json(self.path / name, data)

    def manifest(self) -> dict:
        file = self.path / "manifest.json"
        return read_json(file) if file.is_file() else {}

    def trained_in_bf16(self) -> bool:
        """Whether the run trained in bf16 (its manifest's precision decision): what its saved model is used in."""
        return (self.manifest().get("precision") or {}).get("precision") == "bf16"

    def update_manifest(self, entries: dict[str, Any]) -> None:
        """Merge `entries` into manifest.json, keeping what is there (a resumed run keeps its recorded precision)."""
        if is_main_process():
            write_json(self.path / "manifest.json", {**self.manifest(), **entries})

    def write_log(self, history: list[dict]) -> None:
        if not is_main_process():
            return
        write_atomic(self.path / "train_log.jsonl", "".join(json.dumps(row) + "\n" for row in history))

    def read_log(self) -> list[dict]:
        file = self.path / "train_log.jsonl"
        if not file.is_file():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def metrics(self) -> dict:
        file = self.path / "metrics.json"
        return read_json(file) if file.is_file() else {}


def reads_pairs(run: Run) -> bool:
    """Whether the run's model was trained on sentence pairs (its data record says so)."""
    return bool(run.manifest().get("data", {}).get("pairs"))
