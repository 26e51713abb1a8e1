"""``--target ssh://root@HOST[:PORT]``: the xen target's deploy and scenarios on an
existing Xen host that the user names (issue 4, item 7). Nothing is booted.

Bring-up walks off -> ready (STYLE.md 9):

    dom0      SSH to HOST (key: ``--ssh-key`` / ``$XENVTPM_SSH_KEY``, else the user's
              default keys and agent; host keys: ``harness.hostkeys``, known ones only
              unless ``--accept-new-host-keys``, for dom0 and every guest)
    check     dom0 has xl, a running Xen, python3 >= 3.11, swtpm, Xen's libraries
    guests    each ``--host-guest NAME[=ADDRESS]``: ``xl domid NAME``, its SSH address
              (given, or dom0's neighbour entry for the MAC xl gave it), SSH through dom0
    clean     stop xenvtpm daemons an earlier run left, detach its vTPMs (idempotent)
    check     each guest has python3 >= 3.11, tpm_vtpm_proxy, Xen's libraries, no TPM
    deploy    ``XenDriverTarget.start_driver``, as on the QEMU target

``close`` stops the daemons it started, detaches the vTPMs, collects the logs into
``artifacts/xen-host/`` (``$XENVTPM_ARTIFACTS``) and removes the directories and unloads
the modules this run added, so the host is left as it was found. ``versions.json`` in
the artifacts records the driver build, the Xen, dom0 and guest versions and the host
key each login used (for ``harness.certify_report``); ``known_hosts`` there holds those
keys as lines to pin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from harness.deadline import Deadline
from harness.driver_record import driver_build, package_version
from harness.errors import HarnessError, TargetNotReady
from harness.hostkeys import HostKeyCheck, resolve_known_hosts
from harness.own_build import OwnBuild
from harness.process import ManagedProcess, ProcessRecord
from harness.ssh import SshHost
from harness.target import Capability, Guest
from harness.targets import Progress
from harness.targets.host_spec import (
    GuestSpec,
    HostSpec,
    neighbour_addresses,
    parse_guests,
    parse_macs,
    parse_xl_info,
    resolve_key,
)
from harness.targets.xen_base import XenDriverTarget
from harness.targets.xen_driver import DOM0_MODULES, STATE_ROOT
from harness.targets.xen_frontends import FRONTENDS, Frontend
from harness.targets.xen_guest import XenGuest
from harness.targets.xen_host_reboots import REBOOT_TIMEOUT, HostReboots
from harness.transport_ssh import REMOTE_PACKAGE_DIR
from harness.xenlogs import JOURNAL_CURSOR, REMOTE_LOG_DIR

CONNECT_TIMEOUT = 60.0  # the host is up already: a login that takes longer will not come
VERSIONS_FILE = "versions.json"
KNOWN_HOSTS_FILE = "known_hosts"  # the keys this run's logins used, as lines to pin
XEN_LIBS = ("libxenstore.so.4", "libxengnttab.so.1", "libxenevtchn.so.1")
# The daemons and tools this driver runs, and nothing else: ``python3 -m xenvtpm ...``
# (start_daemon's and the relay's command line after exec), and swtpm under STATE_ROOT.
DAEMON_PATTERN = "^python3 -m xenvtpm( |$)"
SWTPM_PATTERN = f"^[^ ]*swtpm .*{STATE_ROOT}/"
# What this run may create in a domain, removed on close unless it was there before.
DOM0_PATHS = (REMOTE_PACKAGE_DIR, REMOTE_LOG_DIR, "/run/xenvtpm", STATE_ROOT)
GUEST_PATHS = (REMOTE_PACKAGE_DIR, REMOTE_LOG_DIR)


def missing(host: SshHost, checks: Sequence[tuple[str, str]], timeout: float = 60.0) -> list[str]:
    """Run every check (a shell test) in one command; the descriptions of those failing."""
    script = "; ".join(
        f"( {test} ) >/dev/null 2>&1 || echo {shlex.quote(what)}" for test, what in checks
    )
    return host.check(script, timeout).splitlines()


def _python_checks() -> list[tuple[str, str]]:
    libs = ", ".join(XEN_LIBS)
    load = f"import ctypes; [ctypes.CDLL(n) for n in {XEN_LIBS!r}]"
    return [
        ("command -v python3", "python3"),
        (
            "python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'",
            "python3 >= 3.11 (the driver needs 3.11)",
        ),
        (
            f"python3 -c {shlex.quote(load)}",
            f"Xen's libraries {libs} (Debian: libxenstore4, libxengnttab1, libxenevtchn1)",
        ),
        ('[ "$(id -u)" = 0 ]', "a root login (the driver needs root)"),
    ]


def _module_checks(modules: Sequence[str]) -> list[tuple[str, str]]:
    return [(f"modprobe -n -q {m}", f"kernel module {m}") for m in modules]


DOM0_CHECKS: list[tuple[str, str]] = [
    ("command -v xl", "xl (Debian: xen-utils)"),
    ("xl info", "a running Xen (`xl info` fails: is this dom0?)"),
    ("command -v swtpm && command -v swtpm_setup", "swtpm, swtpm_setup (Debian: swtpm-tools)"),
    (
        "command -v xenstore-list && command -v xenstore-rm",
        "xenstore-list, xenstore-rm (Debian: xenstore-utils)",
    ),
    *_python_checks(),
    *_module_checks(DOM0_MODULES),
]


def guest_checks(frontend: Frontend) -> list[tuple[str, str]]:
    """What a guest needs for ``frontend``: python3 for our relay (and frontend), Xen's
    libraries only for our frontend, and the frontend's kernel modules."""
    checks = _python_checks()
    if not frontend.needs_xen_libs:
        checks = [c for c in checks if "ctypes" not in c[0]]
    return [*checks, *_module_checks(frontend.guest_modules)]


def stop_daemons_command(pattern: str, grace: float = 10.0) -> str:
    """Shell: SIGTERM the processes matching ``pattern`` (pgrep -f), wait, then SIGKILL;
    print the pids found. Anchored patterns never match this shell itself."""
    p = shlex.quote(pattern)
    rounds = int(grace / 0.25)
    return (
        f'pids=$(pgrep -f {p}); [ -z "$pids" ] && exit 0; echo $pids; kill $pids; '
        f"i=0; while [ $i -lt {rounds} ] && pgrep -f {p} >/dev/null; do sleep 0.25; "
        f'i=$((i+1)); done; left=$(pgrep -f {p}); [ -n "$left" ] && kill -9 $left; true'
    )


class HostGuest(XenGuest):
    """A guest that already runs on the host: its xl name, and the SSH address to reach
    it through dom0 (given or looked up at start)."""

    def __init__(self, index: int, target: XenHostTarget, spec: GuestSpec) -> None:
        super().__init__(index, target, name=spec.name)
        self.given_address = spec.address
        self.ip = spec.address or ""

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"transport": "xen-host-ssh"}

    def __repr__(self) -> str:
        return f"HostGuest({self.name}, domid={self.domid}, address={self.ip or '?'})"


class XenHostTarget(XenDriverTarget):
    """The xen target on an existing Xen host: an SSH login to the user's dom0, the dom0
    session (deploy, daemons, log collection) and our frontend. There is no machine and
    no toolstack part: nothing here can boot, destroy or recreate a domain. With the
    owner's consent (``destructive``) one part is added, ``reboots``: ``xl reboot``."""

    name: ClassVar[str] = "xen-host"
    ON_A_HOST: ClassVar[bool] = True
    # Declared here, not derived from the parts: what disturbs the environment (a
    # restart, a killed swtpm) stays off on a user's host unless its owner allows it
    # (``destructive``); so does ``xl reboot`` of their guests. Nothing destroys a domain.
    CAPABILITIES: ClassVar[frozenset[str]] = frozenset(
        {Capability.MULTI_GUEST, Capability.SHARED_CLIENTS, Capability.TRAFFIC_TRACE}
    )
    DESTRUCTIVE: ClassVar[frozenset[str]] = frozenset(
        {
            Capability.RESTART_MANAGER,
            Capability.RESTART_BACKEND,
            Capability.RESTART_FRONTEND,
            Capability.KILL_SWTPM,
            Capability.REBOOT,
        }
    )
    # What only some frontends allow (xen-tpmfront: no /dev/tpmrm0, no reconnect).
    FLAVOURED: ClassVar[frozenset[str]] = frozenset(
        {Capability.SHARED_CLIENTS, Capability.RESTART_BACKEND, Capability.RESTART_FRONTEND}
    )

    @classmethod
    def capabilities_for(
        cls, guests: int, *, guest_kind: str = "python", destructive: bool = False, **_: Any
    ) -> frozenset[str]:
        """The pinned set, plus the restarts and faults a ``destructive`` run may cause,
        less what the guests' frontend cannot do."""
        caps = set(super().capabilities_for(guests))
        caps |= cls.DESTRUCTIVE if destructive else set()
        caps -= cls.FLAVOURED - FRONTENDS[guest_kind].capabilities
        return frozenset(caps)

    def __init__(
        self,
        guests: int = 0,
        run_dir: Path | None = None,
        progress: Progress | None = None,
        detached: bool = False,
        *,
        url: str,
        host_guests: Sequence[str] = (),
        ssh_key: str | os.PathLike[str] | None = None,
        known_hosts: Sequence[str | os.PathLike[str]] = (),
        accept_new_host_keys: bool = False,
        guest_kind: str = "python",
        destructive: bool = False,
        own_build: OwnBuild | None = None,
    ) -> None:
        """``guests`` is ignored: the guests are the ``host_guests`` the user named.
        Host keys: ``~/.ssh/known_hosts`` and the ``known_hosts`` files are the known
        ones; others only with ``accept_new_host_keys``. ``guest_kind``: "python" (our
        frontend in each guest) or "kernel" (the guests' own ``xen-tpmfront``);
        ``destructive``: the owner allows restarts, killed swtpm and reboots here."""
        if guest_kind not in FRONTENDS:
            raise ValueError(f"guest kind {guest_kind!r}: one of {', '.join(FRONTENDS)}")
        self.guest_kind, self.destructive = guest_kind, destructive
        self.spec = HostSpec.parse(url)
        self._specs = parse_guests(host_guests)
        self.key = resolve_key(ssh_key)
        known_files = resolve_known_hosts(known_hosts)
        self._host_guest_list: list[HostGuest] = []
        super().__init__(len(self._specs), run_dir, progress, detached, own_build=own_build)
        self.capabilities = self.capabilities_for(
            self.guest_count, guest_kind=guest_kind, destructive=destructive
        )
        self.host_keys = HostKeyCheck(known_files, accept_new_host_keys, self.say)
        # The one toolstack operation on a user's host, there only with consent.
        self.reboots = HostReboots(self._dom0, self.say) if destructive else None
        self.versions: dict[str, Any] = {}
        self._collected = False
        # Per domain: the paths this run created and the modules it loaded (to undo).
        self._created: dict[str, list[str]] = {}
        self._loaded_before: dict[str, set[str]] = {}
        self._cursors: dict[str, str] = {}  # journal cursors: collect this run's entries

    def frontend_class(self) -> type[Frontend]:
        return FRONTENDS[self.guest_kind]

    def make_guests(self, count: int) -> list[XenGuest]:
        """The guests the user named, in their order."""
        self._host_guest_list = [HostGuest(i, self, s) for i, s in enumerate(self._specs)]
        return list(self._host_guest_list)

    @property
    def guests(self) -> Sequence[HostGuest]:
        return list(self._host_guest_list)

    def _host_guests(self) -> list[HostGuest]:
        return self._host_guest_list

    # -- bring-up ------------------------------------------------------------------------
    def _start(self) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        (self.artifacts / VERSIONS_FILE).unlink(missing_ok=True)
        (self.artifacts / KNOWN_HOSTS_FILE).unlink(missing_ok=True)
        self._collected = False
        t0 = time.monotonic()
        self.connect_host()
        self.find_guests()
        self.clean_host()
        self.check_guests()
        self.record_before()
        self.use_own_build()
        self.record_versions()
        self.timings["host_checks_s"] = round(time.monotonic() - t0, 1)
        self.start_driver()
        self.say(
            f"{self.spec} ready: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())
        )

    def connect_host(self) -> None:
        """Log in to dom0 and check that it can run the driver's dom0 half."""
        self.say(f"connecting to dom0 {self.spec}" + (f" with key {self.key}" if self.key else ""))
        self.dom0 = SshHost(
            "dom0",
            self.spec.host,
            self.spec.port,
            self.key,
            user=self.spec.user,
            host_keys=self.host_keys,
        )
        self.dom0.connect(Deadline(CONNECT_TIMEOUT))
        self._cursors["dom0"] = self.dom0.run(JOURNAL_CURSOR)[1].strip()
        lacking = missing(self.dom0, DOM0_CHECKS)
        if lacking:
            raise TargetNotReady(f"dom0 {self.spec}", "it lacks: " + "; ".join(lacking))

    def find_guests(self) -> None:
        """Each named guest's domid and SSH address; then a login through dom0."""
        dom0 = self._dom0()
        for guest in self._host_guests():
            rc, out, _ = dom0.run(f"xl domid {shlex.quote(guest.name)}")
            if rc != 0:
                running = dom0.run("xl list | awk 'NR>1 && $2 != 0 {print $1}'")[1].split()
                raise TargetNotReady(
                    f"guest {guest.name}",
                    f"no running domain {guest.name!r} on {self.spec} "
                    f"(running guests: {', '.join(running) or 'none'})",
                )
            guest.domid = int(out.strip())
            if guest.domid == 0:
                raise TargetNotReady(f"guest {guest.name}", "that is dom0, not a guest")
            guest.ip = guest.given_address or self.lookup_address(guest)
            self.say(f"{guest.name}: domain {guest.domid}, ssh {guest.ip} through dom0")
            login = self.login_guest(guest, Deadline(CONNECT_TIMEOUT))
            self._cursors[guest.name] = login.run(JOURNAL_CURSOR)[1].strip()

    def login_guest(self, guest: HostGuest, deadline: Deadline) -> SshHost:
        """Root's SSH login to the guest at its address, through dom0."""
        guest.ssh = login = SshHost(
            guest.name, guest.ip, 22, self.key, via=self._dom0(), host_keys=self.host_keys
        )
        try:
            login.connect(deadline)
        except TargetNotReady as e:
            raise TargetNotReady(
                f"guest {guest.name}",
                f"no root login at {guest.ip} through dom0 ({e}); give the right address "
                f"with --host-guest {guest.name}=ADDRESS",
            ) from e
        return login

    # -- xl reboot, with the owner's consent ----------------------------------------------
    def reboot(self, guest: Guest) -> None:
        """``xl reboot`` of a user's guest (``--destructive`` only): its kernel reboots
        into a new domain; the old domain's vTPM is detached, the guest logged in to
        again at the address found before (its MAC is the same) and the same vTPM
        instance attached to the new domain, whose TPM device then comes back."""
        self.require(Capability.REBOOT)
        assert self.reboots is not None  # composed with the capability
        g: HostGuest = self._own(guest)
        self.stop_frontend(g)
        self.session.forget(g)
        old = self.reboots.reboot(g)
        self.session.detach_domain(old)
        self.login_guest(g, Deadline(REBOOT_TIMEOUT))
        self.connect_vtpm(g)
        self.wait_for_device(g)

    def lookup_address(self, guest: HostGuest) -> str:
        """The guest's address as dom0 knows it: the MACs xl gave its vifs, read from
        dom0's backend nodes, then dom0's neighbour entry for one of them.

        Never from the guest's own ``/local/domain/<domid>/`` tree (``attr/``, ``data/``,
        its vif frontend): the guest writes those, and an address there could send
        certify to another machine, for instance another guest whose key is known.
        Several IPv4 neighbours for its MACs (one may be forged by ARP) are not guessed
        between: the user names the address."""
        dom0 = self._dom0()
        macs = self.vif_macs(guest)
        found = neighbour_addresses(dom0.run("ip neigh show")[1], macs) if macs else []
        v4 = [a for a in found if ":" not in a]
        ask = f"give it as --host-guest {guest.name}=ADDRESS"
        if len(v4) > 1:
            raise TargetNotReady(
                f"guest {guest.name}",
                f"dom0's `ip neigh` has several addresses for its MAC {', '.join(macs)}: "
                f"{', '.join(v4)}; {ask}",
            )
        if not found:
            raise TargetNotReady(
                f"guest {guest.name}",
                f"cannot find its SSH address: its MAC {', '.join(macs) or '(none: no vif)'} "
                f"is not in dom0's `ip neigh`; {ask} (addresses a guest publishes in its "
                "own xenstore are not used: the guest can write them)",
            )
        return found[0]

    def vif_macs(self, guest: HostGuest) -> list[str]:
        """The MACs of the guest's vifs from dom0's backend nodes
        (``/local/domain/0/backend/vif/<domid>/<devid>/mac``, written by xl; the guest
        may read them, not write them), lower case."""
        dom0 = self._dom0()
        base = f"/local/domain/0/backend/vif/{guest.domid}"
        rc, out, _ = dom0.run(f"xenstore-list {base}")
        devids = [d for d in out.split() if d.isdigit()] if rc == 0 else []
        macs: list[str] = []
        for devid in devids:
            rc, out, _ = dom0.run(f"xenstore-read {base}/{devid}/mac")
            macs += parse_macs(out) if rc == 0 else []
        return macs

    def clean_host(self, whose: str = "left by an earlier run") -> None:
        """Stop every xenvtpm daemon (guests first, then dom0's backend and manager, then
        any swtpm of the manager's) and detach the vTPMs of the named guests and of
        domains that no longer exist. Run before deploying and on close; idempotent."""
        dom0 = self._dom0()
        for guest in self._host_guests():
            if guest.ssh is not None and guest.ssh.connected:
                self._stop_on(guest.ssh, DAEMON_PATTERN)
        self._stop_on(dom0, DAEMON_PATTERN)
        self._stop_on(dom0, SWTPM_PATTERN)
        backends = "/local/domain/0/backend/vtpm"
        rc, out, _ = dom0.run(f"xenstore-list {backends}")
        listed = {int(d) for d in out.split() if d.isdigit()} if rc == 0 else set()
        ours = {g.domid for g in self._host_guests() if g.domid is not None}
        for domid in sorted(listed | ours):
            alive = dom0.run(f"xenstore-read /local/domain/{domid}/domid")[0] == 0
            if domid in ours or not alive:
                dom0.run(
                    f"xenstore-rm {backends}/{domid}; "
                    f"xenstore-rm /local/domain/{domid}/device/vtpm 2>/dev/null; true"
                )
                if domid in listed:
                    self.say(f"detached the vTPM of domain {domid} ({whose})")
        if listed and not dom0.run(f"xenstore-list {backends}")[1].split():
            dom0.run(f"xenstore-rm {backends}")  # empty now: as before any vTPM was attached

    def _stop_on(self, host: SshHost, pattern: str) -> None:
        pids = host.check(stop_daemons_command(pattern), timeout=60).split()
        if pids:
            self.say(
                f"{host.name}: stopped {len(pids)} xenvtpm process(es) (pids {' '.join(pids)})"
            )

    def check_guests(self) -> None:
        """Every guest can run the frontend and has no TPM of its own (else the scenarios
        would test that one); everything missing is reported at once."""
        problems = []
        for guest in self._host_guests():
            lacking = missing(guest.host(), guest_checks(self.frontend))
            gone = "i=0; while [ -e /dev/tpm0 ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done"
            if guest.host().run(f"{gone}; test -e /dev/tpm0", timeout=30)[0] == 0:
                lacking.append("no /dev/tpm0 of its own (it has a TPM already: detach it)")
            if lacking:
                problems.append(f"{guest.name} lacks: " + "; ".join(lacking))
        if problems:
            raise TargetNotReady(f"guests on {self.spec}", "\n".join(problems))

    def record_before(self) -> None:
        """Which of the paths this run creates, and which modules, exist already."""
        for name, host in self.hosts().items():
            paths = DOM0_PATHS if name == "dom0" else GUEST_PATHS
            script = "; ".join(f"[ -e {p} ] || echo {p}" for p in paths)
            self._created[name] = host.check(script).split()
            self._loaded_before[name] = set(host.check("cut -d' ' -f1 /proc/modules").split())

    def use_own_build(self) -> None:
        """``--driver`` and ``--tpmfront``: the module must fit every guest's kernel."""
        if not self.own_build:
            return
        releases = {g.name: g.host().check("uname -r").strip() for g in self._host_guests()}
        own_module = self.own_build.tpmfront or self.own_build.tpmfront_source
        if own_module and len(set(releases.values())) > 1:
            raise TargetNotReady(
                f"host {self.spec}",
                f"--tpmfront: the guests run different kernels {releases}; one module "
                "fits one kernel: name guests that run the same one",
            )
        self.prepare_own_build(next(iter(releases.values())))

    def _driver_record(self) -> dict[str, Any]:
        """The deployed driver: this checkout's commit, or the user's ``--driver``."""
        piece = next((p for p in self.prepared.pieces if p.flag == "--driver"), None)
        if piece is None:
            return driver_build()
        if piece.what.startswith("git commit "):
            commit = piece.what.removeprefix("git commit ")
            build = {"commit": commit, "describe": f"--driver {piece.origin}", "dirty": False}
        else:
            build = driver_build(Path(piece.path).parent)
        return {**build, "own": piece.origin, "sha256": piece.sha256}

    def record_versions(self) -> None:
        """Driver build, Xen, dom0 and guest versions, the host keys used ->
        ``versions.json``, describe(); the keys also as ``known_hosts`` lines."""
        dom0 = self._dom0()
        info = parse_xl_info(dom0.check("xl info"))
        xen_keys = ("xen_major", "xen_minor", "xen_extra", "xen_version", "xen_changeset")
        self.versions = {
            "host": str(self.spec),
            "hostname": info.get("host", ""),
            "guest_kind": self.guest_kind,
            "destructive": self.destructive,
            "driver": self._driver_record(),
            "package": self._package_record(dom0),
            "own_build": self.prepared.to_json(),
            "xen": {k: info[k] for k in xen_keys if info.get(k)},
            "dom0": self._os_versions(dom0),
            "guests": [
                {"name": g.name, "domid": g.domid, "address": g.ip, **self._os_versions(g.host())}
                for g in self._host_guests()
            ],
            "host_keys": [k.to_dict() for k in self.host_keys.seen],
        }
        (self.artifacts / VERSIONS_FILE).write_text(json.dumps(self.versions, indent=2) + "\n")
        lines = [k.known_hosts_line() for k in self.host_keys.seen]
        (self.artifacts / KNOWN_HOSTS_FILE).write_text("".join(f"{line}\n" for line in lines))

    def _package_record(self, dom0: SshHost) -> dict[str, str]:
        """The version of the driver this run deployed (its ``__version__``), and of a
        xenvtpm package installed on the host, which this run does not use."""
        _, installed, _ = dom0.run(
            "dpkg-query -W -f '${Status} ${Version}' xenvtpm 2>/dev/null", timeout=30
        )
        words = installed.split()
        return {
            "version": package_version(self.session.package),
            "installed": words[-1] if installed.startswith("install ok installed") else "",
        }

    @staticmethod
    def _os_versions(host: SshHost) -> dict[str, str]:
        script = (
            "uname -r; cat /etc/debian_version 2>/dev/null || echo; "
            '(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME") || echo'
        )
        lines = [*host.check(script).splitlines(), "", "", ""][:3]
        return {"kernel": lines[0].strip(), "debian": lines[1].strip(), "os": lines[2].strip()}

    # -- teardown ------------------------------------------------------------------------
    def _collect_dom0(self) -> None:
        """The session's log collection, once per run, limited to this run's journal."""
        if self._collected or self.dom0 is None or not self.dom0.connected:
            return
        self.session.collect(cursors=self._cursors)
        self._collected = True

    def _stop(self) -> None:
        """Stop and detach, collect the logs, undo what this run added; then close the
        logins (there is no machine to stop)."""
        try:
            self.relays.release()  # the guests' devices free before modules are unloaded
            if self.dom0 is not None and self.dom0.connected:
                with contextlib.suppress(HarnessError):
                    self.clean_host(whose="this run's")
                with contextlib.suppress(HarnessError, OSError):
                    self._collect_dom0()
                self._undo()
        finally:
            self._close_logins()
            self._created.clear()
            self._loaded_before.clear()
            self._cursors.clear()

    def _undo(self) -> None:
        """Remove the directories and unload the modules this run added (best effort:
        a module still in use stays)."""
        hosts = self.hosts()
        for name, host in hosts.items():
            created = self._created.get(name, [])
            before = self._loaded_before.get(name)
            modules = DOM0_MODULES if name == "dom0" else self.frontend.guest_modules
            added = [m for m in modules if before is not None and m.replace("-", "_") not in before]
            with contextlib.suppress(HarnessError):
                if created:
                    host.run("rm -rf " + " ".join(shlex.quote(p) for p in created), timeout=60)
                for module in reversed(added):
                    host.run(f"modprobe -r {module}", timeout=30)
            if created or added:
                self.say(
                    f"{name}: removed {' '.join(created) or 'nothing'}; "
                    f"unloaded (if unused) {' '.join(added) or 'nothing'}"
                )

    def _detach(self) -> list[ProcessRecord]:
        """The daemons keep running on the host; no process of ours is handed on."""
        self.relays.close()
        return []

    def _processes(self) -> list[ManagedProcess]:
        return []

    # -- what the CLI and the report see -----------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "target": f"ssh://{self.spec}",
            "ssh": {
                "host": self.spec.host,
                "port": self.spec.port,
                "key": str(self.key) if self.key else None,
                "user": self.spec.user,
            },
            "host_keys": self.host_keys.describe(),
            "artifacts": str(self.artifacts),
            "versions": self.versions,
            "timings": self.timings,
            "guests": [g.describe() for g in self._guests],
        }

    def __repr__(self) -> str:
        return f"XenHostTarget({self.spec}, guests={[g.name for g in self._guests]})"
