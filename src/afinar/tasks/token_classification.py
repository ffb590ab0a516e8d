"""Token classification (`task: token_classification`): named entities and any BIO/IOB2 tagging.

Sentences are read by `data.tagging` (CoNLL, records, hub), their tags checked (the IOB2 scheme, tags that
held-out splits have and train lacks, invalid `I-` transitions, repaired only on `tagging.repair_iob`), and the
sentences checked as texts like every task's rows (empty, damaged, duplicated, leaked exactly or nearly into
validation/test; the `checks.on_*` policies drop train sentences). Long sentences become overlapping windows,
labels sit on first sub-tokens (`DataCollatorForTokenClassification` pads with -100), and the best checkpoint has
the best validation entity F1. Scores are seqeval's strict IOB2 entity figures per sentence, with bootstrap
intervals over sentences (`evaluation.entities`). After training its runs predict, evaluate and serve entities with
character offsets (`inference.spans.EntityTagger`).
"""

from __future__ import annotations

import dataclasses
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from afinar.core.config import Config, DataArgs
from afinar.core.errors import AfinarError
from afinar.core.models import instantiate
from afinar.core.runs import Run
from afinar.data import tagging
from afinar.data.checks import Finding, apply_policies, format_report, run_checks_cached
from afinar.data.sources import carve_rows, subset_list
from afinar.evaluation.diagnosis import Baseline
from afinar.evaluation.entities import entity_report, entity_scores, token_accuracy
from afinar.evaluation.metrics import logits_to_predictions, with_interval
from afinar.reporting import pages
from afinar.tasks.base import NoTestSplit, Task, held_out_predictions
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

EXAMPLES = 8  # test sentences the report shows with their gold and predicted entities
CHECK_SENTENCES = 300  # validation sentences an ONNX export is checked on


@dataclass
class _Prepared:
    splits: tagging.TaggedSplits
    windows: dict[str, tagging.Windows]
    tag_names: list[str]
    report_text: str


class SentenceTags:
    """One split's windows mapped back to its sentences: the predicted tags of each word, from the window that
    owns it. As `Trainer`'s `compute_metrics` (on validation), the entity figures per sentence, the same
    figures the run reports, so the best checkpoint is chosen by what is reported."""

    def __init__(self, windows: tagging.Windows, sentences: list[tagging.Sentence], tag_names: list[str]):
        self.windows, self.sentences, self.tag_names = windows, sentences, tag_names

    def predicted(self, label_ids: np.ndarray, predictions: np.ndarray) -> list[list[str]]:
        """Tags per word of each sentence from per-window predictions (in the windows' order; the labelled
        positions, where `label_ids` is not -100, are the owned words' first sub-tokens)."""
        per_window = [row[labels != tagging.IGNORE].tolist() for labels, row in zip(label_ids, predictions)]
        ids = tagging.words_per_sentence(self.windows, per_window, [len(s.tokens) for s in self.sentences])
        return [[self.tag_names[i] for i in row] for row in ids]

    def __call__(self, eval_prediction) -> dict[str, float]:
        gold = [s.tags for s in self.sentences]
        predicted = self.predicted(np.asarray(eval_prediction.label_ids), np.asarray(eval_prediction.predictions))
        return {**entity_scores(gold, predicted), "accuracy": token_accuracy(gold, predicted)}


def _checked_tags(splits: tagging.TaggedSplits, repair: bool) -> tuple[tagging.TaggedSplits, dict, list[str]]:
    """The scheme checked, unseen held-out tags refused, invalid transitions counted (and repaired on request)."""
    for name, sentences in splits.items():
        if not sentences:
            raise AfinarError(f"{splits.sources.get(name, name)} ({name}) holds no sentences")
        tagging.check_scheme(sentences, f"{splits.sources.get(name, name)} ({name})")
    for name, tags in tagging.unseen_tags(splits).items():
        if tags:
            raise AfinarError(f"{splits.sources.get(name, name)} ({name}): tags {', '.join(tags)} never occur in "
                              f"train, so the model cannot predict them; add training sentences that have them, or "
                              f"map them to O")
    invalid = {name: sum(len(tagging.invalid_transitions(s.tags)) for s in sentences)
               for name, sentences in splits.items()}
    notes = []
    if any(invalid.values()):
        counted = ", ".join(f"{name} {n:,}" for name, n in invalid.items() if n)
        if repair:
            splits = dataclasses.replace(splits, **{name: [tagging.Sentence(s.tokens, tagging.repair_transitions(s.tags))
                                                       for s in sentences] for name, sentences in splits.items()})
            notes.append(f"invalid I- transitions repaired to B- (tagging.repair_iob): {counted}")
        else:
            notes.append(f"invalid I- transitions kept ({counted}): strict IOB2 scoring starts no entity at them; "
                         f"--set tagging.repair_iob=true makes each a B-")
    return splits, invalid, notes


def _repeated_sentences(sentences: list[tagging.Sentence], examples: int) -> Finding:
    """Sentences repeating an earlier one token for token and tag for tag. The row checks' duplicates compare
    normalised text (lowercased, without @mentions and URLs), which would merge `Apple` the company with `apple`
    the fruit and tweets that differ in the very mentions tagged as people."""
    seen: set[tuple] = set()
    rows = []
    for row, sentence in enumerate(sentences):
        key = (tuple(sentence.tokens), tuple(sentence.tags))
        if key in seen:
            rows.append(row)
        seen.add(key)
    return Finding(len(rows), rows, [{"row": i, "text": " ".join(sentences[i].tokens)[:200]} for i in rows[:examples]],
                   {"verbatim": len(rows)})


def checked_sentences(config: Config, with_test: bool = True) -> tuple[tagging.TaggedSplits, dict, str]:
    """What training sees: sentences read, tags checked, the row checks' policies applied to train, validation
    carved when there is none, seeded subsets taken; plus the data report as a dict, and the row checks as text
    (`_tagging_text` writes the record's tagging part)."""
    raw = tagging.read_tagged_splits(config.data, config.tagging, with_test)
    raw, invalid, notes = _checked_tags(raw, config.tagging.repair_iob)
    rows = raw.as_rows()
    report = run_checks_cached(rows, config.checks, None, None)
    for name, sentences in raw.items():
        report.duplicates[name] = _repeated_sentences(sentences, config.checks.examples)
    kept_rows = apply_policies(rows, report, config.checks, "the same tokens with the same tags")
    dropped = {row for action in report.actions if action["action"] == "drop" for row in action["rows"]}
    train = [s for i, s in enumerate(raw.train) if i not in dropped]
    validation, data = raw.validation, config.data
    notes += kept_rows.notes
    if validation is None:
        kept, held, how = carve_rows(len(train), data.validation_fraction, config.train.seed)
        train, validation = [train[i] for i in kept], [train[i] for i in held]
        notes.append(f"validation carved from train: {len(held):,} sentences ({data.validation_fraction:.0%}, {how}, "
                     f"seed {config.train.seed})")
    seed = config.train.seed
    splits = dataclasses.replace(raw, train=subset_list(train, data.max_train_samples, seed),
                             validation=subset_list(validation, data.max_eval_samples, seed),
                             test=None if raw.test is None else subset_list(raw.test, data.max_test_samples, seed),
                             notes=notes)
    record = {**report.to_dict(), "tagging": {
        "tags": splits.tag_names, "invalid_transitions": invalid, "repaired": config.tagging.repair_iob,
        "entities": {name: tagging.tag_counts(sentences) for name, sentences in splits.items()},
        "sentences": {name: len(sentences) for name, sentences in splits.items()}}}
    return splits, record, format_report(report)


def _tagging_text(record: dict) -> str:
    lines = [f"tags: {', '.join(record['tags'])}",
             "invalid I- transitions: " + ", ".join(f"{k} {v:,}" for k, v in record["invalid_transitions"].items())
             + (" (repaired)" if record["repaired"] else "")]
    for name, counts in record["entities"].items():
        lines.append(f"{name}: {record['sentences'][name]:,} sentences; entities "
                     + ", ".join(f"{kind} {n:,}" for kind, n in counts.items()))
    if "windows" in record:
        lines.append("sentences longer than data.max_length, split into windows: "
                     + ", ".join(f"{k} {v:,}" for k, v in record["windows"].items()))
    return "\n".join(lines)


def _spans_html(tokens: list[str], tags: list[str]) -> str:
    """The sentence with each entity marked `[words]TYPE`."""
    spans = {start: (end, kind) for start, end, kind in tagging.entities([tags])[0]}
    out, i = [], 0
    while i < len(tokens):
        if i in spans:
            end, kind = spans[i]
            out.append(f"<mark>{html.escape(' '.join(tokens[i:end]))}</mark><sub>{html.escape(kind)}</sub>")
            i = end
        else:
            out.append(html.escape(tokens[i]))
            i += 1
    return " ".join(out)


class TokenClassification(Task):
    """Tagged sentences, a token classifier, entity-level strict IOB2 scores with intervals."""

    name = "token_classification"
    lora_task_type = "TOKEN_CLS"
    preprocess_logits_for_metrics = staticmethod(logits_to_predictions)
    best_model_metrics = ("f1", "macro_f1", "loss")
    pipeline_tag = "token-classification"
    searches = True
    card_metrics = ("f1", "precision", "recall")

    def configure(self, config: Config) -> list[str]:
        if config.train.metric_for_best_model == "accuracy":
            config.train.metric_for_best_model = "f1"
            return ["train.metric_for_best_model = f1 (entity-level F1; most tokens are O, so token accuracy "
                    "rewards tagging nothing)"]
        return []

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        tokenizer.padding_side = "right"  # labels and predictions are read at unpadded positions (saved with it)
        splits, record, text = checked_sentences(config, with_test)
        names = splits.tag_names
        ids = {tag: i for i, tag in enumerate(names)}
        windows = {name: tagging.encode_windows(tokenizer, [s.tokens for s in sentences], config.data.max_length,
                                                config.tagging.overlap, [[ids[t] for t in s.tags] for s in sentences])
                   for name, sentences in splits.items()}
        record["tagging"]["windows"] = {name: w.split_sentences for name, w in windows.items()}
        notes = list(splits.notes)
        for name, w in windows.items():
            if w.split_sentences:
                notes.append(f"{name}: {w.split_sentences:,} sentences longer than data.max_length="
                             f"{config.data.max_length} sub-tokens split into overlapping windows (tagging.overlap="
                             f"{config.tagging.overlap}); each word scored once")
            if w.cut_words:
                notes.append(f"{name}: {w.cut_words:,} single words longer than a whole window keep only their first "
                             f"sub-tokens (their tag is on the first)")
        text += "\n" + _tagging_text(record["tagging"])
        log.info("data checks:\n%s", text)
        datasets = {name: Dataset.from_dict(w.encodings) for name, w in windows.items()}
        manifest = {"data": {"sources": splits.sources, "sha256": splits.fingerprints,
                             "rows": {name: len(s) for name, s in splits.items()}, "tags": names,
                             "windows": {name: len(w) for name, w in windows.items()}}}
        return TaskData(datasets["train"], datasets["validation"], datasets.get("test"), manifest, notes, record,
                        _Prepared(splits, windows, names, text),
                        compute_metrics=SentenceTags(windows["validation"], splits.validation, names))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        from transformers import AutoModelForTokenClassification

        names = data.extra.tag_names
        model = instantiate(AutoModelForTokenClassification, model_path, config.model, num_labels=len(names),
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        model.config.pad_token_id = tokenizer.pad_token_id
        model.accepts_loss_kwargs = False  # a batch-mean loss: see `core.models.load_classifier`
        return model

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        prepared: _Prepared = data.extra
        scores = {}
        for name, output in held_out_predictions(trainer, data):
            sentences = getattr(prepared.splits, name)
            gold = [s.tags for s in sentences]
            predicted = SentenceTags(prepared.windows[name], sentences, prepared.tag_names).predicted(
                np.asarray(output.label_ids), np.asarray(output.predictions))
            scores[name] = {**entity_report(gold, predicted), "accuracy": token_accuracy(gold, predicted),
                            "loss": float(output.metrics.get("eval_loss", float("nan"))),
                            "baseline": Baseline("f1", 0.0, "tagging every word O").to_dict()}  # the diagnosis' bar
        return scores

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        prepared: _Prepared = data.extra
        t = metrics["train"]
        lines = [f"# {config.model.name} on {config.data.source} (token classification)", "",
                 f"- tags: {', '.join(prepared.tag_names)}",
                 "- sentences: " + ", ".join(f"{name} {len(s):,}" for name, s in prepared.splits.items()),
                 f"- training: {t['seconds']:.0f} s, {t['steps']} steps, {t['samples_per_second']:.1f} windows/s, "
                 f"{t['trainable_parameters']:,} trainable parameters" + (" (LoRA)" if config.lora.enabled else ""),
                 "", "Entity-level, strict IOB2 (seqeval), micro-averaged; 95% bootstrap intervals over sentences.", "",
                 "| split | F1 [95% CI] | precision | recall | macro-F1 | entities | sentences |",
                 "|---|---|---|---|---|---|---|"]
        for split in ("validation", "test"):
            if m := metrics.get(split):
                lines.append(f"| {split} | {with_interval(m, 'f1')} | {with_interval(m, 'precision')} | "
                             f"{with_interval(m, 'recall')} | {m['macro_f1']:.4f} | {m['entities']:,} | {m['n']:,} |")
        if test := metrics.get("test"):
            lines += ["", "| type (test) | precision | recall | F1 | gold | predicted |", "|---|---|---|---|---|---|"]
            lines += [f"| {kind} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} | "
                      f"{r['predicted']} |" for kind, r in test["per_type"].items()]
        lines += ["", "Notes:"] + [f"- {note}" for note in data.notes]
        lines += ["", "## Data checks", "", "```", prepared.report_text, "```", ""]
        return "\n".join(lines)

    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        _, record, text = checked_sentences(config)
        return text + "\n" + _tagging_text(record["tagging"]), record

    def result_lines(self, metrics: dict) -> list[str]:
        return [f"{split}: entity F1 {with_interval(m, 'f1')}  precision {m['precision']:.4f}  recall "
                f"{m['recall']:.4f}  macro-F1 {m['macro_f1']:.4f}  (strict IOB2; 95% bootstrap over sentences, "
                f"n={m['n']:,} sentences, {m['entities']:,} entities)"
                for split in ("validation", "test") if (m := metrics.get(split))]

    def evaluation_lines(self, report: dict) -> list[str]:
        return [f"{report['data']}: entity F1 {with_interval(report, 'f1')}  precision {report['precision']:.4f}  "
                f"recall {report['recall']:.4f}  (n={report['n']:,} sentences, {report['entities']:,} entities)",
                *[f"{kind}: precision {r['precision']:.4f}  recall {r['recall']:.4f}  F1 {r['f1']:.4f}  "
                  f"gold {r['support']}" for kind, r in report["per_type"].items()]]

    def metrics_html(self, metrics: dict) -> str:
        return pages.metrics_table(metrics, ["f1", "precision", "recall", "macro_f1", "accuracy", "loss"])

    def report_sections(self, run: Run, metrics: dict) -> list[str]:
        test = metrics.get("test") or metrics.get("validation")
        if not test:
            return []
        rows = "".join(f"<tr><td>{html.escape(kind)}</td><td>{r['precision']:.4f}</td><td>{r['recall']:.4f}</td>"
                       f"<td>{r['f1']:.4f}</td><td>{r['support']}</td><td>{r['predicted']}</td></tr>"
                       for kind, r in test["per_type"].items())
        sections = [f"<h2>Entities per type</h2><table><tr><th>type</th><th>precision</th><th>recall</th><th>F1</th>"
                    f"<th>gold</th><th>predicted</th></tr>{rows}</table>"]
        tokens_of = self._tokens(run, "test" if metrics.get("test") else "validation")
        gold, predicted = test["rows"]["gold"], test["rows"]["predicted"]
        shown = [i for i, g in enumerate(gold) if any(t != tagging.OUTSIDE for t in g + predicted[i])][:EXAMPLES]
        if tokens_of is not None and shown:
            items = "".join(f"<li>gold: {_spans_html(tokens_of[i], gold[i])}<br>predicted: "
                            f"{_spans_html(tokens_of[i], predicted[i])}</li>" for i in shown)
            sections.append(f"<h2>Example sentences</h2><ul>{items}</ul>")
        return sections

    @staticmethod
    def _tokens(run: Run, split: str) -> list[list[str]] | None:
        """The words of the split's sentences, as training read them (None when the data cannot be read now)."""
        try:
            splits, _, _ = checked_sentences(run.config(), with_test=split == "test")
        except AfinarError:
            return None
        return [s.tokens for s in getattr(splits, split) or []]

    def load_predictor(self, run: Run, backend: str = "auto"):
        """torch (`auto` too: no export is chosen behind the user's back), or the run's ONNX export."""
        from afinar.inference.predictors import ONNX_DIR
        from afinar.inference.spans import EntityTagger

        config = run.config()
        return EntityTagger(run.model_dir, config.data.max_length, config.tagging.overlap,
                            backend="torch" if backend == "auto" else backend, onnx_dir=run.path / ONNX_DIR)

    def export(self, run: Run, int8: bool, out: str | Path | None) -> dict:
        """ONNX (and int8), checked on up to `CHECK_SENTENCES` of the run's validation sentences."""
        from afinar.inference.export import export_tagger

        splits, _, _ = checked_sentences(run.config())
        return export_tagger(run, [s.tokens for s in splits.validation[:CHECK_SENTENCES]], int8, out)

    def export_lines(self, record: dict) -> list[str]:
        return [f"{name}: {row['sentences_per_second']:.0f} sentences/s on {record['check']['sentences']} validation "
                f"sentences" + ("" if name == "torch" else f"; tags agree with torch on {row['tag_agreement']:.1%} of "
                                f"{record['check']['words']:,} words, max |probability diff| "
                                f"{row['max_abs_probability_diff']:.1e}") for name, row in record["backends"].items()]

    def evaluate(self, run: Run, data: str | Path | None, backend: str, batch_size: int) -> dict:
        """Re-score the saved model on a tagged file, or on the run's own test split."""
        config = run.config()
        tagger = self.load_predictor(run, backend)
        if data is not None:
            sentences = tagging.read_tagged_file(Path(data), DataArgs(encoding=config.data.encoding), config.tagging)
            tagging.check_scheme(sentences, str(data))
            if config.tagging.repair_iob:
                sentences = [tagging.Sentence(s.tokens, tagging.repair_transitions(s.tags)) for s in sentences]
        else:
            splits, _, _ = checked_sentences(config)
            if splits.test is None:
                raise NoTestSplit(f"the data of {run.path} has no test split; pass a tagged file with --data")
            sentences = splits.test
        predicted = tagger.tag([s.tokens for s in sentences])
        report = entity_report([s.tags for s in sentences], predicted)
        report.pop("rows")
        report["data"] = str(data) if data is not None else "the run's test split"
        report["backend"] = tagger.backend
        return report
