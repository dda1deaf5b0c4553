"""Statistics without JAX: scoring kernels (metrics), MCMC diagnostics, forecast evaluation."""
