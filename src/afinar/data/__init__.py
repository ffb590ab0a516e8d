"""Reading data from files and the hub, splits and subsets, the data checks (quality, leakage) and their policies, the
tokenize cache, and chat rendering with the loss mask.
"""
