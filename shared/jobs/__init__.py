"""One job's life: the runner (fetch → calibrate → write), the handler's state machine, the registry, Celery config."""
