"""Benchmarks of the driver pair (issue 6): ``nox -s bench`` or ``python -m harness.bench``.

It lives in the harness because it is built from the harness's own parts (the ``direct``
and ``sim`` targets, ``TransportTCTI``, ``tpmwire``) and is type-checked and linted
with them.

    stats.py      percentiles, ratios, goals, tables (pure; unit-tested)
    procs.py      pinning, CPU time, context switches, RSS from /proc
    latency.py    four workloads on the direct and driver paths, interleaved
    profiling.py  CPU per command, py-spy, strace -c
    scale.py      N guests in closed loops on one backend and manager
    plot.py       latency against instances (PNG)
    cli.py        the run and its outputs
    xen.py        --target xen: a Xen guest's /dev/tpm0 against swtpm in dom0
    tpm_timing.py the stdlib timing loop xen.py runs inside the domains
"""
