"""Typed run configuration: dataclasses that YAML files and `--set key=value` overrides fill in.

Keys are dotted (`train.learning_rate`). Two shorthands keep configs and command lines short:
a scalar given for a whole section sets its main field (`model: gpt2` is `model.name: gpt2`), and a field
name that exists in exactly one section needs no prefix (`max_train_samples=2000` is
`data.max_train_samples=2000`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from afinar.core.errors import AfinarError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POLICIES = ("error", "drop", "warn")
CALIBRATIONS = ("train", "content_free", "none")
BEST_MODEL_METRICS = ("accuracy", "macro_f1", "f1", "exact_match", "loss")  # each task allows its `best_model_metrics`


@dataclass
class ModelArgs:
    name: str = "minilm-l6"  # embedded short name (`afinar models`), local folder, or hub id
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducible downloads
    trust_remote_code: bool = False  # never run code shipped with a checkpoint unless asked
    allow_pickle: bool = False  # refuse pickle `.bin` weights: they can execute code on load
    from_scratch: bool = False  # the model's architecture and tokenizer, weights randomly initialised (seeded):
    #                             what pretraining buys


@dataclass
class DataArgs:
    source: str = "tweets"  # embedded name, hub dataset id, local file or folder (the train split)
    validation: str | None = None  # optional file for the validation split
    test: str | None = None  # optional file for the test split
    text_column: str | None = None  # auto-detected when unset
    text_pair_column: str | None = None  # sentence pairs: the second text (detected for sentence1/sentence2,
    #                                      premise/hypothesis, question/passage, ... when text_column is unset)
    label_column: str | None = None  # auto-detected when unset
    label_columns: list[str] | None = None  # multi-label data as several 0/1 columns (implies task: multilabel)
    label_names_file: str | None = None  # multi-label ids -> names, one per line (default: labels.txt beside train)
    encoding: str = "utf-8"  # for CSV/TSV/JSONL/TXT files
    validation_fraction: float = 0.1  # carved from train, stratified, when there is no validation split
    max_train_samples: int | None = None  # seeded random subset of train
    train_per_class: int | None = None  # seeded class-balanced subset of train: this many rows of each class
    max_eval_samples: int | None = None  # seeded random subset of validation
    max_test_samples: int | None = None  # seeded random subset of test
    max_length: int = 128  # tokens; longer texts are truncated (tweets need 64)
    max_text_chars: int = 100_000  # a longer text is an input error, not something to tokenize


@dataclass
class TrainArgs:
    output_dir: str = "runs"  # run folders are created inside it
    run_name: str | None = None  # default: <time>-<model>-<data>
    epochs: float | None = None  # None: 3, or more when a small training set would take fewer than min_steps
    max_steps: int = -1  # > 0 overrides epochs
    min_steps: int = 300  # when epochs is None: a small training set still gets this many optimizer steps
    batch_size: int = 32
    eval_batch_size: int | None = None  # default: 2x batch_size (no gradients to keep)
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # None: 5e-5 for full fine-tuning, 1e-3 for LoRA adapters (2e-4 for LMs)
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 on GPUs with it, on CPUs where measured faster
    eval_every: int | None = None  # evaluate (and checkpoint) every N optimizer steps; None: 8 times per run
    logging_steps: int = 50
    early_stopping_patience: int | None = 3  # evaluations without improvement before stopping; None: off
    metric_for_best_model: str = "accuracy"  # accuracy | macro_f1 | loss (macro_f1 for imbalanced classes); tagging
    #                                          and question answering read accuracy as their F1 (f1, exact_match)
    head_learning_rate: float | None = None  # the classification head's own rate (None: learning_rate; multilabel: 1e-3)
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, mlflow, trackio, wandb (extras)
    class_weights: str = "none"  # none | balanced (n / (classes x count)) | per label, e.g. "negative=1,positive=5"
    group_by_length: bool = True  # batches of similar length waste little padding
    cpu_speedups: bool = True  # on CPUs: fast dropout masks, fused activations, no per-step page faults (cpu_speed)
    freeze_layers: int = 0  # freeze the embeddings and the lowest N transformer blocks (less forgetting, faster)
    save_total_limit: int = 2  # checkpoints kept on disk (the best is always kept)
    keep_checkpoints: bool = False  # a finished run needs only model/; checkpoints (with optimizer state) go
    resume: bool = False  # continue from the run folder's last checkpoint
    fsdp: str | None = None  # passed to TrainingArguments.fsdp, e.g. "full_shard auto_wrap" (multi-GPU)
    fsdp_config: str | None = None  # path to an FSDP config JSON, passed through
    deepspeed: str | None = None  # path to a DeepSpeed config JSON, passed through


@dataclass
class LoraArgs:
    enabled: bool | None = None  # None: on for sft and preference (instruction and preference tuning), off for the
    #                              other tasks
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] | None = None  # default: peft's choice for the architecture


@dataclass
class LMArgs:
    """Causal-LM domain adaptation (`task: causal_lm`) and the catastrophic-forgetting check."""

    block_size: int = 256  # tokens per packed training sequence (documents joined with EOS, no padding)
    general_text: str = "wikitext2"  # general reference corpus for forgetting: embedded name or a .txt path
    replay_fraction: float = 0.0  # share of general text mixed into training (a forgetting mitigation)
    replay_source: str | None = None  # general text to replay; must not be the forgetting corpus (default:
    #                                   the first half of WikiText-2 test, the check then uses the second half)
    stride: int = 256  # sliding-window step for perplexity (window = block_size)
    max_eval_tokens: int | None = None  # cap on tokens per perplexity measurement (speed)
    forgetting_ratio: float = 1.10  # flag forgetting when general perplexity rises by more than this factor


@dataclass
class SFTArgs:
    """Instruction tuning (`task: sft`): prompt -> response pairs through the model's chat template."""

    template: str | None = None  # labelled classification data as instructions: a prompt with {text} (and
    #                              {labels}, the names joined); the answer is the label's name
    system: str | None = None  # a system message put before every conversation that has none
    chat_template: str | None = None  # Jinja text or a .jinja file; default: the tokenizer's, else a plain one
    label_set_max: int = 20  # responses with at most this many distinct values are a label set: scored by
    #                          each label's continuation (accuracy), and free generations checked against it
    validity_samples: int = 100  # validation prompts generated freely to measure the valid-label rate
    generation_samples: int = 4  # validation prompts whose generations the report shows
    max_new_tokens: int = 48  # for those generations
    prompt_column: str | None = None  # prompt -> response data in any two columns: the prompt's (wrapped in
    #                                   sft.template's {text} when set) ...
    response_column: str | None = None  # ... and the response's
    reference_columns: list[str] | None = None  # several reference answers per row (e.g. summary1,summary2,...):
    #                                             sft.metrics scores against all; a split without response_column
    #                                             trains and validates on the first
    metrics: list[str] = field(default_factory=list)  # rouge | squad: greedy generations of the test split (else
    #                                                   validation), by the tuned and the base (zero-shot) model
    metric_new_tokens: int = 128  # longest generation scored by sft.metrics


PREFERENCE_LOSSES = ("dpo",)  # TRL's DPO (its `loss_type` sigmoid)


@dataclass
class PreferenceArgs:
    """Preference tuning (`task: preference`): a prompt and two answers, the chosen one preferred (TRL's DPO)."""

    loss: str = "dpo"  # dpo: -log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), against the reference
    beta: float = 0.1  # how far the policy may move from the reference: higher stays closer
    test_fraction: float = 0.1  # carved from train (seeded, whole conversations) when the data has no test split
    generations: int = 4  # test prompts whose greedy answers before and after tuning the report shows
    generation_tokens: int = 64  # new tokens at most in each of those answers


@dataclass
class TaggingArgs:
    """Token classification (`task: token_classification`): named entities and any BIO/IOB2 tagging."""

    tag_column: str | None = None  # records: the tags list's column (default tags, ner_tags, labels); CoNLL
    #                                files: the tag's column number (default the last)
    repair_iob: bool = False  # an I-X that starts an entity (after O or another type) becomes B-X; counted
    #                           either way, and strict IOB2 scoring does not count an entity that starts with I-
    overlap: int = 32  # sub-tokens shared by consecutive windows of a sentence longer than data.max_length


@dataclass
class QAArgs:
    """Extractive question answering (`task: question_answering`), SQuAD format."""

    max_seq_length: int = 384  # sub-tokens per window of question + context (the Hugging Face QA scripts' names)
    doc_stride: int = 128  # context sub-tokens shared by consecutive windows of a long context
    max_answer_tokens: int = 30  # the longest answer span considered, in sub-tokens
    best_spans: int = 20  # start and end candidates per window searched for the best valid span


@dataclass
class CheckArgs:
    """Data checks run before every training run; each policy is error | drop | warn."""

    on_leakage: str = "drop"  # train rows that also occur in validation/test (exact or near-duplicate)
    on_duplicates: str = "drop"  # repeated texts inside a split: keep the first
    on_conflicts: str = "drop"  # same normalised text with different labels: drop all of them
    on_empty: str = "drop"  # empty or whitespace-only texts
    near_duplicate_threshold: float = 0.8  # estimated Jaccard similarity of character n-gram sets
    ngram: int = 5  # characters per shingle for near-duplicate detection
    num_perm: int = 64  # MinHash permutations: more is more precise and slower
    examples: int = 5  # examples kept per finding in the report
    suspects: bool = True  # after training a classifier: rank its training rows by the model's probability of
    # their own label (suspects.csv and a report section; one inference pass over train)


@dataclass
class PromptArgs:
    """The prompting strategies: zero_shot, few_shot, retrieval_few_shot."""

    model: str = "smollm2-135m"  # causal LM: embedded name, local folder or hub id
    instruction: str = "Classify the sentiment of the text as {labels}. Answer with one word."  # name your task
    shots: int = 6  # few_shot: labelled train examples in the prompt, class-balanced, seeded
    retrieval_shots: int = 2  # retrieval_few_shot: each text's nearest train neighbours, the nearest last; each costs
    #                           about what the text itself costs (they are not in the shared prefix)
    verbalizers: list[str] | None = None  # the answer word of each label; default: the label names
    calibration: str = "train"  # train | content_free | none: where each class's mean score is estimated
    calibration_samples: int = 200  # train texts (seeded sample, labels unused) for calibration=train
    prompt_batch_size: int = 16  # rows per forward pass
    max_text_tokens: int = 64  # each text and each example is cut to this many tokens

    def __post_init__(self):
        self.validate()

    def validate(self) -> PromptArgs:
        if self.calibration not in CALIBRATIONS:
            raise AfinarError(f"prompt.calibration must be one of {', '.join(CALIBRATIONS)} "
                              f"(got {self.calibration!r})")
        for key in ("retrieval_shots", "calibration_samples", "prompt_batch_size", "max_text_tokens"):
            if getattr(self, key) <= 0:
                raise AfinarError(f"prompt.{key} must be greater than 0 (got {getattr(self, key)})")
        if self.shots < 0:
            raise AfinarError(f"prompt.shots must be 0 or more (got {self.shots})")
        return self


@dataclass
class CompareArgs:
    """`compare`: the encoder-based strategies, the fine-tuning overrides and the recommendation."""

    encoder: str = "minilm-l6"  # sentence encoder for knn_retrieval, linear_probe and retrieval_few_shot
    knn_k: list[int] = field(default_factory=lambda: [1, 5, 10, 25])  # neighbours; chosen on validation
    probe_c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse L2; chosen on val
    lora_overrides: list[str] = field(default_factory=lambda: ["lora.enabled=true", "train.learning_rate=1e-3"])
    full_overrides: list[str] = field(default_factory=lambda: ["lora.enabled=false"])
    sft_overrides: list[str] = field(default_factory=lambda: ["lora.enabled=true", "train.learning_rate=1e-3"])
    encode_batch: int = 64  # texts per encoder forward pass
    setfit_iterations: int = 20  # setfit: contrastive pairs drawn per train text (each direction)
    setfit_max_pairs: int = 4000  # setfit: cap on pairs in all, which bounds its fit time on larger sets
    setfit_batch_size: int = 16  # setfit: pairs per step
    isolate: bool = True  # each strategy in its own process: exact peak memory, nothing shared between them
    tolerance_points: float = 1.0  # recommend the cheapest strategy this close to the best validation accuracy


@dataclass
class Config:
    task: str = "classification"  # a name in the task registry (`tasks.registry`), checked when a command starts
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    checks: CheckArgs = field(default_factory=CheckArgs)
    lm: LMArgs = field(default_factory=LMArgs)
    sft: SFTArgs = field(default_factory=SFTArgs)
    preference: PreferenceArgs = field(default_factory=PreferenceArgs)
    tagging: TaggingArgs = field(default_factory=TaggingArgs)
    qa: QAArgs = field(default_factory=QAArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    compare: CompareArgs = field(default_factory=CompareArgs)

    def validate(self) -> Config:
        """Reject values that would only fail later, deep inside a library, with a worse message."""
        _one_of("train.precision", self.train.precision, PRECISIONS)
        for policy in ("on_leakage", "on_duplicates", "on_conflicts", "on_empty"):
            _one_of(f"checks.{policy}", getattr(self.checks, policy), POLICIES)
        if not 0 < self.checks.near_duplicate_threshold <= 1:
            raise AfinarError("checks.near_duplicate_threshold must be in (0, 1] "
                              f"(got {self.checks.near_duplicate_threshold})")
        _one_of("train.metric_for_best_model", self.train.metric_for_best_model, BEST_MODEL_METRICS)
        for key in ("train.batch_size", "train.gradient_accumulation_steps", "data.max_length", "data.max_text_chars",
                    "train.logging_steps", "lora.r", "lm.block_size", "lm.stride", "lm.forgetting_ratio",
                    "qa.max_seq_length", "qa.doc_stride", "qa.max_answer_tokens", "qa.best_spans"):
            _positive(key, get_value(self, key))
        for key in ("train.eval_batch_size", "train.eval_every", "train.learning_rate", "train.epochs",
                    "data.max_train_samples", "data.train_per_class", "data.max_eval_samples",
                    "data.max_test_samples"):
            if get_value(self, key) is not None:
                _positive(key, get_value(self, key))
        if not 0 < self.data.validation_fraction < 1:
            raise AfinarError(f"data.validation_fraction must be between 0 and 1 (got {self.data.validation_fraction})")
        if not 0 <= self.lm.replay_fraction < 1:
            raise AfinarError(f"lm.replay_fraction must be in [0, 1) (got {self.lm.replay_fraction})")
        unknown = [name for name in self.train.report_to if name not in ("tensorboard", "mlflow", "trackio", "wandb")]
        if unknown:
            raise AfinarError(f"train.report_to: unknown tracker {unknown[0]!r}; choose from tensorboard, mlflow, "
                              f"trackio, wandb")
        weights = self.train.class_weights
        if weights not in ("none", "balanced") and not re.fullmatch(r"\s*[^=,]+=\s*[0-9.eE+-]+\s*(,\s*[^=,]+=\s*"
                                                                    r"[0-9.eE+-]+\s*)*", weights):
            raise AfinarError(f"train.class_weights must be none, balanced or label=weight pairs such as "
                              f"negative=1,positive=5 (got {weights!r})")
        if self.train.min_steps < 0:
            raise AfinarError(f"train.min_steps must be 0 or more (got {self.train.min_steps})")
        if self.train.freeze_layers < 0:
            raise AfinarError(f"train.freeze_layers must be 0 or more (got {self.train.freeze_layers})")
        if not 0 <= self.train.warmup_ratio < 1:
            raise AfinarError(f"train.warmup_ratio must be in [0, 1) (got {self.train.warmup_ratio})")
        if self.lora.enabled and self.model.from_scratch:
            raise AfinarError("model.from_scratch with LoRA would train adapters on frozen random weights; set "
                              "lora.enabled=false to train the whole model from scratch")
        if self.lora.enabled and (self.train.fsdp or self.train.deepspeed):
            raise AfinarError("lora.enabled with train.fsdp or train.deepspeed: merging the adapters needs the whole "
                              "model in one process; train LoRA with DDP (afinar train --nproc N) instead")
        unknown_metrics = [m for m in self.sft.metrics if m not in ("rouge", "squad")]
        if unknown_metrics:
            raise AfinarError(f"sft.metrics: unknown metric {unknown_metrics[0]!r}; choose from rouge, squad")
        if bool(self.sft.prompt_column) != bool(self.sft.response_column or self.sft.reference_columns):
            raise AfinarError("sft.prompt_column needs sft.response_column (or sft.reference_columns), and they need "
                              "it: set both")
        _one_of("preference.loss", self.preference.loss, PREFERENCE_LOSSES)
        _positive("preference.beta", self.preference.beta)
        _positive("preference.generation_tokens", self.preference.generation_tokens)
        if self.preference.generations < 0:
            raise AfinarError(f"preference.generations must be 0 or more (got {self.preference.generations})")
        if not 0 < self.preference.test_fraction < 1:
            raise AfinarError(f"preference.test_fraction must be between 0 and 1 (got {self.preference.test_fraction})")
        self.prompt.validate()
        return self


SECTIONS = {"model": ModelArgs, "data": DataArgs, "train": TrainArgs, "lora": LoraArgs, "checks": CheckArgs,
            "lm": LMArgs, "sft": SFTArgs, "preference": PreferenceArgs, "tagging": TaggingArgs, "qa": QAArgs,
            "prompt": PromptArgs, "compare": CompareArgs}
MAIN_FIELD = {"model": "name", "data": "source", "lora": "enabled"}


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AfinarError(f"{key} must be one of {', '.join(allowed)} (got {value!r})")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise AfinarError(f"{key} must be greater than 0 (got {value})")


def all_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _resolve_key(key: str) -> str:
    """Expand the shorthands into a full dotted key, or explain which key was meant."""
    keys = all_keys()
    if key in keys:
        return key
    if key in MAIN_FIELD:
        return f"{key}.{MAIN_FIELD[key]}"
    owners = [k for k in keys if k.split(".")[-1] == key]
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise AfinarError(f"config key {key!r} is ambiguous: write one of {', '.join(owners)}")
    close = difflib.get_close_matches(key, keys + [k.split(".")[-1] for k in keys], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(keys)}"
    raise AfinarError(f"unknown config key {key!r}{hint}")


def get_value(config: Config, key: str) -> Any:
    obj: Any = config
    for part in _resolve_key(key).split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    spelled_none = isinstance(value, str) and value.lower() in ("none", "null", "~")
    if value is None or (spelled_none and (optional or base is not str)):
        if optional:
            return None
        raise AfinarError(f"{key} cannot be empty")
    origin = typing.get_origin(base)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else \
                list(value) if isinstance(value, (list, tuple)) else [value]
            item_type = (typing.get_args(base) or (str,))[0]
            return [_coerce(key, item.strip() if isinstance(item, str) else item, item_type) for item in items]
    except (TypeError, ValueError):
        pass
    else:
        raise AfinarError(f"{key}: unsupported field type {hint}")
    name = getattr(base, "__name__", str(base))
    raise AfinarError(f"{key} must be {name} (got {value!r})")


def set_value(config: Config, key: str, value: Any, raw: str | None = None) -> None:
    """Set `key`; `raw` is the command line's text, kept as it is for text fields (YAML would read
    `Sentiment: {text}` as a mapping)."""
    full = _resolve_key(key)
    *path, name = full.split(".")
    target: Any = config
    for part in path:
        target = getattr(target, part)
    hint = typing.get_type_hints(type(target))[name]
    text_field = hint is str or (typing.get_origin(hint) is not list and str in typing.get_args(hint))
    if raw is not None and value is not None and not isinstance(value, str) and text_field:
        value = raw  # YAML read text such as `Sentiment: {text}` (a mapping) or `1e-3` (a number)
    setattr(target, name, _coerce(full, value, hint))


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in SECTIONS:
            items += _flatten(value, f"{dotted}.")
        else:
            items.append((dotted, value))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML, so numbers, booleans and lists need no quoting rules."""
    if "=" not in text:
        raise AfinarError(f"override {text!r} must look like key=value, e.g. train.learning_rate=3e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AfinarError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise AfinarError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise AfinarError(f"config file {path} must hold a mapping of keys to values")
        for key, value in _flatten(loaded):
            set_value(config, key, value)
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for text in overrides or []:
        key, value = parse_override(text)
        set_value(config, key, value, raw=text.split("=", 1)[1].strip())
    return config.validate()


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
