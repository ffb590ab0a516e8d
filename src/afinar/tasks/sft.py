"""Instruction tuning (`task: sft`): prompt -> response conversations, the loss on the assistant's tokens only.

`SFT` is the run lifecycle's third task (`afinar.training.lifecycle`): conversations (`chat` reads every format) are
checked like labelled rows (on the prompts, or on the texts of classification data given through
`sft.template`), carved and subset; rendered through the model's chat template with the loss mask of
`chat.encode`, and batched by TRL's `DataCollatorForLanguageModeling` (right padding, -100 labels on the
padding). LoRA is on unless `lora.enabled=false`. The best checkpoint is the one with the lowest validation loss
on responses. When the responses come from a small fixed set (labels), each held-out prompt is also scored by
the log-probability of every label's continuation (accuracy, constrained), and free generations are checked
for how often they produce a valid label. The saved model folder holds the exact chat template it trained with,
and beside it the generation format (`inference.generation`): the system prompt and `sft.template` that wrapped
the user text, so `afinar generate`, the server and the in-run generations render prompts as training did.

Why not TRL's `SFTTrainer`: it owns dataset preparation, LoRA wrapping and the `Trainer` itself, which the one
lifecycle already owns for every task (precision, resume, CPU speed-ups, best model); its completion-only
masking for prompt/completion data is the rendering-prefix method used here, and its assistant-only masking
needs `{% generation %}` markers that SmolLM2's template lacks.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.models import cache_argument, load_causal_lm, load_tokenizer, returned_cache
from afinar.core.runs import Run, read_json
from afinar.data import chat
from afinar.data.checks import DataReport, apply_policies, format_report, run_checks_cached
from afinar.data.sources import (
    Splits,
    prepare_splits,
    read_splits,
    split_frames,
)
from afinar.evaluation import forgetting
from afinar.evaluation.generated import METRIC_KEYS, generation_report, paired_gain
from afinar.evaluation.metrics import classification_report, with_interval
from afinar.inference.generation import GenerationFormat, Generator
from afinar.reporting import pages
from afinar.tasks.causal_lm import LanguageModelTask, adapters_by_default, held_out_losses, loss_picks_the_best
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

__all__ = ["SFT", "LabelScores", "label_log_probs"]

MARK_OPEN, MARK_CLOSE = "[[", "]]"  # around the tokens the loss sees, in the data report's examples


# ---------------------------------------------------------------- data


def _chat_template(config: Config, tokenizer) -> None:
    """`sft.chat_template` (text or a file) replaces the tokenizer's; without either, afinar's default."""
    given = config.sft.chat_template
    if given:
        path = Path(given).expanduser()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.is_file() \
            else given
    chat.template_of(tokenizer)


def _rows(conversations: list[chat.Messages], texts: list[str] | None = None, labels: list[int] | None = None,
          references: list[list[str]] | None = None) -> Dataset:
    """The columns the checks read (`text`: the prompt, or the classified text; `label`) plus the conversation and
    its reference answers (the answer itself unless the data has several)."""
    references = references or [[chat_answer(c)] for c in conversations]
    return Dataset.from_dict({"text": texts if texts is not None else [chat.prompt_text(c) for c in conversations],
                              "label": labels if labels is not None else [0] * len(conversations),
                              "messages": [json.dumps(c, ensure_ascii=False) for c in conversations],
                              "references": [json.dumps(r, ensure_ascii=False) for r in references]})


def labels_as_instructions(config: Config) -> bool:
    """Labelled classification data given as instructions (`sft.template` without `sft.prompt_column`)."""
    return bool(config.sft.template) and not config.sft.prompt_column


def read_conversation_splits(config: Config, with_test: bool = True) -> tuple[Splits, str]:
    """Conversations per split (in a `messages` JSON column) and the format they came in."""
    args = config.data
    if labels_as_instructions(config):
        splits = read_splits(args, with_test)
        datasets = {}
        for name, ds in splits.items():
            columns = ds[:]
            datasets[name] = _rows(chat.from_labels(columns["text"], columns["label"], splits.label_names,
                                                    config.sft.template, config.sft.system),
                                   columns["text"], columns["label"])
        return Splits(datasets["train"], datasets.get("validation"), datasets.get("test"), splits.label_names,
                      splits.sources, splits.fingerprints, []), "classification via sft.template"
    frames, sources, fingerprints = split_frames(args, with_test)
    if config.sft.prompt_column:
        kind = f"columns {config.sft.prompt_column} -> {config.sft.response_column or config.sft.reference_columns}"
        sft = config.sft
        datasets = {}
        for name, frame in frames.items():
            conversations, references = chat.from_columns(frame, sources[name], sft.prompt_column,
                                                          sft.response_column, sft.reference_columns, sft.template,
                                                          sft.system)
            datasets[name] = _rows(conversations, references=references)
    else:
        kind = chat.detect_format([str(c) for c in frames["train"].columns])
        datasets = {name: _rows(chat.conversations(frame, sources[name], config.sft.system))
                    for name, frame in frames.items()}
    return Splits(datasets["train"], datasets.get("validation"), datasets.get("test"), ["response"], sources,
                  fingerprints, []), kind


def _messages(ds: Dataset) -> list[chat.Messages]:
    return [json.loads(m) for m in ds["messages"]]


def detect_label_set(splits: Splits, config: Config) -> list[str] | None:
    """The answers, when they come from a small fixed set that covers every held-out answer; else None."""
    if labels_as_instructions(config):
        return list(splits.label_names)
    answers = {name: [chat_answer(m) for m in _messages(ds)] for name, ds in splits.items()}
    values = sorted(set(answers["train"]))
    held_out = [a for name, ans in answers.items() if name != "train" for a in ans]
    if len(values) <= config.sft.label_set_max and set(held_out) <= set(values):
        return values
    return None


def chat_answer(messages: chat.Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "assistant")


def _encode_split(tokenizer, conversations: list[chat.Messages], max_length: int, name: str
                  ) -> tuple[Dataset, dict]:
    """Tokens and masked labels; prompts shortened to fit, answers cut, and rows whose answer truncation leaves
    empty (dropped) are counted."""
    encoded = [chat.encode(tokenizer, c, max_length) for c in conversations]
    kept = [e for e in encoded if e.trained > 0]
    lengths = np.array([len(e.input_ids) for e in encoded] or [0])
    stats = {"rows": len(encoded), "dropped_empty_answer": len(encoded) - len(kept),
             "answers_cut": sum(e.cut for e in encoded), "prompts_shortened": sum(e.shortened for e in encoded),
             "tokens_p50": int(np.percentile(lengths, 50)),
             "tokens_p95": int(np.percentile(lengths, 95)), "tokens_max": int(lengths.max()),
             "trained_tokens": sum(e.trained for e in kept)}
    if not kept:
        raise AfinarError(f"{name}: every answer is cut away at data.max_length={max_length} tokens; raise it")
    return Dataset.from_dict({"input_ids": [e.input_ids for e in kept], "labels": [e.labels for e in kept]}), stats


def marked_example(tokenizer, messages: chat.Messages, max_length: int) -> str:
    """The rendered conversation with the trained tokens between [[ and ]]: what the loss sees."""
    encoded = chat.encode(tokenizer, messages, max_length)
    pieces, span, trained = [], [], False
    for token, label in zip(encoded.input_ids, encoded.labels):
        if (label != chat.IGNORE) != trained:
            pieces.append(tokenizer.decode(span) + (MARK_CLOSE if trained else ""))
            span, trained = [], label != chat.IGNORE
            pieces.append(MARK_OPEN if trained else "")
        span.append(token)
    pieces.append(tokenizer.decode(span) + (MARK_CLOSE if trained else ""))
    return "".join(pieces)


@dataclass
class CheckedConversations:
    """What instruction tuning trains on, and what `afinar check` shows of it."""

    splits: Splits  # checked, carved, subset; conversations in the `messages` column
    report: DataReport  # the usual checks, on the prompts (or the classified texts)
    kind: str  # the format the data came in
    labels: list[str] | None  # the answers' label set, if they have one
    datasets: dict[str, Dataset]  # tokens and masked labels per split
    stats: dict[str, dict]  # per split: token lengths, answers cut by max_length, rows dropped
    examples: list[str]  # two training conversations with the trained tokens marked

    def report_dict(self) -> dict:
        return {**self.report.to_dict(), "sft": {"format": self.kind, "tokens": self.stats,
                                                 "examples": self.examples, "label_set": self.labels}}


def checked_conversations(config: Config, tokenizer, with_test: bool = True) -> CheckedConversations:
    """Read, check (`checks.on_*` policies on train), carve and subset the conversations, then tokenize them
    through the chat template with the loss mask."""
    _chat_template(config, tokenizer)
    raw, kind = read_conversation_splits(config, with_test)
    report = run_checks_cached(raw, config.checks, None, None)
    splits = prepare_splits(apply_policies(raw, report, config.checks), config.data, config.train.seed)
    datasets, stats = {}, {}
    for name, ds in splits.items():
        datasets[name], stats[name] = _encode_split(tokenizer, _messages(ds), config.data.max_length, name)
    examples = [marked_example(tokenizer, m, config.data.max_length) for m in _messages(splits.train)[:2]]
    return CheckedConversations(splits, report, kind, detect_label_set(splits, config), datasets, stats, examples)


def format_checked(checked: CheckedConversations) -> str:
    """The checks' table, the token profile per split and the two marked examples, as text."""
    lines = [f"data checks ({checked.kind}; on the prompts, or the texts of classification data):",
             format_report(checked.report), "", "tokens per conversation (chat template applied):"]
    for name, s in checked.stats.items():
        lines.append(f"  {name}: p50 {s['tokens_p50']}, p95 {s['tokens_p95']}, max {s['tokens_max']}; prompts "
                     f"shortened to fit data.max_length {s['prompts_shortened']:,}, answers cut by it "
                     f"{s['answers_cut']:,}, rows dropped (no answer left) {s['dropped_empty_answer']:,}")
    if checked.labels:
        lines.append(f"answers come from a label set: {', '.join(checked.labels)}")
    for example in checked.examples:
        lines += ["", f"what the loss sees (trained tokens between {MARK_OPEN} and {MARK_CLOSE}):", example]
    return "\n".join(lines)


# ---------------------------------------------------------------- label continuation scoring


@dataclass
class LabelScores:
    """Each prompt's log-probability of each label, and what fitting the prompts into `max_length` did."""

    scores: np.ndarray  # (prompts x labels); NaN on a skipped row
    shortened: int  # prompts whose user text was shortened to fit (`chat.fit_prompt`)
    skipped: np.ndarray  # bool per prompt: it cannot fit even shortened, so it is not scored

    @property
    def predictions(self) -> np.ndarray:
        """argmax over labels, for the scored rows only."""
        return self.scores[~self.skipped].argmax(axis=1)


def _label_continuations(tokenizer, prompt: chat.Messages, labels: list[str]) -> tuple[list[int], list[list[int]]]:
    before = chat.render_ids(tokenizer, prompt, generation_prompt=True)
    return before, [chat.encode(tokenizer, [*prompt, {"role": "assistant", "content": label}], 10**9
                                ).input_ids[len(before):] for label in labels]


def label_log_probs(model, tokenizer, prompts: list[chat.Messages], labels: list[str], max_length: int,
                    batch_size: int = 16) -> LabelScores:
    """Summed log-probability of each label's assistant turn (its tokens and end of turn, exactly as training
    renders them) after each prompt: constrained scoring, no free text.

    Every prompt is scored whole, generation prompt included: one too long for `max_length` with its longest
    label has its user text shortened (`chat.fit_prompt`, as training shortens it to fit its own answer, so a
    scored prompt is cut at most by the longest label's extra tokens more); one that cannot fit even then is
    skipped and counted, never scored on a cut prompt (whose last tokens would be the prompt's, the same for
    every label). Each prompt is run once (left-padded, positions from the mask) and its key/value cache reused
    for every label's continuation, so scoring C labels costs one prompt pass plus C short ones."""
    import copy

    import torch

    rows = []  # per prompt: its rendered ids and each label's continuation ids
    shortened = 0
    skipped = np.zeros(len(prompts), dtype=bool)
    for index, prompt in enumerate(prompts):
        before, continuations = _label_continuations(tokenizer, prompt, labels)
        longest = max(len(c) for c in continuations)
        if len(before) + longest > max_length:
            fitted = chat.fit_prompt(tokenizer, prompt, max_length - longest)
            skipped[index] = fitted is None
            if fitted is None:
                continue
            shortened += 1
            before, continuations = _label_continuations(tokenizer, fitted, labels)
        rows.append((before, continuations))
    scored = np.flatnonzero(~skipped)
    scores = np.full((len(prompts), len(labels)), np.nan)
    if not rows:
        return LabelScores(scores, shortened, skipped)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            width = max(len(rows[i][0]) for i in chosen)
            ids = torch.tensor([[pad] * (width - len(rows[i][0])) + rows[i][0] for i in chosen], device=device)
            mask = torch.tensor([[0] * (width - len(rows[i][0])) + [1] * len(rows[i][0]) for i in chosen],
                                device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            first = torch.log_softmax(out.logits[:, -1].float(), -1)
            for j in range(len(labels)):
                tails = [rows[i][1][j] for i in chosen]
                length = max(len(t) for t in tails)
                tail_ids = torch.tensor([t + [pad] * (length - len(t)) for t in tails], device=device)
                tail_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in tails], device=device)
                total = first.gather(-1, tail_ids[:, :1]).squeeze(-1)
                if length > 1:
                    step = model(input_ids=tail_ids, attention_mask=torch.cat([mask, tail_mask], -1),
                                 position_ids=positions[:, -1:] + 1 + torch.arange(length, device=device),
                                 use_cache=True, **{cache_argument(model): copy.deepcopy(returned_cache(out))})
                    following = torch.log_softmax(step.logits[:, :-1].float(), -1)
                    picked = following.gather(-1, tail_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                    total = total + (picked * tail_mask[:, 1:]).sum(-1)
                scores[scored[chosen], j] = total.cpu().numpy()
    model.train(was_training)
    return LabelScores(scores, shortened, skipped)


def _label_report(model, tokenizer, ds: Dataset, labels: list[str], max_length: int, batch_size: int) -> dict:
    """The classification report on the rows that could be scored whole, with how many prompts were shortened
    and how many rows were skipped (the report's figures are over `scored_rows`, not the split)."""
    conversations = _messages(ds)
    gold = np.array([labels.index(chat_answer(c)) for c in conversations])
    scored = label_log_probs(model, tokenizer, [chat.prompt_of(c) for c in conversations], labels, max_length,
                             batch_size)
    if len(conversations) and scored.skipped.all():
        raise AfinarError(f"no prompt fits data.max_length={max_length} with its answer, even with its text "
                          f"shortened (the system prompt and template alone are too long); raise data.max_length")
    return {**classification_report(gold[~scored.skipped], scored.predictions, labels),
            "scored_rows": int((~scored.skipped).sum()), "prompts_shortened": scored.shortened,
            "rows_skipped": int(scored.skipped.sum())}


# ---------------------------------------------------------------- generation


def generate_answers(generator: Generator, prompts: list[chat.Messages], max_new_tokens: int) -> list[str]:
    """Greedy answers from the saved model, each prompt rendered as `afinar generate` and the server render it."""
    return [answer.strip() for answer in generator.greedy_answers(
        [generator.format.chat_ids(generator.tokenizer, prompt) for prompt in prompts], max_new_tokens)]


def fitted_prompts(tokenizer, conversations: list[chat.Messages], max_length: int, new_tokens: int
                   ) -> tuple[list[chat.Messages | None], list[chat.Messages]]:
    """Each conversation's prompt shortened as training shortened it (`chat.fit_prompt`), so that prompt and
    `new_tokens` fit `max_length` (None: it cannot), and the prompts as asked."""
    budget = max_length - new_tokens
    if budget <= 0:
        raise AfinarError(f"{new_tokens} new tokens leave no room for a prompt in data.max_length={max_length}; raise "
                          f"data.max_length")
    asked = [chat.prompt_of(c) for c in conversations]
    return [chat.fit_prompt(tokenizer, p, budget) for p in asked], asked


def score_generations(config: Config, generator: Generator, base_model: str, name: str, ds: Dataset) -> dict:
    """`sft.metrics` on greedy generations of split `name`'s prompts by the tuned model and by the base model it
    started from (zero-shot: the same prompts, template and system prompt), and the gain, paired by row."""
    limit = config.sft.metric_new_tokens
    fitted, asked = fitted_prompts(generator.tokenizer, _messages(ds), config.data.max_length, limit)
    kept = [i for i, f in enumerate(fitted) if f is not None]
    prompts = [fitted[i] for i in kept]
    references = [json.loads(ds["references"][i]) for i in kept]
    started = time.perf_counter()
    tuned = generate_answers(generator, prompts, limit)
    base = Generator(dataclasses.replace(config.model, name=base_model), generator.format)
    base.tokenizer.chat_template = generator.tokenizer.chat_template  # the template training rendered through
    zero_shot = generate_answers(base, prompts, limit)
    del base
    out = {"split": name, "rows": len(prompts), "max_new_tokens": limit, "rows_skipped": len(asked) - len(kept),
           "prompts_shortened": sum(fitted[i] != asked[i] for i in kept),
           "seconds": round(time.perf_counter() - started, 1),
           "examples": [{"prompt": chat.prompt_text(p)[:500], "references": r, "tuned": t, "zero_shot": z}
                        for p, r, t, z in list(zip(prompts, references, tuned, zero_shot))[:3]]}
    for metric in config.sft.metrics:
        tuned_report = generation_report(metric, tuned, references)
        zero_shot_report = generation_report(metric, zero_shot, references)
        out[metric] = {"tuned": tuned_report, "zero_shot": zero_shot_report,
                       "gain": paired_gain(zero_shot_report, tuned_report)}
    return out


def generation_score_lines(scores: dict) -> list[str]:
    """One line per metric key: tuned [CI], zero-shot [CI], paired gain [CI]."""
    lines = [f"{scores['split']} generations ({scores['rows']:,} prompts, {scores['prompts_shortened']:,} shortened to "
             f"fit data.max_length, {scores['rows_skipped']:,} skipped; greedy, at most {scores['max_new_tokens']} new "
             f"tokens), fine-tuned vs the base model zero-shot:"]
    for metric in (m for m in METRIC_KEYS if m in scores):
        tuned, zero, gain = scores[metric]["tuned"], scores[metric]["zero_shot"], scores[metric]["gain"]
        for key in METRIC_KEYS[metric]:
            lines.append(f"  {key}: {with_interval(tuned, key)} vs {with_interval(zero, key)}; gain "
                         f"{gain[key]['delta']:+.4f} [{gain[key]['ci95'][0]:+.4f}, {gain[key]['ci95'][1]:+.4f}] paired")
    return lines


# ---------------------------------------------------------------- the task


@dataclass
class _Prepared:
    splits: Splits
    labels: list[str] | None
    stats: dict
    tokenizer: object  # with the chat template training rendered through
    max_length: int
    batch_size: int  # for scoring label continuations


class SFT(LanguageModelTask):
    """Instruction tuning: conversations through the chat template, the loss on the assistant's tokens."""

    name = "sft"
    chat_prompts = True

    def configure(self, config: Config) -> list[str]:
        return (adapters_by_default(config, "instruction tuning trains adapters by default, merged on save")
                + loss_picks_the_best(config, "the validation loss on responses picks the best checkpoint"))

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        checked = checked_conversations(config, tokenizer, with_test)
        splits, stats = checked.splits, checked.stats
        notes = list(splits.notes)
        for name, s in stats.items():
            if s["prompts_shortened"]:
                notes.append(f"{name}: {s['prompts_shortened']:,} prompts had their text shortened (middle cut) to "
                             f"fit data.max_length={config.data.max_length} with their whole answer")
            if s["dropped_empty_answer"] or s["answers_cut"]:
                notes.append(f"{name}: {s['answers_cut']:,} answers cut at data.max_length={config.data.max_length}"
                             f" tokens, {s['dropped_empty_answer']:,} rows dropped because nothing of the answer "
                             f"remained")
        log.info("%s", format_checked(checked))
        manifest = {"data": {"sources": splits.sources, "sha256": splits.fingerprints, "format": checked.kind,
                             "rows": {name: len(ds) for name, ds in checked.datasets.items()},
                             "label_set": checked.labels},
                    "chat_template_sha256": chat.template_digest(tokenizer)}
        return TaskData(checked.datasets["train"], checked.datasets["validation"], checked.datasets.get("test"),
                        manifest, notes, checked.report_dict(),
                        _Prepared(splits, checked.labels, stats, tokenizer, config.data.max_length,
                                  config.train.eval_batch_size or config.train.batch_size))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        return load_causal_lm(config.model, model_path, tokenizer)

    def collator(self, tokenizer):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        prepared: _Prepared = data.extra
        scores = held_out_losses(trainer, data.validation, data.test)
        for name in scores:
            if prepared.labels:
                split = getattr(prepared.splits, name)
                started = time.perf_counter()
                scores[name].update(_label_report(trainer.model, prepared.tokenizer, split, prepared.labels,
                                                  prepared.max_length, prepared.batch_size))
                scores[name]["texts_per_second"] = scores[name]["scored_rows"] / max(time.perf_counter() - started,
                                                                                  1e-9)
        return scores

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        prepared: _Prepared = data.extra
        # what every training prompt was: `chat.encode` renders through the template alone (no BOS of its own)
        GenerationFormat(chat=True, system=config.sft.system, template=config.sft.template,
                         labels=list(prepared.splits.label_names) if labels_as_instructions(config) else [],
                         bos=False,
                         eos_token=prepared.tokenizer.eos_token).save(run.model_dir)
        generator = Generator.for_run(run, self.chat_prompts)
        tokenizer = generator.tokenizer
        validation = _messages(prepared.splits.validation)
        shown, prompts = self._fitting(tokenizer, validation[:config.sft.generation_samples], config,
                                       config.sft.max_new_tokens)
        answers = generate_answers(generator, prompts, config.sft.max_new_tokens)
        metrics["generations"] = [{"prompt": chat.prompt_text(p), "expected": chat_answer(c),
                                   "generated": a} for c, p, a in zip(shown, prompts, answers)]
        if prepared.labels:
            longest = max(len(tokenizer(label)["input_ids"]) for label in prepared.labels) + 2
            sample, prompts = self._fitting(tokenizer, random.Random(config.train.seed).sample(
                validation, min(config.sft.validity_samples, len(validation))), config, longest)
            free = generate_answers(generator, prompts, longest)
            valid = [a.strip().strip(".").lower() in {label.lower() for label in prepared.labels} for a in free]
            right = [a.strip().strip(".").lower() == chat_answer(c).lower() for a, c in zip(free, sample)]
            metrics["free_generation"] = {"rows": len(sample), "valid_label_rate": float(np.mean(valid)),
                                          "accuracy": float(np.mean(right))}
        if config.sft.metrics:
            name = "test" if prepared.splits.test is not None else "validation"
            metrics["generation_scores"] = score_generations(config, generator, model_path, name,
                                                             getattr(prepared.splits, name))
            log.info("%s", "\n".join(generation_score_lines(metrics["generation_scores"])))
        del generator
        domain = "\n\n".join(tokenizer.apply_chat_template(c, tokenize=False) for c in validation)
        general = forgetting.general_corpus(config.lm)
        result = forgetting.measure_forgetting(model_path, run.model_dir, domain, general.text, config.lm,
                                               config.model, batch_size=config.train.eval_batch_size or
                                               config.train.batch_size)
        result["general_source"] = general.source
        metrics["forgetting"] = result
        metrics["data"] = prepared.stats

    @staticmethod
    def _fitting(tokenizer, conversations: list[chat.Messages], config: Config, new_tokens: int
                 ) -> tuple[list[chat.Messages], list[chat.Messages]]:
        """The conversations whose prompt fits with `new_tokens` (as training fitted them), and those prompts."""
        fitted, _ = fitted_prompts(tokenizer, conversations, config.data.max_length, new_tokens)
        kept = [(c, f) for c, f in zip(conversations, fitted) if f is not None]
        return [c for c, _ in kept], [f for _, f in kept]

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        return sft_summary(config, metrics, data.notes)

    def result_lines(self, metrics: dict) -> list[str]:
        scores = metrics.get("generation_scores")
        return super().result_lines(metrics) + (generation_score_lines(scores) if scores else [])

    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        checked = checked_conversations(config, load_tokenizer(config.model))
        return format_checked(checked), checked.report_dict()

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        data_report = run.path / "data_report.json"
        examples = ((read_json(data_report) if data_report.is_file() else {}).get("sft") or {}).get("examples")
        free = metrics.get("free_generation")
        return (pages.confusion_sections(metrics)
                + ([f"<p>Free generation on {free['rows']} validation prompts: {free['valid_label_rate']:.1%} valid "
                    f"labels, {free['accuracy']:.1%} right.</p>"] if free else [])
                + ([f"<h2>Generation scores</h2><pre>{html.escape(chr(10).join(generation_score_lines(scores)))}"
                    f"</pre>"] if (scores := metrics.get("generation_scores")) else [])
                + pages.generations_sections(metrics, examples))


def sft_summary(config: Config, metrics: dict, notes: list[str]) -> str:
    t, v = metrics["train"], metrics["validation"]
    lines = [f"# {config.model.name} on {config.data.source} (instruction tuning)", "",
             f"- training: {t['seconds']:.0f} s, {t['steps']} steps, {t['trainable_parameters']:,} trainable "
             f"parameters" + (" (LoRA, merged)" if config.lora.enabled else ""),
             f"- validation loss on responses (best model): {v['loss']:.4f} (perplexity {v['perplexity']:.2f})"]
    for split in ("validation", "test"):
        if "accuracy" in metrics.get(split, {}):
            scored = metrics[split]
            lines.append(f"- {split} accuracy by label continuation: {scored['accuracy']:.4f} (macro-F1 "
                         f"{scored['macro_f1']:.4f}) on {scored['scored_rows']:,} rows, every prompt whole with its "
                         f"generation prompt ({scored['prompts_shortened']:,} had their text shortened to fit, "
                         f"{scored['rows_skipped']:,} could not fit and were skipped)")
    free = metrics.get("free_generation")
    if free:
        lines.append(f"- free generation on {free['rows']} validation prompts: {free['valid_label_rate']:.1%} valid "
                     f"labels, {free['accuracy']:.1%} right")
    if scores := metrics.get("generation_scores"):
        lines += ["", *generation_score_lines(scores), ""]
        for example in scores["examples"]:
            lines += [f"- prompt: {example['prompt'][:200]!r}", f"  - reference: {example['references'][0][:200]!r}",
                      f"  - fine-tuned: {example['tuned'][:200]!r}", f"  - zero-shot: {example['zero_shot'][:200]!r}"]
    f = metrics["forgetting"]
    lines += ["", "| text | perplexity before | after | ratio |", "|---|---|---|---|"]
    for name, label in (("domain", "validation conversations"), ("general", f["general_source"])):
        lines.append(f"| {label} | {f[name]['base_perplexity']:.2f} | {f[name]['tuned_perplexity']:.2f} | "
                     f"{f[name]['ratio']:.3f} |")
    lines += ["", f"**{'FORGETTING' if f['forgetting'] else 'no forgetting'}** (threshold lm.forgetting_ratio="
                  f"{config.lm.forgetting_ratio})", "", "## Sample generations", ""]
    for g in metrics.get("generations", []):
        lines += [f"- prompt: {g['prompt'][:200]!r}", f"  - expected: {g['expected'][:200]!r}",
                  f"  - generated: {g['generated'][:200]!r}"]
    lines += ["", "Notes:"] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)
