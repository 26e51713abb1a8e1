"""dom0's half: the backend device per guest, its rings, the intake check, the link to
the manager, and the traffic trace.

Needed in dom0 (the backend domain). Imports the shared protocol modules and ``xen/``,
never ``manager/``: the two meet only on the manager's socket.
"""
