def __getattr__(name: str):
    # Imported lazily: Django imports this package while it sets itself up (it is an app, for
    # its management commands), and the Celery app needs Django set up first.
    if name == "app":
        from workers.celery import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app"]
