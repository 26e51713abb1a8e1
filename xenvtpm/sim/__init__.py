"""The simulated Xen: simxend (xenstore server, grants, event channels) and the adapter
that speaks to it through ``xen.interface``.

For tests and ``--target sim`` only: a deployment on real Xen leaves this room out
(``xen.open_hypervisor`` imports it only when ``XENVTPM_SIM_*`` is set).
"""
