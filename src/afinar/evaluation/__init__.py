"""Measuring: metrics with bootstrap intervals, the diagnosis of training curves, catastrophic forgetting, suspect
labels, and what differs between two runs.
"""
