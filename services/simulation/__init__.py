"""Simulation: the product's own cycle with the simulated labeler, measured.

data        arrays (FILE.npz, the demo's digits), checks, each seed's split and initial labels
config      arms (strategy x loss, as project settings) and the label schedule
deployment  one run's embedded deployment: SQLite, a local store, the project, its labeler
run         runs arms x seeds (in worker processes), each cycle by the in-process runner
records     what a run records; summary: intervals, curves, areas, labels-to-target
report      results.json and the learning-curve plot; demo: digits with digit 8 rare
"""
