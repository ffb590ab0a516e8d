"""HTTP servers over a finished run: the shared base (guards, micro-batching, health), the prediction API and the
OpenAI-compatible API; the app is chosen by the run's task.
"""
