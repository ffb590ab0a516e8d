"""afinar: fine-tune pretrained language models on your data, honestly measured, on the machine you have.

The public API lives in `afinar.api` (one function per CLI subcommand) and is re-exported here on first use:
`import afinar` stays light, and `afinar.check` or `afinar.predict` never pay for what they do not call.
"""

import importlib

from afinar.core.config import Config, load_config
from afinar.core.errors import AfinarError

__version__ = "0.1.0"

_LAZY = {"train": "afinar.api", "check": "afinar.api", "evaluate": "afinar.api", "predict": "afinar.api",
         "generate": "afinar.api", "export": "afinar.api", "forgetting": "afinar.api", "report": "afinar.api",
         "push": "afinar.api", "compare": "afinar.api", "curve": "afinar.api", "search": "afinar.api",
         "serve": "afinar.api", "TrainResult": "afinar.training.lifecycle", "DataReport": "afinar.data.checks",
         "SearchResult": "afinar.experiments.search", "Task": "afinar.tasks.base",
         "register_task": ("afinar.tasks.registry", "register")}


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'afinar' has no attribute {name!r}")


__all__ = ["AfinarError", "Config", "DataReport", "SearchResult", "Task", "TrainResult", "check", "compare", "curve",
           "evaluate", "export", "forgetting", "generate", "load_config", "predict", "push", "register_task",
           "report", "search", "serve", "train"]
