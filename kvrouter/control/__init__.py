"""The control plane: the router's own calls to instances, off the request path.

Health probes and the health state machine (:mod:`~kvrouter.control.health`), background
``/metrics`` scrapes and the ``/v1/models`` cache (:mod:`~kvrouter.control.scraper`), all
through one pooled aiohttp session (:mod:`~kvrouter.control.transport`). What differs between
engines (gauge names, endpoints) is read from :mod:`kvrouter.backends.engines`.
"""
