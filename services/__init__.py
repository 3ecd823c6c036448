"""focalloop: the domain and the HTTP service (everything that is not a worker or labeling)."""
