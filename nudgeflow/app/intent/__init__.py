"""`nudgeflow model train`: the intent model's data set, training, evaluation and export.

Training needs scikit-learn (the `train` extra); serving does not
(`nudgeflow.core.intent.model` scores the exported arrays in plain Python).
"""
