"""afinar: fine-tune pretrained language models on your data, honestly measured, on the machine you have."""

from afinar.checks import DataReport, check
from afinar.classify import TrainResult, evaluate, predict
from afinar.classify import train as train_classifier
from afinar.config import Config, load_config
from afinar.errors import AfinarError
from afinar.search import SearchResult, search

__version__ = "0.1.0"


def train(config: Config | str | None = None, overrides: list[str] | None = None) -> TrainResult:
    """Train what `config` describes (a `Config`, or a YAML path plus `key=value` overrides)."""
    if not isinstance(config, Config):
        config = load_config(config, overrides)
    if config.task == "causal_lm":
        from afinar.causal_lm import train_lm

        return train_lm(config)
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


def serve(run_dir: str, **options) -> None:
    """Serve a run over HTTP (see `afinar.serve.serve`); imported lazily so `import afinar` stays light."""
    from afinar.serve import serve as run_server

    run_server(run_dir, **options)


__all__ = ["AfinarError", "Config", "DataReport", "SearchResult", "TrainResult", "check", "compare", "evaluate",
           "generate", "load_config", "predict", "search", "serve", "train"]
