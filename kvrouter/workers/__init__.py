"""Several worker processes behind one port (``kvrouter --workers N``).

* :mod:`~kvrouter.workers.supervisor`: the parent process (sockets, fork, signals, restarts);
* :mod:`~kvrouter.workers.worker`: what a worker gets from it (addresses, links, control);
* :mod:`~kvrouter.workers.sync`: the routing state the workers share, and how (their
  :class:`~kvrouter.shared.SharedState`: links, batching, periodic load shares, admin hooks);
* :mod:`~kvrouter.workers.replica`: the registry records (versions, tombstones) and the
  prefix-index copy, independent of the links;
* :mod:`~kvrouter.workers.channel`: the SEQPACKET links, batched and non-blocking;
* :mod:`~kvrouter.workers.events`: the event shapes (reusable by replicas sharing state).
"""
