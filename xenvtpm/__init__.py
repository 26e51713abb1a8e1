"""xenvtpm: the Xen virtual TPM split driver (frontend, backend, vTPM manager).

Standard library only, so it deploys into any dom0 or domU by copying this folder and
runs as ``python3 -m xenvtpm frontend|backend|manager ...``.
"""

__version__ = "0.1.0"
