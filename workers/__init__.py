"""Celery app and tasks: thin adapters from queue messages (ids) to the pipelines."""
