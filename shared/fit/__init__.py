"""The fit: the calibration model, the compiled NUTS sampler, calibrate() and posterior use.

Importing this package is cheap; its modules import JAX (``device`` excepted:
it must run before JAX starts).
"""
