"""Pure audio code: decoding, resampling, the preset catalogue, model families and the engine.

Nothing in this package imports Celery, boto3 or FastAPI, so it runs from a CLI, a
notebook or a test as well as from a worker.
"""
