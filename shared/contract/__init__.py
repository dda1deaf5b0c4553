"""The contract: domain names, the error tree, job and summary schemas, settings. Pure pydantic, no I/O."""
