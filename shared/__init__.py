"""calq's shared contract: settings, schemas, errors, storage and the statistics.

Both the producer and the worker import this package; neither imports the other.
"""

__version__ = "0.1.0"
