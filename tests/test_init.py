"""The package's public API: importing it is cheap, and every name in `__all__` resolves."""

import subprocess
import sys

import afinar


def test_import_is_light_and_every_public_name_resolves():
    probe = "import sys, afinar; print('transformers.trainer' in sys.modules, 'afinar.tasks.classification' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"]  # Trainer is imported only when something trains
    for name in afinar.__all__:
        assert getattr(afinar, name) is not None
    assert afinar.TrainResult.__module__ == "afinar.training.lifecycle" and afinar.check.__module__ == "afinar.api"


def test_predicting_serving_and_prompting_never_import_the_training_stack():
    probe = ("import sys, afinar.tasks.classification, afinar.serving.app, afinar.experiments.prompting, afinar.inference.predictors; "
             "print('transformers.trainer' in sys.modules, 'afinar.training.trainer' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr[-2000:]
