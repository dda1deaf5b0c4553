"""calq's shared package: what the producer and the worker both need, in layers.

Each subpackage imports only the ones above it in this list, never below:

- ``contract``  domain names, errors, job and summary schemas, settings (no I/O)
- ``storage``   the object store, its key layout, NetCDF encoding, the summary catalog
- ``data``      calibration datasets: reading, validation, event rows, synthetic seasons
- ``stats``     metrics, MCMC diagnostics, forecast evaluation (numpy/scipy/arviz; no JAX)
- ``fit``       the model, the compiled NUTS sampler, calibrate() and posterior use (JAX)
- ``jobs``      running one job: the runner, the handler's state machine, the registry, Celery config

``producer/`` and ``worker/`` import this package and never each other.
The layering is checked by ``tests/test_layers.py``.
"""

__version__ = "0.1.0"
