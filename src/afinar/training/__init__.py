"""One run's life, the same for every task (the lifecycle), the one Trainer builder, precision choice, scaling settings
to the data and CPU speed-ups.
"""
