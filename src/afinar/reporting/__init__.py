"""Handing results to people and tools: self-contained HTML reports with plots, Hugging Face model cards and hub
pushes, experiment trackers.
"""
