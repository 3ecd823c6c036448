"""Celery workers: the app factory, thin idempotent task adapters over `services`, the beat
schedule and queue routing (queues `gpu` and `io`). Nothing in `services` imports this package."""
