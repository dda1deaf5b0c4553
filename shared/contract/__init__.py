"""The contract: domain names, the error tree, job and summary schemas, queue names, settings. Pure pydantic, no I/O."""
