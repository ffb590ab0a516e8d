"""Predicting with a saved model: predictors and backends (PyTorch, ONNX), sentence embeddings, text generation, and
ONNX export checked against PyTorch.
"""
