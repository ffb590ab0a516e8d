"""Domain-adaptive causal-LM training (`task: causal_lm`) on raw text.

`CausalLM` is the task the run lifecycle (`afinar.training.lifecycle`) trains: documents (read, checked, carved and
subset by `data.checks.checked_documents`) -> tokens joined with EOS -> fixed `lm.block_size` blocks (packing: no
padding, nothing wasted but the last partial block) [+ replayed general blocks]; the best model by validation loss;
then perplexity before vs after on domain validation text and on general text (the forgetting check,
`evaluation.forgetting`). Generation is `inference.generation`'s, with the format saved beside the model.
"""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset

from afinar.core.config import Config
from afinar.core.errors import AfinarError
from afinar.core.models import load_causal_lm, loading_options, max_positions
from afinar.core.runs import Run, write_json
from afinar.data.checks import checked_documents, format_report
from afinar.data.sources import TextSplits
from afinar.evaluation import forgetting
from afinar.inference.generation import GenerationFormat
from afinar.reporting import pages
from afinar.tasks.base import Task
from afinar.training.lifecycle import TaskData

log = logging.getLogger(__name__)

__all__ = ["CausalLM", "LanguageModelTask", "drop_logits", "held_out_losses", "pack", "pack_documents"]


# ---------------------------------------------------------------- tokens and blocks


def tokenize_documents(documents: list[str], tokenizer) -> Dataset:
    """Token ids per document with EOS appended (batched `datasets.map`), so that packed documents stay
    separated and the model learns where one ends."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AfinarError("the tokenizer has no EOS token to separate packed documents")

    def encode(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [row + [eos] for row in ids]}

    # an explicit fingerprint: hashing `encode` would pickle the whole tokenizer (~1 s) for a cache that an
    # in-memory dataset never writes
    return Dataset.from_dict({"text": documents}).map(encode, batched=True, remove_columns=["text"],
                                                      new_fingerprint=uuid.uuid4().hex, desc="tokenizing")


def pack(token_lists, block_size: int) -> np.ndarray:
    """Concatenate token lists and cut them into full `block_size` rows; only the final remainder is dropped."""
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64)
    rows = len(flat) // block_size
    return flat[: rows * block_size].reshape(rows, block_size)


def pack_documents(documents: list[str], tokenizer, block_size: int, what: str = "text") -> np.ndarray:
    token_lists = tokenize_documents(documents, tokenizer)["input_ids"]
    blocks = pack(token_lists, block_size)
    if len(blocks) == 0:
        tokens = sum(len(ids) for ids in token_lists)
        raise AfinarError(f"{what}: {tokens:,} tokens, fewer than one lm.block_size={block_size} block; "
                          f"lower lm.block_size or give more text")
    return blocks


def collate_blocks(rows: list[dict]) -> dict:
    """Equal-length blocks stack as they are; labels are the inputs (the model shifts them by one)."""
    import torch

    ids = torch.tensor([row["input_ids"] for row in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def held_out_losses(trainer, validation, test) -> dict[str, dict]:
    """Loss and perplexity per held-out split of the model `trainer` holds: validation's is the best
    checkpoint's (evaluated when no evaluation ran), test's is evaluated once, here."""
    loss = trainer.state.best_metric  # eval loss of the model loaded at the end
    if loss is None:
        loss = trainer.evaluate(validation)["eval_loss"]
    losses = {"validation": loss}
    if test is not None:
        losses["test"] = trainer.evaluate(test, metric_key_prefix="test")["test_loss"]
    return {split: {"loss": value, "perplexity": math.exp(value)} for split, value in losses.items()}


def drop_logits(logits, labels):
    """Evaluation keeps only the loss: never accumulate (blocks x block_size x vocab) logits."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.new_zeros(logits.shape[0])


# ---------------------------------------------------------------- training


def _summary(config: Config, metrics: dict, notes: list[str]) -> str:
    f = metrics["forgetting"]
    t = metrics["train"]
    d = metrics["data"]
    lines = [f"# {config.model.name} on {config.data.source} (causal LM)", "",
             f"- documents: train {d['documents']['train']:,}, validation {d['documents']['validation']:,}; "
             f"training blocks {d['blocks']['train']:,} x {config.lm.block_size} tokens"
             + (f" ({metrics['replay']['replay_blocks']:,} replayed general blocks)" if metrics["replay"] else ""),
             f"- training: {t['seconds']:.0f} s, {t['steps']} steps, {t['trainable_parameters']:,} trainable "
             f"parameters" + (" (LoRA, merged)" if config.lora.enabled else "")
             + (f", lowest {config.train.freeze_layers} layers frozen" if config.train.freeze_layers else ""),
             f"- validation loss (packed blocks, best model): {metrics['validation']['loss']:.4f} "
             f"(perplexity {metrics['validation']['perplexity']:.2f})", "",
             "| text | perplexity before | after | ratio | tokens |", "|---|---|---|---|---|"]
    for name, label in (("domain", "domain validation"), ("general", f["general_source"])):
        row = f[name]
        lines.append(f"| {label} | {row['base_perplexity']:.2f} | {row['tuned_perplexity']:.2f} | "
                     f"{row['ratio']:.3f} | {row['scored_tokens']:,} |")
    verdict = "FORGETTING" if f["forgetting"] else "no forgetting"
    lines += ["", f"**{verdict}**: general-text perplexity ratio {f['general']['ratio']:.3f} "
              f"(threshold lm.forgetting_ratio={config.lm.forgetting_ratio}); windows of {config.lm.block_size} "
              f"tokens, stride {config.lm.stride}"
              + (f", first {config.lm.max_eval_tokens:,} tokens of each text" if config.lm.max_eval_tokens else ""),
              "", "Notes:"] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def _pack_splits(config: Config, tokenizer, splits: TextSplits, replay: forgetting.Corpus | None,
                 notes: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, dict | None]:
    """Blocks per split (train with replay mixed in), the validation blocks evaluated during training
    (capped by `lm.max_eval_tokens`), and the replay record."""
    lm = config.lm
    blocks = {name: pack_documents(docs, tokenizer, lm.block_size, f"{splits.sources[name]} ({name})")
              for name, docs in splits.items()}
    replay_info = None
    if replay is not None:
        replay_blocks = pack_documents(replay.documents, tokenizer, lm.block_size, f"replay {replay.source}")
        blocks["train"], replay_info = forgetting.mix_replay(blocks["train"], replay_blocks, lm.replay_fraction,
                                                             config.train.seed)
        replay_info["source"] = replay.source
        notes.append(f"replay: {replay_info['replay_blocks']:,} general blocks from {replay.source} make "
                     f"{replay_info['achieved_fraction']:.1%} of the training blocks"
                     + (" (replay text repeated: it is shorter than needed)" if replay_info["repeated"] else ""))
    eval_blocks = blocks["validation"]
    if lm.max_eval_tokens is not None and len(eval_blocks) * lm.block_size > lm.max_eval_tokens:
        eval_blocks = eval_blocks[: max(1, lm.max_eval_tokens // lm.block_size)]
        notes.append(f"validation during training: first {len(eval_blocks):,} of {len(blocks['validation']):,} "
                     f"blocks (lm.max_eval_tokens={lm.max_eval_tokens:,})")
    return blocks, eval_blocks, replay_info


@dataclass
class _Prepared:
    splits: TextSplits
    blocks: dict[str, np.ndarray]
    general: forgetting.Corpus
    replay: dict | None
    eos_token: str  # what packing put after each document


class LanguageModelTask(Task):
    """What the two tasks that train a language model (causal_lm, sft) share after training: their runs generate
    (`afinar generate`, the OpenAI-compatible API), report loss, perplexity and forgetting, and are cards for
    `text-generation`."""

    lora_task_type = "CAUSAL_LM"
    preprocess_logits_for_metrics = staticmethod(drop_logits)
    pipeline_tag = "text-generation"
    card_metrics = ("perplexity",)
    generates = True

    def result_lines(self, metrics: dict) -> list[str]:
        lines = [f"{split}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}"
                 + (f"  accuracy by label continuation {m['accuracy']:.4f}" if "accuracy" in m else "")
                 for split in ("validation", "test") if (m := metrics.get(split))]
        return lines + forgetting_lines(metrics["forgetting"]) if metrics.get("forgetting") else lines

    def metrics_html(self, metrics: dict) -> str:
        labelled = all("accuracy" in metrics[s] for s in ("validation", "test") if metrics.get(s))
        return (pages.metrics_table(metrics, ["loss", "perplexity"] + (["accuracy", "macro_f1"] if labelled else []))
                + pages.forgetting_html(metrics))

    def export_gguf(self, run: Run, dtype: str, out: str | Path | None) -> dict:
        """The merged model as GGUF in `dtype` with an Ollama Modelfile, checked by reading the file back."""
        from afinar.inference.gguf_export import export_gguf

        return export_gguf(run, GenerationFormat.load(run.model_dir, self.chat_prompts), dtype, out)

    def export_lines(self, record: dict) -> list[str]:
        from afinar.inference.gguf_export import export_lines

        return export_lines(record)


def loss_picks_the_best(config: Config, why: str) -> list[str]:
    """The validation loss chooses the best checkpoint (a language model's tasks have no label metric); the note
    when another metric was configured."""
    if config.train.metric_for_best_model == "loss":
        return []
    note = f"train.metric_for_best_model={config.train.metric_for_best_model} replaced by loss ({why})"
    config.train.metric_for_best_model = "loss"
    return [note]


def adapters_by_default(config: Config, why: str) -> list[str]:
    """LoRA when the config leaves it unset; the note saying so."""
    if config.lora.enabled is not None:
        return []
    config.lora.enabled = True
    return [f"lora.enabled = true (unset; {why})"]


def forgetting_lines(result: dict) -> list[str]:
    """Perplexity before -> after on domain and general text, and the verdict, as printed lines."""
    lines = [f"{name} perplexity: {result[name]['base_perplexity']:.2f} -> {result[name]['tuned_perplexity']:.2f} "
             f"(x{result[name]['ratio']:.3f})" for name in ("domain", "general")]
    return lines + [("forgetting: general perplexity rose by more than" if result["forgetting"] else
                     "no forgetting: general perplexity stayed within") + f" x{result['forgetting_ratio']:.2f}"]


class CausalLM(LanguageModelTask):
    """Domain-adaptive causal-LM training: packed blocks, the best model by validation loss, then perplexity before
    and after on domain and general text."""

    name = "causal_lm"

    def configure(self, config: Config) -> list[str]:
        """The two training settings a language model needs; each change is noted in the manifest."""
        notes = loss_picks_the_best(config, "the best language model has the lowest validation loss")
        if config.train.group_by_length:
            notes.append("train.group_by_length turned off: packed blocks all have the same length")
            config.train.group_by_length = False
        return notes

    def prepare(self, config: Config, model_path: str, tokenizer, with_test: bool) -> TaskData:
        from transformers import AutoConfig

        lm = config.lm
        limit = max_positions(AutoConfig.from_pretrained(model_path, **loading_options(config.model)))
        if limit is not None and lm.block_size > limit:
            raise AfinarError(f"lm.block_size={lm.block_size} exceeds the {limit} positions of {config.model.name}; "
                              f"lower it")
        splits, report = checked_documents(config, with_test)
        log.info("data checks:\n%s", format_report(report))
        notes = list(splits.notes)
        general = forgetting.general_corpus(lm)
        replay = forgetting.replay_corpus(lm, config.data.encoding) if lm.replay_fraction > 0 else None
        blocks, eval_blocks, replay_info = _pack_splits(config, tokenizer, splits, replay, notes)
        notes.append(f"forgetting measured on {general.source}")
        manifest = {"data": {"sources": splits.sources, "sha256": splits.fingerprints,
                             "documents": {name: len(docs) for name, docs in splits.items()},
                             "blocks": {name: len(b) for name, b in blocks.items()}, "block_size": lm.block_size},
                    "general_text": general.source, "replay": replay_info}
        datasets = {name: Dataset.from_dict({"input_ids": b.tolist()}) for name, b in blocks.items()}
        return TaskData(datasets["train"], Dataset.from_dict({"input_ids": eval_blocks.tolist()}),
                        datasets.get("test"), manifest, notes, report.to_dict(),
                        _Prepared(splits, blocks, general, replay_info, tokenizer.eos_token))

    def load_model(self, config: Config, model_path: str, tokenizer, data: TaskData):
        return load_causal_lm(config.model, model_path, tokenizer)

    def collator(self, tokenizer):
        return collate_blocks

    def score(self, trainer, data: TaskData) -> dict[str, dict]:
        scores = held_out_losses(trainer, data.validation, data.test)
        for split, blocks in (("validation", data.validation), ("test", data.test)):
            if split in scores:
                scores[split]["blocks"] = len(blocks)
        return scores

    def after_training(self, run: Run, config: Config, model_path: str, data: TaskData, metrics: dict) -> None:
        prepared: _Prepared = data.extra
        # documents were tokenized without special tokens: a prompt gets no BOS either
        GenerationFormat(bos=False, eos_token=prepared.eos_token).save(run.model_dir)
        lm = config.lm
        metrics["train"]["tokens_per_second"] = metrics["train"]["samples_per_second"] * lm.block_size
        metrics["data"] = {"documents": {n: len(d) for n, d in prepared.splits.items()},
                           "blocks": {n: len(b) for n, b in prepared.blocks.items()},
                           "tokens": {n: len(b) * lm.block_size for n, b in prepared.blocks.items()}}  # + replay
        metrics["replay"] = prepared.replay
        result = forgetting.measure_forgetting(model_path, run.model_dir, "\n\n".join(prepared.splits.validation),
                                               prepared.general.text, lm, config.model,
                                               batch_size=config.train.eval_batch_size or config.train.batch_size)
        result["general_source"] = prepared.general.source
        result["domain_source"] = prepared.splits.sources["validation"]
        metrics["forgetting"] = result
        metrics["perplexity"] = {name: {"before": result[name]["base_perplexity"],
                                        "after": result[name]["tuned_perplexity"]} for name in ("domain", "general")}

    def summary(self, config: Config, data: TaskData, metrics: dict) -> str:
        return _summary(config, metrics, data.notes)

    # ---------------------------------------------------------------- after training

    def check(self, config: Config) -> tuple[str, dict]:
        _, report = checked_documents(config)
        return format_report(report, examples=3), report.to_dict()

    def remeasure_forgetting(self, run: Run) -> dict:
        """Re-measure against the base model on the run's validation documents; writes `forgetting.json`."""
        config = run.config()
        validation = checked_documents(config)[0].validation  # the very documents training validated on
        general = forgetting.general_corpus(config.lm)
        result = forgetting.measure_forgetting(None, run.model_dir, "\n\n".join(validation), general.text,
                                               config.lm, config.model)
        result["base_model"] = config.model.name
        result["general_source"] = general.source
        result["domain_source"] = "the run's validation documents"
        write_json(run.path / "forgetting.json", result)
        return result
