"""Defaults that scale with the data: what an unset `train.epochs`, `train.learning_rate` or `train.eval_every`
becomes for this run's training set.

Settings tuned on 25,000 rows fail on 500: two epochs of 500 rows at batch 32 are 32 optimizer steps, too few
to learn, and an evaluation every 200 steps never happens, so early stopping and the best checkpoint never act.
Each choice is logged, returned as a note for the manifest and written into the run's resolved config, so the
run can be repeated exactly; a value the user set is never changed.
"""

from __future__ import annotations

import logging
import math

from afinar.core.config import Config, TrainArgs

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3
EVALUATIONS_PER_RUN = 8  # enough points for early stopping (patience 3) and the curve diagnosis
FULL_LEARNING_RATE = 5e-5
LORA_LEARNING_RATES = {"SEQ_CLS": 1e-3, "CAUSAL_LM": 2e-4}  # adapters start at zero and need larger steps


def steps_per_epoch(rows: int, args: TrainArgs) -> int:
    """Optimizer steps in one pass over `rows` training rows, as `Trainer` counts them: `train.batch_size` is the
    global batch (each of N processes takes 1/N of it and of the rows), and a last, partial accumulation of
    batches still makes a step."""
    batches = math.ceil(rows / args.batch_size)
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def planned_steps(rows: int, args: TrainArgs) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(steps_per_epoch(rows, args) * (args.epochs or DEFAULT_EPOCHS)))


def scale_to_data(config: Config, rows: int, lora_task_type: str) -> list[str]:
    """Fill in the unset training settings of `config` for `rows` training rows; returns a note per choice."""
    train, notes = config.train, []
    if train.learning_rate is None:
        if config.lora.enabled:
            train.learning_rate = LORA_LEARNING_RATES.get(lora_task_type, LORA_LEARNING_RATES["CAUSAL_LM"])
            notes.append(f"train.learning_rate = {train.learning_rate:g} (unset; LoRA adapters start at zero and "
                         f"need a larger rate than full fine-tuning)")
        else:
            train.learning_rate = FULL_LEARNING_RATE
            notes.append(f"train.learning_rate = {train.learning_rate:g} (unset; full fine-tuning default)")
    per_epoch = steps_per_epoch(rows, train)
    if train.epochs is None:
        train.epochs = DEFAULT_EPOCHS
        if train.max_steps <= 0 and per_epoch * DEFAULT_EPOCHS < train.min_steps:
            train.epochs = math.ceil(train.min_steps / per_epoch)
            notes.append(f"train.epochs = {train.epochs} (unset): {rows:,} training rows make {per_epoch} optimizer "
                         f"step{'s' * (per_epoch > 1)} per epoch, and a run needs train.min_steps "
                         f"({train.min_steps}) to learn; early stopping ends it sooner if validation stops improving")
        else:
            notes.append(f"train.epochs = {train.epochs} (unset; default)")
    planned = planned_steps(rows, train)
    eval_every_set = train.eval_every is not None
    if not eval_every_set:
        train.eval_every = max(1, math.ceil(planned / EVALUATIONS_PER_RUN))
        notes.append(f"train.eval_every = {train.eval_every} (unset): about {EVALUATIONS_PER_RUN} evaluations over "
                     f"the {planned:,} planned steps")
    for note in notes:
        log.info("%s", note)
    if eval_every_set and train.eval_every * 3 > planned:
        notes.append(f"train.eval_every = {train.eval_every} (set) with {planned:,} planned steps: "
                     f"{planned // train.eval_every} evaluation(s) during training, too few for early stopping and "
                     f"the curve diagnosis; unset it to evaluate {EVALUATIONS_PER_RUN} times")
        log.warning("%s", notes[-1])
    return notes
