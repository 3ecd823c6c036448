"""`focalloop tune`: cross-validated search of the focal loss's gamma and alpha."""
