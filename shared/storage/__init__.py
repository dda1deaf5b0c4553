"""Object storage: the fsspec store and its key layout, NetCDF encoding, the catalog of stored summaries."""
