"""The dispatcher: turns a validated job into Celery tasks and tracks it. No GPU stack here."""
