"""Labeling: the Label Studio gateway (the only code importing label_studio_sdk), task and
prediction payloads, annotation parsing, and the simulated annotator used without people."""
