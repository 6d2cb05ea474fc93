"""The ``gradbalance distill`` experiment: data, models, methods, one training loop, report, plots.

Importing :mod:`gradbalance.experiments.distill` or :mod:`gradbalance.experiments.plots` needs the
``examples`` extra (matplotlib, tqdm; mnist1d and scikit-learn for their datasets).
"""
