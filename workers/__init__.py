"""Per-GPU workers: Celery processes that keep a model resident and render chunks.

Nothing here imports torch at module level except the modules that render; the
Celery parent process stays free of CUDA so its forked child can initialise it.
"""
