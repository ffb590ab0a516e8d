"""Preference tuning (`task: preference`): pairs of answers to one conversation, the chosen one preferred; the model
moves toward the preferred kind with TRL's DPO.

`Preference` is a task of the one run lifecycle (`afinar.training.lifecycle`): pairs are read, refused when they are
not pairs, checked, split by conversation and tokenized by `data.preference` (the prompt through the model's chat
template with its generation prompt, cut from the left to fit `data.max_length`, never the answers), and trained
by TRL's `DPOTrainer` inside the lifecycle's `Trainer` (`PreferenceTrainer`): precision, checkpoints, resume, the
best checkpoint by the held-out DPO loss and length-grouped batches are the lifecycle's, the loss and the
reference are TRL's. LoRA is on unless `lora.enabled=false`, and the reference is the model with its adapters
disabled (no second copy in memory); a full fine-tune gets TRL's frozen copy.

After training, every held-out pair is scored once by the best model and the reference (`evaluation.preference`:
preference accuracy, likelihood accuracy and mean reward margin, before and after, with paired intervals), a few
test prompts are answered by the base and the tuned model, and the WikiText-2 forgetting check runs. The saved
model folder holds the chat template and `generation.json` as an sft run's does, so `afinar generate`, `serve`
and `export --format gguf` treat the result as they treat an sft run.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import random
from dataclasses import dataclass

import numpy as np

from afinar.core.config import Config
from afinar.core.models import load_causal_lm, load_tokenizer
from afinar.core.runs import Run
from afinar.data import chat
from afinar.data.preference import CheckedPairs, checked_pairs, format_checked
from afinar.evaluation import forgetting
from afinar.evaluation.preference import preference_report, report_lines
from afinar.inference.generation import GenerationFormat, Generator
from afinar.reporting import pages
from afinar.tasks.causal_lm import LanguageModelTask, adapters_by_default, forgetting_lines, loss_picks_the_best
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

__all__ = ["Preference", "pair_log_probs", "preference_trainer"]

DPO_LOSS_TYPES = {"dpo": ["sigmoid"]}  # `preference.loss` -> TRL's `DPOConfig.loss_type`


@functools.cache
def preference_trainer() -> type:
    """The lifecycle's `LengthBucketTrainer` with TRL's `DPOTrainer` as its training step (defined on first use:
    importing this module does not load TRL)."""
    from trl import DPOConfig, DPOTrainer

    from afinar.training.trainer import LengthBucketTrainer

    class PreferenceTrainer(LengthBucketTrainer, DPOTrainer):
        """TRL's DPO loss, reference and metrics; afinar's batches (grouped by length, held-out rows in order),
        data (tokenized by `data.preference`) and model (LoRA applied by the lifecycle). Nothing is sent anywhere:
        TRL's telemetry and its model-card drafts in the checkpoints are off (afinar writes its own card)."""

        arguments_class = DPOConfig

        def __init__(self, *, preprocess_logits_for_metrics=None, compute_loss_func=None, **kwargs):
            super().__init__(**kwargs)  # DPO computes its own loss and logs its own metrics
            model = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(model, "peft_config", {}):
                # TRL copies a LoRA adapter it is handed into a frozen "ref" adapter, for adapters trained before;
                # ours is new (its B matrices are zero), so the adapter-disabled model is the same reference with
                # no second adapter to run or keep
                model.delete_adapter("ref")

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if eval_dataset is None:  # validation during training: the reference's side is the same every time
                self.eval_dataset = with_reference(self, self.eval_dataset)
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # a batch of held-out pairs brings its reference log-probabilities (`with_reference`); training
            # batches have the reference computed as they go, as TRL does without `precompute_ref_log_probs`
            self.precompute_ref_logps = "ref_chosen_logps" in inputs
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already `prompt_ids`, `chosen_ids`, `rejected_ids`: the prompt fitted, never the answers

        def _send_telemetry(self):
            pass

        def create_model_card(self, *args, **kwargs):
            pass

    return PreferenceTrainer


def _log_probs(trainer, dataset, reference: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's summed log-probability of its chosen and of its rejected answer (their tokens after the prompt,
    end of turn included), in `dataset`'s row order, under the model `trainer` holds or under its reference (the
    model with its adapters disabled, or TRL's frozen copy)."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(dataset):
            batch = {key: value.to(trainer.args.device) for key, value in batch.items()
                     if key not in ("ref_chosen_logps", "ref_rejected_logps")}
            if reference:
                pair = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
            else:
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                with trainer.accelerator.autocast():
                    per_token = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=labels, fused_lm_head=True, use_cache=False).log_probs  # TRL's head
                pair = per_token[:, -(labels.size(1) - 1):].sum(1).chunk(2)
            chosen.append(pair[0].float().cpu().numpy())
            rejected.append(pair[1].float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(chosen), np.concatenate(rejected)


def with_reference(trainer, dataset):
    """`dataset` with its reference log-probabilities as columns (TRL's `ref_chosen_logps`, `ref_rejected_logps`),
    computed once: the reference never changes, so each later evaluation of these pairs runs the policy alone."""
    if "ref_chosen_logps" in dataset.column_names:
        return dataset
    chosen, rejected = _log_probs(trainer, dataset, reference=True)
    return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())


def pair_log_probs(trainer, dataset) -> dict[str, np.ndarray]:
    """The four log-probabilities `evaluation.preference.preference_report` reads, per pair of `dataset` (which
    `with_reference` gives its reference columns first)."""
    dataset = with_reference(trainer, dataset)
    chosen, rejected = _log_probs(trainer, dataset, reference=False)
    return {"policy_chosen": chosen, "policy_rejected": rejected,
            "reference_chosen": np.asarray(dataset["ref_chosen_logps"]),
            "reference_rejected": np.asarray(dataset["ref_rejected_logps"])}


def greedy_answers(generator: Generator, prompts: list[chat.Messages], max_new_tokens: int) -> list[str]:
    return [a.strip() for a in generator.greedy_answers(
        [generator.format.chat_ids(generator.tokenizer, p) for p in prompts], max_new_tokens)]


def sample_generations(config: Config, run: Run, base_model: str, checked: CheckedPairs, tokenizer) -> list[dict]:
    """Greedy answers of the base and the tuned model to a seeded sample of `preference.generations` test (else
    validation) prompts, each cut from the left as training cut it, beside the two answers of the pair."""
    prefs = config.preference
    split = "test" if "test" in checked.pairs else "validation"
    pairs = checked.pairs[split]
    shown = random.Random(config.train.seed).sample(pairs, min(prefs.generations, len(pairs)))
    fitted = [(p, chat.fit_prompt_left(tokenizer, p.prompt, config.data.max_length - prefs.generation_tokens))
              for p in shown]
    fitted = [(p, f) for p, f in fitted if f is not None]
    if not fitted:
        return []
    prompts = [f for _, f in fitted]
    tuned = Generator.for_run(run, chat_prompts=True)
    after = greedy_answers(tuned, prompts, prefs.generation_tokens)
    base = Generator(dataclasses.replace(config.model, name=base_model), tuned.format)
    del tuned
    base.tokenizer.chat_template = tokenizer.chat_template  # the template training rendered through
    before = greedy_answers(base, prompts, prefs.generation_tokens)
    return [{"split": split, "row": p.row, "prompt": chat.prompt_text(f)[-600:], "chosen": p.chosen,
             "rejected": p.rejected, "before": b, "after": a} for (p, f), b, a in zip(fitted, before, after)]


@dataclass
class _Prepared:
    checked: CheckedPairs
    tokenizer: object  # with the chat template training rendered through


class Preference(LanguageModelTask):
    """Preference tuning with DPO: pairs of answers, the policy moved toward the chosen ones against a reference."""

    name = "preference"
    chat_prompts = True
    best_model_metrics = ("loss",)
    card_metrics = ("accuracy",)
    preprocess_logits_for_metrics = None

    def configure(self, config: Config) -> list[str]:
        return (adapters_by_default(config, "preference tuning trains adapters by default, the reference is the "
                                            "model with them disabled, merged on save")
                + loss_picks_the_best(config, "the held-out DPO loss picks the best checkpoint"))

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        chat.template_of(tokenizer)
        checked = checked_pairs(config, tokenizer, with_test)
        log.info("%s", format_checked(checked))
        manifest = {"data": {"sources": checked.sources, "sha256": checked.fingerprints, "format": checked.kind,
                             "pairs": {name: len(ps) for name, ps in checked.pairs.items()},
                             "refused": {name: len(rows) for name, rows in checked.refused.items()}},
                    "chat_template_sha256": chat.template_digest(tokenizer)}
        return TaskData(checked.datasets["train"], checked.datasets["validation"], checked.datasets.get("test"),
                        manifest, list(checked.notes), checked.report_dict(), _Prepared(checked, tokenizer))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        return load_causal_lm(config.model, model_path, tokenizer)

    def collator(self, tokenizer):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        return DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)

    def trainer_class(self):
        return preference_trainer()

    def trainer_arguments(self, config: Config) -> dict:
        return {"beta": config.preference.beta, "loss_type": DPO_LOSS_TYPES[config.preference.loss],
                "max_length": None,  # pairs arrive fitted to data.max_length; TRL would cut the answers' ends
                "activation_checkpointing": False,  # TRL turns it on: it trades speed for memory a CPU has
                "precompute_ref_log_probs": False, "pad_to_multiple_of": None}

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        """Every held-out pair under the best model and the reference, once."""
        scores = {}
        validation = trainer.eval_dataset if trainer.eval_dataset is not None else data.validation
        for name, ds in (("validation", validation), ("test", data.test)):
            if ds is not None:
                scores[name] = preference_report(**pair_log_probs(trainer, ds), beta=trainer.beta)
                log.info("%s", "\n".join(report_lines(name, scores[name])))
        return scores

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        prepared: _Prepared = data.extra
        tokenizer = prepared.tokenizer
        # chat prompts through the template alone (no BOS of their own), answers ended by the template's EOS
        GenerationFormat(chat=True, bos=False, eos_token=tokenizer.eos_token).save(run.model_dir)
        metrics["generations"] = sample_generations(config, run, model_path, prepared.checked, tokenizer)
        validation = prepared.checked.pairs["validation"]
        domain = "\n\n".join(tokenizer.apply_chat_template([*p.prompt, {"role": "assistant", "content": p.chosen}],
                                                           tokenize=False) for p in validation)
        general = forgetting.general_corpus(config.lm)
        result = forgetting.measure_forgetting(model_path, run.model_dir, domain, general.text, config.lm,
                                               config.model, batch_size=config.train.eval_batch_size or
                                               config.train.batch_size)
        result["general_source"] = general.source
        result["domain_source"] = "the validation conversations with their chosen answers"
        metrics["forgetting"] = result
        metrics["data"] = {**prepared.checked.stats, "refused": {name: len(rows) for name, rows in
                                                                 prepared.checked.refused.items()}}

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        return preference_summary(config, metrics, data.notes)

    # ---------------------------------------------------------------- after training

    def result_lines(self, metrics: dict) -> list[str]:
        lines = [line for split in ("validation", "test") if metrics.get(split)
                 for line in report_lines(split, metrics[split])]
        return lines + (forgetting_lines(metrics["forgetting"]) if metrics.get("forgetting") else [])

    def metrics_html(self, metrics: dict) -> str:
        lines = [line for split in ("validation", "test") if metrics.get(split)
                 for line in report_lines(split, metrics[split])]
        return f"<pre>{html.escape(chr(10).join(lines))}</pre>" + pages.forgetting_html(metrics)

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        generations = metrics.get("generations") or []
        if not generations:
            return []
        rows = "".join("<tr>" + "".join(f"<td class='text'>{html.escape(g[key][:400])}</td>" for key in
                                        ("prompt", "chosen", "rejected", "before", "after")) + "</tr>"
                       for g in generations)
        return [f"<h2>Sample generations ({generations[0]['split']} prompts, greedy): base model before, tuned "
                f"after</h2><table><tr><th class='text'>prompt (its end)</th><th class='text'>chosen</th>"
                f"<th class='text'>rejected</th><th class='text'>before</th><th class='text'>after</th></tr>"
                f"{rows}</table>"]

    def check(self, config: Config) -> tuple[str, dict]:
        tokenizer = load_tokenizer(config.model)
        chat.template_of(tokenizer)
        checked = checked_pairs(config, tokenizer)
        return format_checked(checked), checked.report_dict()


def preference_summary(config: Config, metrics: dict, notes: list[str]) -> str:
    t = metrics["train"]
    lines = [f"# {config.model.name} on {config.data.source} (preference tuning, {config.preference.loss}, beta "
             f"{config.preference.beta})", "",
             f"- training: {t['seconds']:.0f} s, {t['steps']} steps, {t['trainable_parameters']:,} trainable "
             f"parameters" + (" (LoRA, merged; reference: the adapters disabled)" if config.lora.enabled else ""),
             ""]
    for split in ("validation", "test"):
        if metrics.get(split):
            lines += [*report_lines(split, metrics[split]), ""]
    f = metrics["forgetting"]
    lines += ["| text | perplexity before | after | ratio |", "|---|---|---|---|"]
    for name, label in (("domain", "validation conversations (chosen answers)"), ("general", f["general_source"])):
        lines.append(f"| {label} | {f[name]['base_perplexity']:.2f} | {f[name]['tuned_perplexity']:.2f} | "
                     f"{f[name]['ratio']:.3f} |")
    lines += ["", f"**{'FORGETTING' if f['forgetting'] else 'no forgetting'}** (threshold lm.forgetting_ratio="
                  f"{config.lm.forgetting_ratio})", "", "## Sample generations (greedy; base model -> tuned)", ""]
    for g in metrics.get("generations", []):
        lines += [f"- prompt (its end): {g['prompt'][-200:]!r}", f"  - chosen: {g['chosen'][:200]!r}",
                  f"  - rejected: {g['rejected'][:200]!r}", f"  - before: {g['before'][:200]!r}",
                  f"  - after: {g['after'][:200]!r}"]
    lines += ["", "Notes:"] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
