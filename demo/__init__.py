"""The loop demo: the whole product run end to end on the local stack (``prefstream demo``, ``make demo``).

It drives the deployables from outside, as an application and an operator would (starting them as
processes, calling their gRPC APIs, reading Kafka and the registry), so it sits beside them rather
than in ``prefstream/``: nothing in gateway/, trainer/ or scorer/ imports it.  ``bench freshness``
and the end-to-end test reuse :func:`demo.run.run_demo`.
"""
