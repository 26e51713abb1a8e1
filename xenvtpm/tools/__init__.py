"""What the harness and operators run beside the driver: the toolstack's attach and
detach, the hostile frontend (rogue), the probe and the guest-side relay.

A production dom0 needs ``toolstack.py`` only if no other toolstack writes the vTPM's
xenstore directories; a production guest needs none of this room.
"""
