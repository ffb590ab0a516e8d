"""Domain-adaptive causal-LM training (`task: causal_lm`) on raw text, and generation.

`train_lm` reads as its recipe: documents -> tokens joined with EOS -> fixed `lm.block_size` blocks (packing:
no padding, nothing wasted but the last partial block) [+ replayed general blocks] -> model (freezing / LoRA)
-> Trainer (best model by validation loss) -> LoRA merged -> perplexity before vs after on domain validation
text and on general text (the forgetting check, see forgetting.py).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import set_seed

from afinar import assets
from afinar import data as data_lib
from afinar import forgetting
from afinar.classify import TrainResult
from afinar.config import Config, DataArgs, ModelArgs
from afinar.errors import AfinarError
from afinar.models import _check_safetensors, _common, _hub_error, load_tokenizer, resolve
from afinar.report import write_run_report
from afinar.runs import Run, is_main_process, machine, versions
from afinar.training import (apply_lora, build_trainer, fit, freeze_lower_layers, last_checkpoint, save_best,
                             trainable_parameters)

log = logging.getLogger(__name__)

__all__ = ["TextSplits", "generate", "load_causal_lm", "load_texts", "pack", "pack_documents", "read_documents",
           "split_documents", "train_lm"]


# ---------------------------------------------------------------- documents


def split_documents(text: str) -> list[str]:
    """Blank-line separated blocks when some block spans several lines (paragraphs), else one per line."""
    blocks = [b.strip() for b in re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n")) if b.strip()]
    if len(blocks) > 1 and any("\n" in block for block in blocks):
        return blocks
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_documents(path: str | Path, encoding: str = "utf-8", text_column: str | None = None) -> list[str]:
    """Documents from a .txt file (see `split_documents`) or from the text column of a CSV/JSONL/... table."""
    path = Path(path).expanduser()
    if data_lib.file_format(path) == "txt":
        documents = split_documents(data_lib.read_text_file(path, encoding))
    else:
        frame = data_lib.read_table(path, encoding)
        column = data_lib._pick_column(frame, text_column, data_lib.TEXT_COLUMNS, "text", str(path),
                                       "data.text_column")
        documents = [t.strip() for t in frame[column].fillna("").astype(str) if t.strip()]
    if not documents:
        raise AfinarError(f"{path}: no text in it")
    return documents


@dataclass
class TextSplits:
    """Documents per split and where they came from (sources, sha256 fingerprints, notes on changes)."""

    train: list[str]
    validation: list[str]
    test: list[str] | None
    sources: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[str]]]:
        return [(n, d) for n, d in (("train", self.train), ("validation", self.validation), ("test", self.test))
                if d is not None]


def _hub_documents(args: DataArgs) -> tuple[dict[str, list[str]], dict[str, str]]:
    frames, _, fingerprints = data_lib._hub_splits(args)  # clear AfinarError when the hub cannot be reached
    documents = {}
    for split, frame in frames.items():
        column = data_lib._pick_column(frame, args.text_column, data_lib.TEXT_COLUMNS, "text",
                                       f"hub:{args.source} ({split})", "data.text_column")
        documents[split] = [t.strip() for t in frame[column].fillna("").astype(str) if t.strip()]
    return documents, fingerprints


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def load_texts(args: DataArgs, seed: int = 42) -> TextSplits:
    """Train / validation (/ test) documents: from a file, a folder of split files, or a hub dataset.
    Without a validation split, the last `validation_fraction` of the documents (after a seeded shuffle)."""
    source = Path(args.source).expanduser()
    files: dict[str, Path] = {}
    documents: dict[str, list[str]] = {}
    fingerprints: dict[str, str] = {}
    if args.source in assets.DATASETS:
        files = assets.dataset_files(args.source)
    elif source.is_dir():
        files = data_lib._find_split_files(source)
    elif source.exists() or source.suffix:  # anything that looks like a file is not a hub id
        files = {"train": source}
    else:
        documents, fingerprints = _hub_documents(args)
        if "train" not in documents:
            raise AfinarError(f"hub dataset {args.source!r} has no train split (splits: {', '.join(documents)})")
    sources = {split: f"hub:{args.source}" for split in documents}
    for split, path in (("validation", args.validation), ("test", args.test)):
        if path:
            files[split] = Path(path).expanduser()
    for split, path in files.items():
        documents[split] = read_documents(path, args.encoding, args.text_column)
        sources[split], fingerprints[split] = str(path), data_lib.sha256_file(path)
    splits = TextSplits(documents["train"], documents.get("validation"), documents.get("test"), sources,
                        fingerprints)
    rng = np.random.default_rng(seed)
    if splits.validation is None:
        if len(splits.train) < 2:
            raise AfinarError(f"{sources['train']}: one document cannot be split into train and validation; "
                              f"add documents or give data.validation")
        order = rng.permutation(len(splits.train))
        held = max(1, round(len(order) * args.validation_fraction))
        splits.validation = [splits.train[i] for i in sorted(order[-held:])]
        splits.train = [splits.train[i] for i in sorted(order[:-held])]
        splits.sources["validation"] = f"{sources['train']} (carved)"
        splits.notes.append(f"validation carved from train: {held:,} documents ({args.validation_fraction:.0%}, "
                            f"seeded shuffle, seed {seed})")
    held_out = {_normalised(d) for _, docs in splits.items()[1:] for d in docs}
    kept = [d for d in splits.train if _normalised(d) not in held_out]
    if len(kept) < len(splits.train):
        splits.notes.append(f"train: dropped {len(splits.train) - len(kept):,} documents that also occur in "
                            f"validation/test (leakage)")
        splits.train = kept
    if not splits.train:
        raise AfinarError(f"{sources['train']}: no training documents left after removing validation/test copies")
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                         ("test", args.max_test_samples)):
        docs = getattr(splits, split)
        if docs is not None and limit is not None and limit < len(docs):
            picked = sorted(np.random.default_rng(seed).choice(len(docs), size=limit, replace=False))
            setattr(splits, split, [docs[i] for i in picked])
            splits.notes.append(f"{split}: seeded subset of {limit:,} of {len(docs):,} documents")
    return splits


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


def _drop_logits(logits, labels):
    """Evaluation keeps only the loss: never accumulate (blocks x block_size x vocab) logits."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.new_zeros(logits.shape[0])


# ---------------------------------------------------------------- model


def load_causal_lm(args: ModelArgs, path: str | None = None, tokenizer=None):
    """`AutoModelForCausalLM` in fp32 (training keeps fp32 weights; autocast does the rest), safetensors only
    (unless `model.allow_pickle`), and a pad token id."""
    import torch
    from transformers import AutoModelForCausalLM

    path = path or resolve(args)
    _check_safetensors(path, args)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=None if args.allow_pickle else True,
                                                     dtype=torch.float32, **_common(args))
    except (OSError, ValueError) as exc:
        raise _hub_error(args, exc) from None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- training


def _lm_config(config: Config) -> tuple[Config, list[str]]:
    """A copy with the two training settings a language model needs; each change is noted in the manifest."""
    config = copy.deepcopy(config)
    notes = []
    if config.train.metric_for_best_model != "loss":
        notes.append(f"train.metric_for_best_model={config.train.metric_for_best_model} replaced by loss "
                     f"(the best language model has the lowest validation loss)")
        config.train.metric_for_best_model = "loss"
    if config.train.group_by_length:
        notes.append("train.group_by_length turned off: packed blocks all have the same length")
        config.train.group_by_length = False
    return config, notes


def _summary(config: Config, splits: TextSplits, metrics: dict, notes: list[str]) -> str:
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


def train_lm(config: Config) -> TrainResult:
    """Adapt `config.model` to the raw text in `config.data`; measure domain and general perplexity before
    and after, and flag catastrophic forgetting."""
    config, notes = _lm_config(config)
    config.validate()
    lm = config.lm
    set_seed(config.train.seed)
    model_path = resolve(config.model)
    tokenizer = load_tokenizer(config.model, model_path)
    splits = load_texts(config.data, config.train.seed)
    notes += splits.notes
    general = forgetting.general_corpus(lm)
    replay = forgetting.replay_corpus(lm, config.data.encoding) if lm.replay_fraction > 0 else None
    blocks, eval_blocks, replay_info = _pack_splits(config, tokenizer, splits, replay, notes)
    notes.append(f"forgetting measured on {general.source}")
    model = load_causal_lm(config.model, model_path, tokenizer)
    limit = forgetting._max_positions(model)
    if limit is not None and lm.block_size > limit:
        raise AfinarError(f"lm.block_size={lm.block_size} exceeds the {limit} positions of {config.model.name}; "
                          f"lower it")
    run = Run.create(config)
    with run.recording(config.train.keep_checkpoints):
        run.update_manifest({
            "versions": versions(), "machine": machine(), "model": {"name": config.model.name, "path": model_path},
            "data": {"sources": splits.sources, "sha256": splits.fingerprints,
                     "documents": {name: len(docs) for name, docs in splits.items()},
                     "blocks": {name: len(b) for name, b in blocks.items()}, "block_size": lm.block_size},
            "general_text": general.source, "replay": replay_info, "notes": notes})
        datasets = {name: Dataset.from_dict({"input_ids": b.tolist()}) for name, b in blocks.items()}
        eval_ds = Dataset.from_dict({"input_ids": eval_blocks.tolist()})

        if config.lora.enabled:
            model = apply_lora(model, config.lora, "CAUSAL_LM")
        freeze_lower_layers(model, config.train.freeze_layers)  # after LoRA: also freezes those layers' adapters
        trainable, total = trainable_parameters(model)
        trainer = build_trainer(run, config.train, model, tokenizer, datasets["train"], eval_ds, collate_blocks,
                                None, _drop_logits)
        started = time.perf_counter()
        output = fit(trainer, run, last_checkpoint(run) if config.train.resume else None)
        seconds = time.perf_counter() - started
        validation = trainer.state.best_metric  # eval loss of the model loaded at the end
        if validation is None:
            validation = trainer.evaluate(eval_ds)["eval_loss"]
        metrics = {"train": {"seconds": seconds, "steps": trainer.state.global_step,
                             "samples_per_second": output.metrics.get("train_samples_per_second", 0.0),
                             "tokens_per_second": output.metrics.get("train_samples_per_second", 0.0) * lm.block_size,
                             "loss": output.metrics.get("train_loss"),
                             "best_checkpoint": trainer.state.best_model_checkpoint,
                             "trainable_parameters": trainable, "total_parameters": total},
                   "data": {"documents": {n: len(d) for n, d in splits.items()},
                            "blocks": {n: len(b) for n, b in blocks.items()},
                            "tokens": {n: len(b) * lm.block_size for n, b in blocks.items()}},  # train: + replay
                   "validation": {"loss": validation, "perplexity": math.exp(validation), "blocks": len(eval_blocks)},
                   "replay": replay_info}
        if "test" in datasets:
            loss = trainer.evaluate(datasets["test"], metric_key_prefix="test")["test_loss"]
            metrics["test"] = {"loss": loss, "perplexity": math.exp(loss), "blocks": len(blocks["test"])}
        save_best(run, trainer, tokenizer, config.lora.enabled)
        run.write_log(trainer.state.log_history)
        del trainer, model  # free memory before the forgetting check loads two models

        result = forgetting.measure_forgetting(model_path, run.model_dir, "\n\n".join(splits.validation),
                                               general.text, lm, config.model,
                                               batch_size=config.train.eval_batch_size or config.train.batch_size)
        result["general_source"] = general.source
        result["domain_source"] = splits.sources["validation"]
        metrics["forgetting"] = result
        metrics["perplexity"] = {name: {"before": result[name]["base_perplexity"],
                                        "after": result[name]["tuned_perplexity"]} for name in ("domain", "general")}
        run.write("metrics.json", metrics)
        run.write("summary.md", _summary(config, splits, metrics, notes))
    if is_main_process():
        log.info("report: %s", write_run_report(run.path))
    return TrainResult(run.path, metrics)


# ---------------------------------------------------------------- generation


def _generation_model(model: str | Path | ModelArgs) -> tuple[ModelArgs, str]:
    """A finished causal-LM run folder, an embedded name, a model folder or a hub id."""
    if isinstance(model, ModelArgs):
        return model, resolve(model)
    folder = Path(model).expanduser()
    if (folder / "config.yaml").is_file():
        run = Run.open(folder)
        run.require_finished()
        task = run.config().task
        if task != "causal_lm":
            raise AfinarError(f"{folder} is a {task} run; generate needs a causal_lm run or a causal LM model")
        return ModelArgs(name=str(run.model_dir)), str(run.model_dir)
    args = ModelArgs(name=str(model))
    return args, resolve(args)


def generate(model: str | Path | ModelArgs, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0) -> str:
    """Continue `prompt` with a run's tuned model or any causal LM; returns only the new text.
    Sampling is seeded (same seed, same text); `temperature=0` decodes greedily."""
    import torch

    if not prompt.strip():
        raise AfinarError("the prompt is empty; give the text to continue")
    if max_new_tokens <= 0 or temperature < 0 or not 0 < top_p <= 1:
        raise AfinarError(f"need max_new_tokens > 0, temperature >= 0 and 0 < top_p <= 1 (got {max_new_tokens}, "
                          f"{temperature}, {top_p})")
    args, path = _generation_model(model)
    tokenizer = load_tokenizer(args, path)
    lm = load_causal_lm(args, path, tokenizer).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    limit = forgetting._max_positions(lm)
    if limit is not None and inputs["input_ids"].shape[1] + max_new_tokens > limit:
        raise AfinarError(f"prompt ({inputs['input_ids'].shape[1]} tokens) plus max_new_tokens={max_new_tokens} "
                          f"exceed the model's {limit} positions")
    set_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.inference_mode():
        output = lm.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
