"""The learning core: focal losses, networks, training, scoring, metrics, calibration.

Pure: this package takes arrays/tensors and parameters and returns results. It imports nothing
from the project except the leaf error hierarchy in `services.errors`.
"""
