"""Resolve a model name to weights on disk and load tokenizer + model safely.

Safety defaults: safetensors only (pickle `.bin` weights can run code when loaded) and no remote code.
GPT-2-style tokenizers have no pad token; `load_tokenizer` sets it and `load_classifier` copies its id into
`model.config.pad_token_id`, without which batches fail and a padded row is classified from a pad position.
`model.from_scratch` builds the same architecture with random weights instead (`instantiate`).
"""

from __future__ import annotations

from pathlib import Path

from afinar.core import assets
from afinar.core.config import ModelArgs
from afinar.core.errors import AfinarError


def resolve(args: ModelArgs) -> str:
    """A local folder for embedded names and paths; the hub id otherwise (hub loading checks the cache)."""
    if args.name in assets.MODELS:
        return str(assets.model_path(args.name))
    path = Path(args.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise AfinarError(f"model folder {path} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if args.name.startswith((".", "/", "~")):
        raise AfinarError(f"model folder {args.name} does not exist")
    return args.name


def hub_error(args: ModelArgs, exc: Exception) -> AfinarError:
    import os

    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return AfinarError(f"model {args.name!r} is not a local folder, not an embedded name "
                       f"({', '.join(assets.MODELS)}), and could not be loaded from the Hugging Face hub "
                       f"{'(offline: HF_HUB_OFFLINE=1)' if offline else ''}: {first}")


def loading_options(args: ModelArgs) -> dict:
    return {"revision": args.revision, "trust_remote_code": args.trust_remote_code}


def load_tokenizer(args: ModelArgs, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **loading_options(args))
    except (OSError, ValueError) as exc:
        raise hub_error(args, exc) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AfinarError(f"tokenizer of {args.name!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_safetensors(path: str, args: ModelArgs) -> None:
    folder = Path(path)
    if not folder.is_dir() or args.allow_pickle:
        return
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise AfinarError(f"{folder} holds only pickle .bin weights, which can execute code when loaded; "
                          f"convert them to safetensors, or opt in with --set model.allow_pickle=true")


def instantiate(auto_class, path: str, args: ModelArgs, dtype=None, **config_overrides):
    """`auto_class` (an `AutoModelFor...`) from the checkpoint at `path`, `config_overrides` (num_labels, id2label,
    ...) applied to its config; with `args.from_scratch`, the same architecture built from that config alone, its
    weights randomly initialised (seeded by the caller's `set_seed`) and no weights read."""
    from transformers import AutoConfig

    dtype_option = {} if dtype is None else {"dtype": dtype}
    try:
        if args.from_scratch:
            config = AutoConfig.from_pretrained(path, **config_overrides, **loading_options(args))
            return auto_class.from_config(config, trust_remote_code=args.trust_remote_code, **dtype_option)
        check_safetensors(path, args)
        return auto_class.from_pretrained(path, use_safetensors=None if args.allow_pickle else True,
                                          **config_overrides, **dtype_option, **loading_options(args))
    except (OSError, ValueError) as exc:
        raise hub_error(args, exc) from None


def load_classifier(args: ModelArgs, label_names: list[str], tokenizer, path: str | None = None):
    """`AutoModelForSequenceClassification` with the label names and the tokenizer's pad id in its config."""
    from transformers import AutoModelForSequenceClassification

    model = instantiate(AutoModelForSequenceClassification, path or resolve(args), args, num_labels=len(label_names),
                        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    model.config.pad_token_id = tokenizer.pad_token_id
    # Its loss is the batch mean and ignores `num_items_in_batch`, yet its forward takes **kwargs, so `Trainer`
    # would treat it as normalised already: it skips dividing by gradient accumulation and multiplies by the
    # number of DDP processes (2 processes: twice the loss and gradients, in training and evaluation).
    model.accepts_loss_kwargs = False
    return model


def save_tokenizer(tokenizer, folder) -> None:
    """`save_pretrained` without the padding and truncation state the last call left on a fast tokenizer's
    backend (`tokenizer.json` would otherwise differ between identical runs, and pad everything it later reads
    to that call's length)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(folder)


def load_causal_lm(args: ModelArgs, path: str | None = None, tokenizer=None):
    """`AutoModelForCausalLM` in fp32 (training keeps fp32 weights; autocast does the rest), safetensors only
    (unless `model.allow_pickle`), and a pad token id."""
    import torch
    from transformers import AutoModelForCausalLM

    model = instantiate(AutoModelForCausalLM, path or resolve(args), args, dtype=torch.float32)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def cache_argument(model) -> str:
    """The forward argument that takes a key/value cache: transformers 5.x renamed `past_key_values` to `cache`
    (the old name still works, with a warning per call)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The key/value cache a forward pass returned, under either name."""
    return output["cache"] if "cache" in output else output.get("past_key_values")


def max_positions(model_or_config) -> int | None:
    """How many token positions a model's (or a model config's) position embeddings cover; None: no fixed limit."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
