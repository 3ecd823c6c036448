"""`focalloop tune`: cross-validated search of the focal loss's gamma and alpha."""

# The Celery task a gpu worker runs for one trial (workers/tasks.py registers it by this name;
# services send it by name and never import the workers package). Here, in the package's light
# root, so that the worker app can route it without importing torch.
TRIAL_TASK = "focalloop.tune_trial"
