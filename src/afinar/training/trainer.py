"""The one place that builds a `Trainer`: arguments, precision, LoRA wrapping, callbacks, resume.

Every task trains through `build_trainer` (called by `training.lifecycle`), so options such as LoRA, length
grouping, early stopping and checkpointing are applied once and mean the same everywhere.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from afinar.core.config import Config, LoraArgs, TrainArgs
from afinar.core.errors import AfinarError
from afinar.core.models import save_tokenizer
from afinar.core.runs import Run, is_main_process, on_cpu, same_on_every_rank, world_size
from afinar.reporting import trackers
from afinar.training import cpu_speed
from afinar.training import precision as precision_lib

log = logging.getLogger(__name__)

def training_arguments(args: TrainArgs, output_dir: Path, precision: str, has_eval: bool = True,
                       report_to: list[str] | None = None, run_name: str | None = None,
                       arguments_class: type[TrainingArguments] = TrainingArguments, **extra) -> TrainingArguments:
    """Our small `TrainArgs` expanded into `transformers.TrainingArguments` (never re-exposed flag by flag), in the
    decided `precision` (fp32 | bf16 | fp16; `decide_precision` resolves `auto`); a task's trainer may need a
    subclass of them (`arguments_class`, e.g. TRL's `DPOConfig`) with `extra` fields of its own."""
    strategy = "steps" if args.eval_every else "epoch"
    metric = args.metric_for_best_model
    world = world_size()
    if args.batch_size % world:
        raise AfinarError(f"train.batch_size={args.batch_size} is the global batch and must divide evenly over "
                          f"{world} processes")
    return arguments_class(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size // world,  # same effective batch for any process count
        per_device_eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler,
        seed=args.seed,
        data_seed=args.seed,
        eval_strategy=strategy if has_eval else "no",
        eval_steps=args.eval_every,
        save_strategy=strategy,
        save_steps=args.eval_every,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=has_eval,
        metric_for_best_model=("eval_" + metric) if has_eval else None,
        greater_is_better=metric != "loss",
        logging_steps=args.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to=report_to or "none",
        run_name=run_name,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        fsdp=args.fsdp or "",
        fsdp_config=args.fsdp_config,
        deepspeed=args.deepspeed,
        **precision_lib.trainer_flags(precision),
        **extra,
    )


def apply_lora(model, args: LoraArgs, task_type: str):
    """Wrap `model` in a PEFT LoRA adapter; the classification head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task_type, r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                        target_modules=args.target_modules)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise AfinarError(f"LoRA cannot wrap {type(model).__name__}: {exc}; set lora.target_modules") from None


def freeze_lower_layers(model, n: int) -> None:
    """Freeze the input embeddings and the lowest `n` transformer blocks: the general-purpose layers change
    least, which limits forgetting and saves their gradient computation."""
    if n <= 0:
        return
    depth = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    blocks = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == depth), None)
    if blocks is None:
        raise AfinarError(f"train.freeze_layers: cannot find the {depth} transformer blocks of "
                          f"{type(model).__name__}")
    if n > len(blocks):
        raise AfinarError(f"train.freeze_layers={n} but the model has {len(blocks)} layers")
    for module in [model.get_input_embeddings(), *blocks[:n]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def adapt_model(model, config: Config, lora_task_type: str):
    """The one order for every task: LoRA adapters first, then the lowest `train.freeze_layers` blocks frozen,
    adapters included, so "freeze N layers" means nothing in them trains, with or without LoRA."""
    if config.lora.enabled:
        model = apply_lora(model, config.lora, lora_task_type)
    freeze_lower_layers(model, config.train.freeze_layers)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class RunLogCallback(TrainerCallback):
    """Mirror `Trainer`'s log history into the run folder at every log, so a killed run keeps its curves."""

    def __init__(self, run: Run):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            self.run.write_log(state.log_history)


class NonFiniteLossCallback(TrainerCallback):
    """Stop at the first NaN/inf training loss or gradient norm instead of training on garbage; the
    checkpoints saved before stay as they were (`Trainer`'s NaN log filter is off, so the loss is seen)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, name in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise AfinarError(f"{name} became {value} at step {state.global_step}; the learning rate "
                                  f"({args.learning_rate}) is likely too high, or fp16 overflowed: lower it or use "
                                  f"bf16/fp32")


class LengthBucketSampler(torch.utils.data.Sampler[int]):
    """Length-grouped batches with almost no padding. Each epoch: shuffle, sort the whole epoch by length (stably,
    so equal lengths stay shuffled), cut it into `unit`-sized groups and shuffle the groups, the longest first so
    that memory runs out at once if it will. `Trainer`'s `group_by_length` sorts only within mega-batches of at
    most 50 batches, which leaves 5-20% of a tweet batch as padding. Seeded by seed and epoch: a resumed run
    sees the same batches."""

    def __init__(self, lengths: Sequence[int], unit: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.unit = unit
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # `Trainer` calls it through Accelerate's data loader
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.lengths))
        order = order[np.argsort(-self.lengths[order], kind="stable")]
        full = len(order) // self.unit
        groups = order[: full * self.unit].reshape(full, self.unit)
        if full > 1:
            groups[1:] = groups[1 + rng.permutation(full - 1)]
        return iter([*groups.ravel().tolist(), *order[full * self.unit:].tolist()])  # the short remainder last


class LengthBucketTrainer(Trainer):
    """`Trainer` whose `group_by_length` batches come from `LengthBucketSampler`, one group per optimizer step:
    all processes' batches of all accumulation micro-steps (Accelerate deals each process its slice). The group is
    the effective batch, so halving the per-device batch and doubling accumulation (the out-of-memory retry) keeps
    every step's rows and the order of the whole epoch."""

    head_learning_rate: float | None = None  # `train.head_learning_rate`, set by `build_trainer`
    arguments_class: type[TrainingArguments] = TrainingArguments  # what a subclass's arguments must be

    def create_optimizer(self, model=None):
        """`Trainer`'s optimizer, with `head_learning_rate` (when set) for the parameters of the classification
        head: a new head starts from nothing, the encoder from pretraining."""
        if self.head_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        head_rate = self.head_learning_rate
        decay = set(self.get_decay_parameter_names(self.model))
        groups = []
        for head in (False, True):
            for decays in (True, False):
                params = [p for n, p in self.model.named_parameters()
                          if p.requires_grad and is_head(n) == head and (n in decay) == decays]
                if params:
                    groups.append({"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                                   **({"lr": head_rate} if head else {})})
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset  # with the `length` column that `data.sources.tokenize` adds and `Trainer` drops
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(dataset, "column_names"):
            return super()._get_train_sampler(train_dataset)
        lengths = (dataset.select_columns(["length"]).with_format("numpy")[:]["length"]  # one Arrow read
                   if "length" in dataset.column_names else [len(ids) for ids in dataset["input_ids"]])
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        unit = self._train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthBucketSampler(lengths, unit, seed)

    def _get_eval_sampler(self, eval_dataset):
        """Held-out rows in their own order: `Trainer` (transformers 5) groups them by length when training does,
        which returns predictions in a shuffled order, and a task that maps predictions back to its rows
        (windows to sentences, features to questions, `rows` kept for paired comparisons) needs that order."""
        if eval_dataset is None or not hasattr(eval_dataset, "__len__"):
            return None
        return torch.utils.data.SequentialSampler(eval_dataset)


class PatientUntilLearning(EarlyStoppingCallback):
    """Early stopping whose patience starts once the model has found something: while an F1 or exact match (a
    metric where more is better) is still 0, as it is for the first evaluations of a tagger that tags every
    word O, evaluations are not counted as failures to improve. With afinar's defaults a WNUT-17 tagger scored
    entity F1 0, 0 and 0.002 at its first three of eight evaluations: one more 0 and the stock callback (patience
    3) would have stopped it at half its steps, before it had begun to learn (it ended at 0.38)."""

    def check_metric_value(self, args, state, control, metric_value):
        if args.greater_is_better and metric_value <= 0 and (state.best_metric is None or state.best_metric <= 0):
            return
        super().check_metric_value(args, state, control, metric_value)


def typical_length(dataset) -> int:
    """The median tokens per training row: what a dynamically padded batch of `dataset` is about as long as."""
    if "length" in dataset.column_names:
        return max(1, int(np.median(dataset.select_columns(["length"]).with_format("numpy")[:]["length"])))
    return len(dataset[0]["input_ids"])


def decide_precision(run: Run, args: TrainArgs, model, train_ds) -> precision_lib.PrecisionChoice:
    """`train.precision` resolved once per run (see `afinar.training.precision`) and written into the manifest. A resumed
    run keeps the precision it started with; under torchrun, rank 0 decides for every rank."""
    recorded = run.manifest().get("precision") if args.resume else None
    if recorded:
        choice = precision_lib.PrecisionChoice.from_dict(recorded)
        log.info("precision %s, as decided when the run started: %s", choice.precision, choice.reason)
        return choice
    world = world_size()
    choice = (precision_lib.choose(args.precision, model, args.batch_size // world, typical_length(train_ds))
              if is_main_process() else None)
    choice = precision_lib.PrecisionChoice.from_dict(same_on_every_rank(choice and choice.to_dict()))
    log.info("precision %s: %s", choice.precision, choice.reason)
    run.update_manifest({"precision": choice.to_dict()})
    return choice


def build_trainer(run: Run, args: TrainArgs, model, tokenizer, train_ds, eval_ds, data_collator,
                  compute_metrics=None, preprocess_logits_for_metrics=None, extra_callbacks=None,
                  compute_loss=None, trainer_class: type[LengthBucketTrainer] | None = None,
                  extra_arguments: dict | None = None) -> Trainer:
    """The one `Trainer` every task trains with; `compute_loss` replaces the model's own loss (`Trainer`'s
    `compute_loss_func`, e.g. class weights). A task whose training step is another library's (TRL's DPO) gives
    a `LengthBucketTrainer` subclass that also derives from that trainer, and the extra fields of its
    `arguments_class`; everything else (precision, callbacks, checkpoints, length grouping) stays as here."""
    trainer_class = trainer_class or LengthBucketTrainer
    trackers.check_trackers(args.report_to)
    report_to, tracker_callbacks = trackers.trainer_setup(run.path, args.report_to)
    callbacks = [RunLogCallback(run), NonFiniteLossCallback(), *tracker_callbacks, *(extra_callbacks or [])]
    if eval_ds is not None and args.early_stopping_patience:
        callbacks.append(PatientUntilLearning(early_stopping_patience=args.early_stopping_patience))
    speed_up(model, args)
    precision = decide_precision(run, args, model, train_ds)
    arguments = training_arguments(args, run.checkpoint_dir, precision.precision, has_eval=eval_ds is not None,
                                   report_to=report_to, run_name=run.path.name,
                                   arguments_class=trainer_class.arguments_class, **(extra_arguments or {}))
    if args.head_learning_rate is not None and not any(is_head(n) for n, _ in model.named_parameters()):
        raise AfinarError(f"train.head_learning_rate is set, but {type(model).__name__} has no classification head "
                          f"({' or '.join(HEAD_NAMES)} parameters) to give it to; unset it")
    trainer = trainer_class(
        model=model,
        args=arguments,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=callbacks,
        compute_loss_func=compute_loss,
    )
    trainer.head_learning_rate = args.head_learning_rate
    return trainer


HEAD_NAMES = ("classifier", "score")  # encoder classifiers' heads; decoder classifiers' (GPT-2, Llama, ...)


def is_head(parameter_name: str) -> bool:
    """Whether a parameter belongs to the classification head (LoRA's `modules_to_save` copies included)."""
    return any(part in HEAD_NAMES for part in parameter_name.split("."))


def speed_up(model, args: TrainArgs) -> None:
    """What pays on the CPU beyond `Trainer`'s own options (see `cpu_speed`): the same functions, and dropout
    masks with the same distribution from a faster generator."""
    if args.cpu_speedups and on_cpu():
        for change in cpu_speed.apply(model):
            log.info("CPU speed-up: %s", change)


def save_best(run: Run, trainer: Trainer, tokenizer, lora: bool) -> None:
    """The model `Trainer` holds (the best, after `load_best_model_at_end`) into `run/model`, LoRA adapters
    merged so the result is a plain checkpoint. Sharded (FSDP, DeepSpeed): every rank takes part in
    `Trainer.save_model`, which gathers the shards and writes from the main process (rank 0 alone would hang on
    FSDP's collective, or write ZeRO-3's empty placeholders); otherwise the main process saves alone."""
    cpu_speed.restore(trainer.model)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(run.model_dir))  # LoRA is refused with sharding (`Config.validate`)
        if is_main_process():
            save_tokenizer(tokenizer, run.model_dir)
        return
    if not is_main_process():
        return
    model = trainer.model.merge_and_unload() if lora else trainer.model
    model.save_pretrained(run.model_dir)
    save_tokenizer(tokenizer, run.model_dir)


def fit(trainer: Trainer, run: Run, checkpoint: str | None):
    """`trainer.train`, with two failures made survivable. Out of GPU memory: halve the per-device batch and
    double gradient accumulation (the same effective batch, so the same schedule and samples) and continue from
    the last complete checkpoint. A full disk: one line naming the last complete checkpoint to resume from;
    `Trainer` writes each checkpoint into a new folder, so the earlier ones are intact."""
    while True:
        try:
            return trainer.train(resume_from_checkpoint=checkpoint)
        except torch.OutOfMemoryError:
            args, step = trainer.args, trainer.state.global_step
            if world_size() > 1:  # the other ranks wait in an all-reduce this rank will never join
                raise AfinarError(f"out of memory at step {step} in one of {world_size()} processes, which cannot "
                                  f"retry alone; resume with a smaller batch per step and the same effective batch: "
                                  f"`afinar train {run.path / 'config.yaml'} --resume --set "
                                  f"train.batch_size={max(1, args.per_device_train_batch_size * world_size() // 2)} "
                                  f"--set train.gradient_accumulation_steps={args.gradient_accumulation_steps * 2}`"
                                  ) from None
            checkpoint = last_checkpoint(run)
            if args.per_device_train_batch_size == 1:
                raise AfinarError("out of memory with a batch of 1 per device; lower data.max_length, use LoRA "
                                  "or train.freeze_layers, or a GPU with more memory") from None
            if step > 0 and checkpoint is None:
                raise AfinarError(f"out of memory at step {step}, before any checkpoint to continue from; set "
                                  f"train.batch_size lower (and train.gradient_accumulation_steps higher)") from None
            args.per_device_train_batch_size //= 2
            args.gradient_accumulation_steps *= 2
            trainer._train_batch_size = args.per_device_train_batch_size  # what the dataloader is built with
            trainer.optimizer, trainer.lr_scheduler = None, None  # rebuilt, then restored from the checkpoint
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("out of memory at step %d: retrying with %d per device x %d accumulation steps (the same "
                        "effective batch) from %s", step, args.per_device_train_batch_size,
                        args.gradient_accumulation_steps, checkpoint or "the start")
        except Exception as exc:
            if not disk_full(exc):
                raise
            where = getattr(exc, "filename", None) or run.path
            raise AfinarError(f"disk full while writing {where} ({_first_line(exc)}); the last complete checkpoint "
                              f"is {last_checkpoint(run) or 'none yet'}: free space, then `afinar train "
                              f"{run.path / 'config.yaml'} --resume`") from None


def _readable_archive(path: Path) -> bool:
    """`torch.save` writes a zip archive whose directory comes last: a truncated or empty file has none."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_is_complete(checkpoint: Path, processes: int = 1) -> bool:
    """A checkpoint every file of which was written to the end: the trainer state (`Trainer` writes it last),
    the optimizer and scheduler archives, the weights, and one RNG state per process (ranks write theirs without
    waiting for each other)."""
    import json

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    rng = ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]
    archives = [checkpoint / "optimizer.pt", *(checkpoint / name for name in rng)]
    if (checkpoint / "scheduler.pt").exists():
        archives.append(checkpoint / "scheduler.pt")
    weights = [p for p in checkpoint.glob("*.safetensors") if p.stat().st_size > 0]
    return bool(weights) and all(_readable_archive(path) for path in archives)


def disk_full(exc: BaseException) -> bool:
    """ENOSPC as Python raises it, and as torch.save (a RuntimeError, "file write failed") and safetensors (their
    own error type) report it."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return "No space left on device" in text or "file write failed" in text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def last_checkpoint(run: Run) -> str | None:
    """The newest complete checkpoint (`checkpoint_is_complete`); one killed or cut short while being written is
    skipped in favour of the one before."""
    folder = run.checkpoint_dir
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_is_complete(checkpoint, world_size()):
            return str(checkpoint)
        log.warning("skipping %s: not completely written", checkpoint)
    return None
