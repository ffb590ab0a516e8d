"""Experiments made of many runs: the strategy bake-off (prompting, retrieval, probes, fine-tuning), hyperparameter
search, learning curves, several seeds.
"""
