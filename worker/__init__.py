"""The worker side of calq: a thin Celery shell over :mod:`shared.fit.calibrate`."""
