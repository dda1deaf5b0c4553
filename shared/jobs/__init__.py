"""One job's life: the runner (fetch → calibrate → summarize → write), the handler's state machine, the registry, Celery config."""
