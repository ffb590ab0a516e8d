"""afinar: fine-tune pretrained language models on your data, honestly measured, on the machine you have."""

import importlib

from afinar.config import Config, load_config
from afinar.errors import AfinarError

__version__ = "0.1.0"

# Imported on first use: `transformers.Trainer` and friends take seconds to import, and `afinar check` or
# `afinar predict` should not pay for what they never call.
_LAZY = {"DataReport": "afinar.checks", "check": "afinar.checks", "TrainResult": "afinar.lifecycle",
         "evaluate": "afinar.classify", "predict": "afinar.classify", "SearchResult": "afinar.search",
         "search": "afinar.search"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'afinar' has no attribute {name!r}")


def train(config: Config | str | None = None, overrides: list[str] | None = None):
    """Train what `config` describes (a `Config`, or a YAML path plus `key=value` overrides); returns a
    `TrainResult`."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    if config.task == "causal_lm":
        from afinar.causal_lm import train_lm

        return train_lm(config)
    if config.task == "sft":
        from afinar.sft import train_sft

        return train_sft(config)
    if config.task == "multilabel" or config.data.label_columns:
        from afinar.multilabel import train_multilabel

        config.task = "multilabel"
        return train_multilabel(config)
    from afinar.classify import train as train_classifier

    return train_classifier(config)


def generate(model: str, prompt: str, **options) -> str:
    """Sample a continuation from a causal LM (see `afinar.causal_lm.generate`)."""
    from afinar.causal_lm import generate as sample

    return sample(model, prompt, **options)


def compare(config: Config | str | None = None, strategies: str | list[str] = "all", out_dir: str | None = None,
            resume: bool = False):
    """Run several strategies on the same splits and recommend one (see `afinar.strategies.compare`); call it
    under `if __name__ == "__main__":`, since each strategy runs in a spawned process."""
    from afinar.strategies import compare as run_comparison

    if not isinstance(config, Config):
        config = load_config(config)
    return run_comparison(config, strategies, out_dir, resume=resume)


def curve(config: Config | str | None = None, strategy: str = "full", sizes: list[int] | None = None,
          out_dir: str | None = None, resume: bool = False):
    """How much data do I need? `strategy` on growing nested subsets of train (see `afinar.curve.learning_curve`)."""
    from afinar.curve import learning_curve

    if not isinstance(config, Config):
        config = load_config(config)
    return learning_curve(config, strategy, sizes, out_dir, resume=resume)


def serve(run_dir: str, **options) -> None:
    """Serve a run over HTTP (see `afinar.serve.serve`); imported lazily so `import afinar` stays light."""
    from afinar.serve import serve as run_server

    run_server(run_dir, **options)


__all__ = ["AfinarError", "Config", "DataReport", "SearchResult", "TrainResult", "check", "compare", "curve",
           "evaluate", "generate", "load_config", "predict", "search", "serve", "train"]
