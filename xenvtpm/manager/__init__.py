"""The seed's ``/dev/vtpm``: one swtpm per vTPM instance, routed by instance id.

Needed in dom0. Provisioning and the operator's reset live here too. Imports neither
``backend/`` nor ``xen/``: the manager knows packets and instances, not Xen.
"""
