"""Scaling laws from a sweep of budgeted runs: reading its points, the Chinchilla fit, the
IsoFLOP minima, plots and the report (the app is ``mtrain.scaling``)."""
