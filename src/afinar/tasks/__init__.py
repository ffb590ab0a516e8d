"""The tasks (classification, multi-label, causal LM, instruction tuning) and the registry that maps a task name to
what the task means, before and after training.
"""
