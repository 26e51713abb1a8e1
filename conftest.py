"""The fixtures every scenario uses, for every target (``--target sim|direct|xen`` or
``--target ssh://root@HOST --host-guest NAME[=ADDRESS] ...``, an existing Xen host).

Chain (STYLE.md 9): ``target`` (session: brought up once, down at the end) -> ``guests``
/ ``guest`` -> ``raw_tpm`` / ``esapi`` (per test). ``@pytest.mark.needs("cap", ...)``
skips a scenario on targets lacking a capability, with the reason shown. A scenario
reaches a capability's operations through its fixture (``faults``, ``xl``, ``xl_devices``
... in ``harness/capability_fixtures.py``), typed by its protocol in ``harness.target``;
the fixture skips the scenario the same way on a target without it, before the target
comes up.

A failing test's report lists the daemon logs; with ``--artifacts DIR`` (or ``--junitxml
DIR/junit.xml``) every log of a failing run is copied to ``DIR/logs/``. A summary table
ends the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.crash_watch import Crash, CrashAlarm
from harness.errors import HarnessError
from harness.target import Capability, Guest, Target
from harness.targets import TARGETS, capabilities_of, make_target, target_class
from harness.transport import RawTransport

# A fixture per capability (faults, xl, ...); the own-build flags (--xen, --tpmfront ...)
pytest_plugins = ["harness.capability_fixtures", "harness.own_build_options"]
MARKERS = {
    "needs(*capabilities)": "skip unless the target has every named capability",
    "hostile": "a frontend that breaks the rules",
    "xen": "needs a real Xen hypervisor",
    "device": "needs a kernel TPM device (/dev/tpm0) in the guest",
    "external": "suites not written for this driver (kernel tpm2 selftests, tpm2-tools)",
    "crashes": "crashes a guest on purpose: restored after it, the crash expected",
    "powercut": "kills the whole machine and cold-boots it (minutes): only with -m powercut",
}
# Markers whose scenarios run only when the -m expression names them (opt-in).
OPT_IN = {"powercut": "opt-in (a cold boot of Xen under TCG takes minutes): -m powercut"}
TPM_RC_INITIALIZE = 0x100

_TARGET_KEY = pytest.StashKey["Target"]()
_FAILED_KEY = pytest.StashKey[bool]()
_BRINGUP_KEY = pytest.StashKey[float]()  # seconds the target took to come up, until reported
_CLEAN_KEY = pytest.StashKey[str]()  # the collector whose last test left the target healthy
_ITEM_FAILED_KEY = pytest.StashKey[bool]()
_CRASHES_KEY = pytest.StashKey[int]()  # how many of the target's crashes were reported
_STARTED_KEY = pytest.StashKey[float]()  # a test's start, wall clock: its trace window
_TRACED_KEY = pytest.StashKey[bool]()  # the test's report has its TPM traffic already
CLOCK_SLACK = 0.5  # seconds: dom0's clock is set from this host's at each warm start
SLOWEST = 10  # scenarios listed by time at the end of a run


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xenvtpm")
    group.addoption(
        "--target",
        default="sim",
        help=f"where guests run: {', '.join(TARGETS)}, or ssh://root@HOST[:PORT], an "
        "existing Xen host (default sim)",
    )
    group.addoption("--guests", type=int, default=2, help="number of guests (default 2)")
    group.addoption(
        "--host-guest",
        action="append",
        default=[],
        metavar="NAME[=ADDRESS]",
        help="ssh:// targets: a running guest to use (xl domain name; ADDRESS: its SSH "
        "address, reached through dom0; default: looked up); repeat for more guests",
    )
    group.addoption(
        "--ssh-key",
        default=None,
        help="ssh:// targets: the private key for dom0 and the guests (default "
        "$XENVTPM_SSH_KEY, else your default keys and agent)",
    )
    group.addoption(
        "--known-hosts",
        action="append",
        default=[],
        metavar="FILE",
        help="ssh:// targets: a known_hosts file with the host keys of dom0 and the "
        "guests, besides ~/.ssh/known_hosts; repeatable",
    )
    group.addoption(
        "--accept-new-host-keys",
        action="store_true",
        help="ssh:// targets: log in to dom0 or a guest whose host key no known_hosts "
        "file has (default: refuse); each key is recorded in the report. A changed key "
        "is always refused",
    )
    group.addoption(
        "--guest-kind",
        choices=("python", "kernel"),
        default="python",
        help="ssh:// targets: the guests' frontend: ours (python, default) or their "
        "kernel's own xen-tpmfront (kernel: the guests need only python3 and the module)",
    )
    group.addoption(
        "--destructive",
        action="store_true",
        help="ssh:// targets: the host's owner allows the scenarios that restart the "
        "driver's daemons, kill a guest's swtpm and xl reboot a guest (default: skipped)",
    )
    group.addoption(
        "--attach",
        action="store_true",
        help="run against the environment `python -m harness up` left running "
        "(its target and guests; scenarios that would restart it are skipped)",
    )
    group.addoption(
        "--keep-on-failure",
        action="store_true",
        help="stop at the first failure and leave the environment running, as `python "
        "-m harness up` does (sim, direct, xen, xen-kernel); how to reach it is printed",
    )
    group.addoption(
        "--artifacts",
        default=None,
        help="artifacts directory: every daemon log is copied to ARTIFACTS/logs/ when a "
        "test fails (default: the directory of --junitxml, when given)",
    )


def _terminate_as_interrupt(signum: int, _frame: object) -> None:
    """SIGTERM (e.g. from ``timeout``) interrupts like Ctrl-C, so teardown still runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def _target_setup(config: pytest.Config) -> tuple[int, dict[str, Any]]:
    """The guest count and the target's own options: an ``ssh://`` host's guests are
    the ``--host-guest`` ones; other targets make ``--guests`` guests. The user's own
    pieces (``--xen FILE``...) go to Xen targets only."""
    from harness.own_build_options import own_build  # a plugin: pytest loaded it first

    own = {"own_build": built} if (built := own_build(config)) else {}
    if "://" not in config.getoption("--target"):
        return config.getoption("--guests"), own
    from harness.hostkeys import resolve_known_hosts
    from harness.targets.host_spec import HostSpec, parse_guests, resolve_key

    HostSpec.parse(config.getoption("--target"))
    resolve_key(config.getoption("--ssh-key"))
    resolve_known_hosts(config.getoption("--known-hosts"))
    guests = parse_guests(config.getoption("--host-guest"))
    options = {
        "host_guests": config.getoption("--host-guest"),
        "ssh_key": config.getoption("--ssh-key"),
        "known_hosts": config.getoption("--known-hosts"),
        "accept_new_host_keys": config.getoption("--accept-new-host-keys"),
        "guest_kind": config.getoption("--guest-kind"),
        "destructive": config.getoption("--destructive"),
        **own,
    }
    return len(guests), options


def pytest_configure(config: pytest.Config) -> None:
    try:
        target_class(config.getoption("--target"))
    except ValueError as e:
        raise pytest.UsageError(f"--target: {e}") from e
    if not config.getoption("--attach"):
        try:
            _target_setup(config)
        except (ValueError, HarnessError) as e:
            raise pytest.UsageError(str(e)) from e
    _check_workers(config)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    config.stash[_FAILED_KEY] = False
    config.pluginmanager.register(_Summary(config), "xenvtpm-summary")


def _check_workers(config: pytest.Config) -> None:
    """pytest-xdist (``-n N``): each worker brings up its own environment, so workers
    share no run directory, socket, vTPM instance or NV index, and never stop another's
    daemons. That holds for the sim target; a Xen machine per worker (two TCG QEMUs on
    this 2-core host) and a shared ``--attach`` environment are refused, by name."""
    workers = config.getoption("numprocesses", None)
    if not workers:
        return
    if config.getoption("--attach"):
        raise pytest.UsageError("-n: --attach shares one environment; workers may not")
    if config.getoption("--keep-on-failure"):
        raise pytest.UsageError("-n: --keep-on-failure keeps one environment, not one a worker")
    target = config.getoption("--target")
    if target != "sim":
        raise pytest.UsageError(
            f"-n {workers}: scenarios spread over workers on --target sim only, each worker "
            f"with its own simulated Xen; --target {target} would start one machine per "
            "worker (see README, Benchmarks: -n on Xen)"
        )


def _worker() -> str:
    """This pytest-xdist worker's id ("gw0", ...), or "" without xdist."""
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def _attached_record(config: pytest.Config) -> Any:
    """The run record of ``harness up`` for ``--attach`` (UsageError if nothing is up)."""
    from harness.state import RunState

    record = RunState().load()
    if record is None:
        raise pytest.UsageError("--attach: nothing is up; start it with: python -m harness up")
    return record


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from harness import capability_fixtures  # imported by pytest_plugins, rewritten first

    if config.getoption("--attach"):
        from harness.targets.attached import AttachedTarget

        record = _attached_record(config)
        name = f"{record.target} (attached)"
        caps = AttachedTarget.capabilities_for(record)
    else:
        name = config.getoption("--target")
        guests, options = _target_setup(config)
        caps = capabilities_of(name, guests, **options)
    config.stash[capability_fixtures.CAPS_KEY] = (name, caps)  # what they skip by
    markexpr = config.getoption("markexpr", "") or ""
    for item in items:
        for marker, why in OPT_IN.items():
            if item.get_closest_marker(marker) and marker not in markexpr:
                item.add_marker(pytest.mark.skip(reason=why))
        for mark in item.iter_markers("needs"):
            for cap in mark.args:
                if cap not in caps:
                    item.add_marker(
                        pytest.mark.skip(reason=f"target {name} lacks capability {cap}")
                    )
                    break


# -- progress while the environment comes up --------------------------------------------
def _progress(config: pytest.Config) -> Any:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")

    def say(message: str) -> None:
        if reporter is None:
            return
        cm = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with cm:
            reporter.write_line(f"[harness] {message}")

    return say


def _logs_dir(config: pytest.Config) -> Path | None:
    """Where a failed run's daemon logs go: ``ARTIFACTS/logs``, one directory further
    per pytest-xdist worker (each has daemons of its own)."""
    explicit = config.getoption("--artifacts")
    junit = config.getoption("xmlpath", None)
    if explicit:
        logs = Path(explicit) / "logs"
    elif junit:
        logs = Path(junit).parent / "logs"
    else:
        return None
    return logs / _worker() if _worker() else logs


def _all_logs(target: Target) -> dict[str, Path]:
    logs = dict(target.logs())
    for g in target.guests:
        logs.update(g.logs())
    return logs


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    config = request.config
    say = _progress(config)
    tgt: Any
    if config.getoption("--attach"):
        from harness.targets.attached import AttachedTarget

        tgt = AttachedTarget(_attached_record(config), say)
        say(f"attaching to the running {tgt.name} environment in {tgt.run_dir}")
    else:
        count, options = _target_setup(config)
        run_dir, keep = None, config.getoption("--keep-on-failure")
        if keep:
            from harness import keep_on_failure

            run_dir = keep_on_failure.prepare(config.getoption("--target"))
        name = config.getoption("--target")
        tgt = make_target(name, count, run_dir, say, detached=keep, **options)
        say(f"bringing up target {tgt.name} with {count} guests")
    t0 = time.monotonic()
    config.stash[_TARGET_KEY] = tgt
    failed, up = True, False
    try:
        tgt.start()
        up = True
        config.stash[_BRINGUP_KEY] = time.monotonic() - t0
        say(f"target {tgt.name} ready in {config.stash[_BRINGUP_KEY]:.1f} s")
        yield tgt
        failed = config.stash[_FAILED_KEY] or request.session.testsfailed > 0
    finally:
        try:
            if failed and up and config.getoption("--keep-on-failure") and not _INTERRUPTED:
                from harness import keep_on_failure

                keep_on_failure.hand_over(tgt, say)
                failed = False  # nothing to copy or keep: it all still runs
            else:
                tgt.close()
        finally:
            logs = _all_logs(tgt)
            dest = _logs_dir(config)
            if failed and dest is not None:
                dest.mkdir(parents=True, exist_ok=True)
                for name, path in logs.items():
                    if path.exists():
                        shutil.copy2(path, dest / f"{name}.log")
                say(f"copied {len(logs)} logs to {dest}")
            if failed and not config.getoption("--attach"):
                say(f"kept run directory {getattr(tgt, 'run_dir', '?')}")
            else:
                remove = getattr(tgt, "remove_run_dir", None)
                if remove is not None:
                    remove()


@pytest.fixture(autouse=True)
def _healthy_target(request: pytest.FixtureRequest) -> Iterator[None]:
    """A daemon that crashed fails the test during which it crashed (at teardown), and
    the environment is restarted so that one crash does not fail every later test.

    The check after a test is the one before the next, as long as nothing ran between:
    so before a test it runs only after a failure, or when the previous test was in
    another module or class (whose fixtures have been torn down since). A ``device``
    scenario opens the guest's TPM device itself: the harness's relays let go of it
    first (``harness.relay_pool``)."""
    if "target" not in request.fixturenames:
        yield
        return
    tgt: Any = request.getfixturevalue("target")
    config, item = request.config, request.node
    scope = item.parent.nodeid if item.parent is not None else ""
    if config.stash.get(_CLEAN_KEY, None) != scope:
        _check_health(tgt, "before this test (after an earlier one)")
    config.stash[_CLEAN_KEY] = ""
    if item.get_closest_marker("device") is not None:
        relays = getattr(tgt, "relays", None)
        if relays is not None:
            relays.release()
    crashes = getattr(tgt, "crashes", None)  # a target with a crash watch (Xen under QEMU)
    if crashes is not None:
        reported = config.stash.get(_CRASHES_KEY, 0)
        if len(crashes) > reported:  # between tests, or during bring-up
            _crashed(config, tgt, crashes[reported:], "before this test")
        tgt.on_crash = _ALARM.fire
        _ALARM.arm()
    try:
        yield
    finally:
        _ALARM.disarm()
    reported = config.stash.get(_CRASHES_KEY, 0)
    if crashes is not None and len(tgt.crashes) > reported:
        expected = item.get_closest_marker("crashes") is not None
        failed = item.stash.get(_ITEM_FAILED_KEY, False)
        _crashed(config, tgt, tgt.crashes[reported:], "during this test", failed or expected)
    if item.stash.get(_ITEM_FAILED_KEY, False) and not _INTERRUPTED:
        _kernel_log_evidence(tgt, item)
    _check_health(tgt, "during this test")
    if not item.stash.get(_ITEM_FAILED_KEY, False):
        config.stash[_CLEAN_KEY] = scope


def _kernel_log_evidence(tgt: Any, item: pytest.Item) -> None:
    """A failed test's report gets the crash lines new in the hosts' kernel logs (all
    levels: also what no console printed)."""
    scan = getattr(tgt, "kernel_log_problems", None)
    if scan is None:
        return
    try:
        found = scan()
    except Exception as e:  # a host that cannot be asked: the health check will say
        found = [f"kernel logs not scanned: {e!r}"]
    if found:
        item.add_report_section("teardown", "crash lines in kernel logs", "\n".join(found))


_ALARM = CrashAlarm()  # a crash seen by the target's watch fails the running test at once


def _crashed(
    config: pytest.Config, tgt: Any, crashes: list[Crash], when: str, already_failed: bool = False
) -> None:
    """The next test starts on a restored machine; this one fails with every crash
    seen ``when`` (unless the alarm already failed it with the first). Each crash is
    reported once: the count of those reported is kept in the config's stash."""
    try:
        if not _INTERRUPTED:
            tgt.recover()
    finally:  # what the dying machine printed until it was stopped is this crash's
        config.stash[_CRASHES_KEY] = len(tgt.crashes)
    if not already_failed:
        pytest.fail(
            f"crash {when}:\n"
            + "\n\n".join(c.report() for c in crashes)
            + f"\n(target {tgt.name} was restarted)",
            pytrace=False,
        )


_INTERRUPTED: list[bool] = []  # set once the run is interrupted (Ctrl-C, SIGTERM)


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    """An interrupted run tears down and stops: no health check restarts the target
    (that once kept a SIGTERMed Xen run going for minutes)."""
    _INTERRUPTED.append(True)


def _check_health(tgt: Any, when: str) -> None:
    if _INTERRUPTED:
        return
    problems = tgt.problems() if hasattr(tgt, "problems") else []
    if problems:
        tgt.recover()
        pytest.fail(
            f"target {tgt.name} broke {when}; it was restarted.\n" + "\n".join(problems),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def guests(target: Target) -> Sequence[Guest]:
    return list(target.guests)


@pytest.fixture
def guest(guests: Sequence[Guest]) -> Guest:
    return guests[0]


@pytest.fixture
def raw_tpm(guest: Guest) -> Iterator[RawTransport]:
    with guest.transport() as transport:
        yield transport


@pytest.fixture
def esapi(guest: Guest) -> Iterator[Any]:
    """A fresh ESAPI per test: Startup(CLEAR) done, transients and sessions flushed after."""
    from tpm2_pytss import ESAPI, TSS2_Exception
    from tpm2_pytss.constants import TPM2_SU

    from harness.tpmwire import flush_all

    tcti = guest.tcti()
    ctx = ESAPI(tcti)
    try:
        try:
            ctx.startup(TPM2_SU.CLEAR)
        except TSS2_Exception as e:
            if e.rc != TPM_RC_INITIALIZE:
                raise
        yield ctx
    finally:
        ctx.close()
        tcti.close()
        # Raw commands on a new connection: works even if the test killed the context.
        with guest.transport() as transport:
            flush_all(transport)


# -- reporting ---------------------------------------------------------------------------
@dataclass
class _Result:
    outcome: str = "passed"
    duration: float = 0.0  # setup, call and teardown, less the target's bring-up
    bringup: float = 0.0  # the target came up in this test's setup (session fixture)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield  # pluggy's Result of the report
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        item.config.stash[_FAILED_KEY] = True
        if item.config.getoption("--keep-on-failure"):
            item.session.shouldstop = "--keep-on-failure: stopped at the first failure"
        item.stash[_ITEM_FAILED_KEY] = True
        tgt = item.config.stash.get(_TARGET_KEY, None)
        if tgt is not None:
            lines = [f"{name}: {path}" for name, path in sorted(_all_logs(tgt).items())]
            report.sections.append(("xenvtpm logs", "\n".join(lines)))
            if not item.stash.get(_TRACED_KEY, False):
                item.stash[_TRACED_KEY] = True
                report.sections += _traffic_sections(tgt, item.stash.get(_STARTED_KEY, 0.0))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED_KEY] = time.time()


def _traffic_sections(tgt: Any, started: float) -> list[tuple[str, str]]:
    """Per guest, the TPM requests its vTPM's backend saw during the test (its trace,
    ``harness.traffic``): on any target with the capability, at no cost to passing tests."""
    from harness.traffic import section

    if Capability.TRAFFIC_TRACE not in tgt.capabilities:
        return []
    until = time.time() + CLOCK_SLACK
    sections = []
    for guest in tgt.guests:
        try:
            text = section(tgt.tpm_trace(guest), started - CLOCK_SLACK, until)
        except Exception as e:  # a dom0 gone: the health check says why
            text = f"(the trace could not be read: {e!r})"
        sections.append((f"TPM traffic of {guest.name}, backend side", text))
    return sections


class _Summary:
    """Collects each test's outcome and time; prints the table at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, _Result] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid.startswith("tests/"):
            return  # unit tests have pytest's own summary; the table is for scenarios
        res = self.results.setdefault(report.nodeid, _Result())
        res.duration += report.duration
        if report.when == "setup" and _BRINGUP_KEY in self.config.stash:
            res.bringup = self.config.stash[_BRINGUP_KEY]  # in this setup's time
            res.duration -= res.bringup
            del self.config.stash[_BRINGUP_KEY]
        first = res.outcome in ("passed", "skipped")  # keep the first failure's kind
        if report.failed and first:
            res.outcome = "failed" if report.when == "call" else f"error ({report.when})"
        elif report.skipped and res.outcome == "passed":
            res.outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.passed and report.when == "call" and hasattr(report, "wasxfail"):
            res.outcome = "xpassed"

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results:
            return
        tr = terminalreporter
        width = min(max(len(n) for n in self.results), 90)
        used = self.config.stash.get(_TARGET_KEY, None)
        tr.section("xenvtpm summary" + (f" (target {used.name})" if used is not None else ""))
        tr.write_line(f"{'scenario':<{width}}  {'result':<16} {'time':>8}")
        for nodeid, res in self.results.items():
            name = nodeid if len(nodeid) <= width else "..." + nodeid[-(width - 3) :]
            tr.write_line(f"{name:<{width}}  {res.outcome:<16} {res.duration:>7.2f}s")
        counts: dict[str, int] = {}
        for res in self.results.values():
            counts[res.outcome] = counts.get(res.outcome, 0) + 1
        tr.write_line(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        self._slowest(tr)

    def _slowest(self, tr: Any) -> None:
        """The scenarios' time in all and the slowest ones (the JUnit has every test's
        time, the first one's with the target's bring-up in it)."""
        total = sum(res.duration for res in self.results.values())
        bringup = sum(res.bringup for res in self.results.values())
        tr.section(f"{SLOWEST} slowest scenarios")
        tr.write_line(
            f"scenario time {total:.0f} s ({total / 60:.1f} min) over {len(self.results)} "
            f"scenarios; target bring-up {bringup:.0f} s besides"
        )
        ranked = sorted(self.results.items(), key=lambda kv: kv[1].duration, reverse=True)
        for nodeid, res in ranked[:SLOWEST]:
            tr.write_line(f"{res.duration:>8.1f}s  {res.outcome:<9} {nodeid}")


if os.environ.get("XENVTPM_HARNESS_DEBUG"):
    import logging

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
