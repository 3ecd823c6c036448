"""Versioned dataset store (local directory or S3), manifests and pool registration."""
