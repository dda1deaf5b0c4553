"""The calibration API: producers hold a token, not the fleet's keys.

``calq serve`` runs :func:`producer.api.app.create_app` with uvicorn; a
producer's :class:`~producer.client.CalibrationClient` speaks to it through
:class:`producer.api.remote.RemoteClient` when ``CALQ_API__URL`` and
``CALQ_API__TOKEN`` are set.

- :mod:`producer.api.app`: the factory, auth, error answers, the body cap;
- :mod:`producer.api.routes`: the endpoints;
- :mod:`producer.api.tokens`: tokens, stored as sha256 hashes;
- :mod:`producer.api.admission`: quotas and who owns a job;
- :mod:`producer.api.calibrations`: the in-memory draws behind ``/v1/calibrate``;
- :mod:`producer.api.remote`: the HTTP client;
- :mod:`producer.api.schemas`: request and response bodies.
"""
