"""The lowest layer: typed config from YAML, errors, the run folder (manifest, metrics, atomic writes, resume),
embedded assets and loading pretrained models and tokenizers.
"""
