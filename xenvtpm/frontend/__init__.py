"""The guest's half: the xenbus handshake, the ring, and the guest's TPM device.

Needed in every guest that runs our frontend (not in dom0, not in a guest that uses the
kernel's own ``xen-tpmfront``). Imports the shared protocol modules and ``xen/``.
"""
