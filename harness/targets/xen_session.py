"""The driver's side of a Xen host, through SSH to dom0 (and, through dom0, to each
guest): deploy, daemons, health checks, kernel-log scans, resource counts, faults,
probes and log collection.

Every Xen target has one: the harness's machine under QEMU and a user's host alike. It
makes no domain and boots nothing (that is :mod:`harness.targets.xen_toolstack` and
:mod:`harness.targets.xen_machine`); it only runs commands where the driver runs.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Callable, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness.crash_watch import DOM0_KERNEL_LOGS, GUEST_KERNEL_LOGS, new_crash_lines_check
from harness.deadline import Deadline
from harness.errors import HarnessError, ResetFailed, TargetNotReady
from harness.own_build import sha256_file
from harness.paths import REPO_ROOT
from harness.ssh import SshHost
from harness.targets import dom0_units, xen_driver
from harness.targets.health import Check, failures
from harness.targets.xen_guest import XenGuest
from harness.transport_ssh import REMOTE_PACKAGE_DIR
from harness.xenlogs import REMOTE_LOG_DIR, collect_logs


def deploy_package(host: SshHost, package: Path = REPO_ROOT / "xenvtpm") -> None:
    """Replace ``/opt/xenvtpm/xenvtpm`` on ``host`` and check ``python3 -m xenvtpm`` runs."""
    host.run(f"rm -rf {REMOTE_PACKAGE_DIR}/xenvtpm", check=True)
    host.put(package, f"{REMOTE_PACKAGE_DIR}/xenvtpm")
    host.check(f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm --help >/dev/null")


class Dom0Session:
    """dom0's login, the guests' logins through it, and the daemons started on them."""

    def __init__(
        self,
        guests: Sequence[XenGuest],
        artifacts: Path,
        say: Callable[[str], None],
        packaged: bool = False,
    ) -> None:
        self.guests = guests
        self.artifacts = artifacts
        self.say = say
        self.dom0: SshHost | None = None
        self.package = REPO_ROOT / "xenvtpm"  # what deploy copies: --driver may change it
        self.daemons: dict[str, dict[str, int]] = {}  # host name -> daemon name -> pid
        # dom0 gets the .deb of the package and runs its units (dom0_units), as users do;
        # else the copied folder and the daemons as background processes (a user's host)
        self.packaged = packaged
        self.installed: dict[str, str] = {}  # the package dom0 runs: version, sha256, file

    def host(self) -> SshHost:
        """dom0's login (TargetNotReady before there is one)."""
        if self.dom0 is None:
            raise TargetNotReady("dom0", "not booted")
        return self.dom0

    def hosts(self) -> dict[str, SshHost]:
        """dom0 and every guest logged in, by name."""
        out: dict[str, SshHost] = {}
        if self.dom0 is not None and self.dom0.connected:
            out["dom0"] = self.dom0
        for g in self.guests:
            if g.ssh is not None and g.ssh.connected:
                out[g.name] = g.ssh
        return out

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        return self.host().run(command, timeout)

    # -- deploy and daemons --------------------------------------------------------------
    def deploy(self, package: Path | None = None) -> None:
        """Copy the driver package (``self.package`` unless given) into dom0 and every
        guest (``/opt/xenvtpm``) and check that ``python3 -m xenvtpm`` runs there, every
        host at once."""
        package = package or self.package
        hosts = self.hosts()
        packaged = {"dom0"} if self.packaged else set()

        def deploy_to(name: str) -> None:
            if name in packaged:
                self.install_package(package)
            else:
                deploy_package(hosts[name], package)

        with ThreadPoolExecutor(len(hosts) or 1) as pool:
            list(pool.map(deploy_to, hosts))

    def install_package(self, package: Path) -> None:
        """The .deb of ``package`` (kept in the artifacts: it is what this run tested)
        installed in dom0, which then runs nothing else of ours."""
        deb = dom0_units.build_deb(package, self.artifacts)
        dom0 = self.host()
        remote = f"{dom0_units.REMOTE_DEB_DIR}/{deb.name}"
        dom0.check(f"mkdir -p {dom0_units.REMOTE_DEB_DIR}")
        dom0.put(deb, remote)
        version = dom0_units.check_installed(dom0.check(dom0_units.install_command(remote)))
        self.installed = {"version": version, "sha256": sha256_file(deb), "file": deb.name}
        self.say(f"dom0: installed {deb.name} (sha256 {self.installed['sha256'][:16]}...)")

    def provision(self, instances: Sequence[int]) -> None:
        """Make the vTPM instances in dom0 (``python3 -m xenvtpm provision``: swtpm_setup,
        all at once), with the package deployed to dom0 first."""
        dom0 = self.host()
        deploy_package(dom0, self.package)
        dom0.check(
            f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm provision "
            f"--state-root {xen_driver.STATE_ROOT} {' '.join(str(i) for i in instances)}",
            timeout=600,
        )

    def start_daemon(self, host: xen_driver.Host, name: str, args: str) -> int:
        """Start ``python3 -m xenvtpm ARGS`` in the background on ``host``; its pid.

        It logs to ``/var/log/xenvtpm/NAME.log`` there (fetched into artifacts on close).
        """
        log = f"{REMOTE_LOG_DIR}/{name}.log"
        command = (
            f"mkdir -p {REMOTE_LOG_DIR}; cd {REMOTE_PACKAGE_DIR} || exit 1; "
            f"setsid nohup python3 -m xenvtpm {args} >>{log} 2>&1 </dev/null & echo $!"
        )
        pid = int(host.check(command).strip())
        self.daemons.setdefault(host.name, {})[name] = pid
        return pid

    def stop_daemon(self, host: xen_driver.Host, name: str) -> None:
        """Stop a daemon ``start_daemon`` started on ``host`` (SIGTERM, then SIGKILL)."""
        pid = self.daemons.get(host.name, {}).pop(name, None)
        if pid is not None:
            xen_driver.stop_daemon(host, f"{name} on {host.name}", pid)

    def start_dom0_daemons(self) -> None:
        """The manager, then the backend (which connects to it): through the package's
        units when dom0 has it, else as background processes."""
        if not self.packaged:
            xen_driver.start_dom0(self.host(), self.start_daemon)
            return
        dom0 = self.host()
        dom0.run(
            f"cat > {dom0_units.DEFAULTS_FILE}",
            stdin=dom0_units.defaults_text().encode(),
            check=True,
        )
        self._started_units(dom0_units.start_command(), list(dom0_units.UNITS))

    def _started_units(self, command: str, names: list[str]) -> None:
        """Run ``command`` (it starts units and prints their main pids); record them."""
        rc, out, err = self.host().run(command, timeout=180)
        if rc != 0:
            evidence = "\n".join(
                self.host().run(dom0_units.failure_evidence_command(n))[1] for n in names
            )
            raise TargetNotReady("dom0", f"{command} exited {rc}: {err.strip()}\n{evidence}")
        self.daemons.setdefault("dom0", {}).update(dom0_units.read_pids(out, names))

    def crash_unit(self, name: str, timeout: float = 60.0) -> None:
        """SIGKILL a unit's main process (a crash); until systemd has started another
        and it said READY=1 (the unit is active again with a new main pid)."""
        old = self.daemons.get("dom0", {}).get(name)
        if not self.packaged or old is None:
            raise TargetNotReady(name, "not running as a unit started by this target")
        dom0 = self.host()
        dom0.check(f"kill -KILL {old}")
        unit = dom0_units.UNITS[name]
        deadline = Deadline(timeout)
        while True:
            shown = dom0.check(f"systemctl show -p ActiveState -p MainPID {unit}")
            out = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
            pid = out.get("MainPID", "0")
            if out.get("ActiveState") == "active" and pid not in ("0", str(old)):
                self.daemons["dom0"][name] = int(pid)
                return
            if deadline.expired:
                evidence = dom0.run(dom0_units.failure_evidence_command(name))[1]
                raise TargetNotReady(name, f"systemd did not start it again: {out}\n{evidence}")
            time.sleep(0.5)

    def restart_backend(self) -> None:
        dom0 = self.host()
        if self.packaged:
            self._started_units(dom0_units.restart_command("backend"), ["backend"])
            return
        self.stop_daemon(dom0, "backend")
        self.start_daemon(dom0, "backend", xen_driver.backend_args())

    def restart_manager(self) -> None:
        dom0 = self.host()
        if self.packaged:
            self._started_units(dom0_units.restart_command("manager"), ["manager"])
            return
        self.stop_daemon(dom0, "manager")
        dom0.check(f"rm -f {xen_driver.MANAGER_SOCKET}")
        self.start_daemon(dom0, "manager", xen_driver.manager_args())
        xen_driver.wait_for_manager(dom0)  # a command sent before would outlast the
        # guest kernel's budget (ETIME) instead of getting TPM_RC_FAILURE

    def wait_connected(self, deadline: Deadline) -> None:
        """Until every guest's vTPM is Connected at both ends."""
        for guest in self.guests:
            assert guest.domid is not None
            xen_driver.wait_connected(self.host(), guest.domid, deadline)

    def forget(self, guest: XenGuest) -> None:
        """The guest's daemons and login end with its domain: drop our handles."""
        self.daemons.pop(guest.name, None)
        if guest.ssh is not None:
            guest.ssh.close()
            guest.ssh = None

    # -- health --------------------------------------------------------------------------
    def health_checks(self) -> list[Check]:
        """Every daemon this session started runs."""
        return [
            Check(
                name,
                f"kill -0 {pid}",
                f"{daemon} in {name} exited; log {self._log_place(name, daemon)} there "
                f"(fetched into {self.artifacts} on close)",
            )
            for name, daemons in self.daemons.items()
            for daemon, pid in daemons.items()
        ]

    def _log_place(self, host: str, daemon: str) -> str:
        if self.packaged and host == "dom0" and daemon in dom0_units.UNITS:
            return f"journalctl -u {dom0_units.UNITS[daemon]}"
        return f"{REMOTE_LOG_DIR}/{daemon}.log"

    def problems(self, checks: Sequence[Check]) -> list[str]:
        """What ``checks`` find broken: one command per host, all hosts at once."""
        return [
            f"{check.problem}\n{evidence}" if evidence else check.problem
            for check, evidence in failures(self.hosts(), checks)
        ]

    def kernel_log_problems(self) -> list[str]:
        """Crash lines new since the last call in dom0's dmesg, ``xl dmesg`` and the
        guests' console logs, and in each guest's dmesg (at every log level, also those
        below the consoles' level that the crash watch cannot see); one command per
        host, all at once. Not in the per-test health check: under TCG it cost 2.4 s per
        test, so the fixtures run it after a failed test, for its evidence."""
        if self.dom0 is None:  # not up (called during start too, before it has finished)
            return []
        checks = [
            Check(
                "dom0",
                new_crash_lines_check(DOM0_KERNEL_LOGS),
                "new crash lines in dom0's kernel logs (dmesg, xl dmesg, the guests' consoles):",
            )
        ]
        checks += [
            Check(
                g.name,
                new_crash_lines_check(GUEST_KERNEL_LOGS),
                f"new crash lines in {g.name}'s dmesg:",
            )
            for g in self.guests
        ]
        return [f"{c.problem}\n{evidence}" for c, evidence in failures(self.hosts(), checks)]

    # -- what dom0 holds and does ------------------------------------------------------------
    def backend_resources(self) -> dict[str, int]:
        """What dom0's backend holds now: grant mappings (gntdev areas in its address
        space), event channels bound by dom0's userspace, its fds and threads."""
        pid = self.daemons.get("dom0", {}).get("backend")
        if pid is None:
            raise TargetNotReady("backend", "not started by this target")
        out = self.host().check(
            f"grep -c /dev/xen/gntdev /proc/{pid}/maps; "
            "grep -c evtchn:python3 /proc/interrupts; "
            f"ls /proc/{pid}/fd | wc -l; ls /proc/{pid}/task | wc -l"
        )
        mappings, ports, fds, threads = (int(x) for x in out.split())
        return {"mappings": mappings, "ports": ports, "fds": fds, "threads": threads}

    def manager_status_line(self) -> str:
        """dom0's manager's status line (SIGUSR1): each instance's queue, in-flight and
        peak; read it with :func:`xenvtpm.manager.manager.status_counts`."""
        pid = self.daemons.get("dom0", {}).get("manager")
        if pid is None:
            raise TargetNotReady("manager", "not started by this target")
        if self.packaged:
            log = dom0_units.log_command("manager")
        else:
            log = f"cat {REMOTE_LOG_DIR}/manager.log"
        line: str = self.host().check(
            f"n=$({log} | grep -c ' status: '); kill -USR1 {pid}; "
            f"for i in $(seq 50); do [ $({log} | grep -c ' status: ') -gt $n ] && break; "
            f"sleep 0.2; done; {log} | grep ' status: ' | tail -n 1"
        )
        return line.strip()

    def trace(self, instance: int) -> list[str]:
        """The backend's traffic trace of ``instance``, as lines (one SSH command)."""
        _, out, _ = self.host().run(xen_driver.trace_command(instance), timeout=30)
        return out.splitlines()

    def swtpm_pid(self, instance: int) -> int | None:
        return xen_driver.swtpm_pid(self.host(), instance)

    def kill_swtpm(self, name: str, instance: int, evidence: Mapping[str, Path]) -> None:
        """SIGKILL the instance's swtpm in dom0; restarting it is the manager's job."""
        pid = self.swtpm_pid(instance)
        if pid is None:
            raise TargetNotReady(f"swtpm of {name}", "no such process", dict(evidence))
        self.host().check(f"kill -KILL {pid}")
        Deadline(10.0).wait_for(lambda: self.swtpm_pid(instance) != pid, f"swtpm {pid} to die")

    def reset_vtpm(self, instance: int) -> None:
        """The operator's reset of the instance, in dom0: ends its failure mode."""
        rc, out, err = self.host().run(
            f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm reset "
            f"--manager {xen_driver.MANAGER_SOCKET} {instance}",
            timeout=120,
        )
        if rc != 0:
            raise ResetFailed(instance, err or out)

    def signal(self, pid: int, signal_name: str) -> None:
        self.host().check(f"kill -{signal_name} {pid}")

    def detach_domain(self, domid: int) -> None:
        """The toolstack's ``detach`` in dom0: both vTPM directories of ``domid`` go."""
        self.host().check(f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm detach --domid {domid}")

    def probe(self, guest: XenGuest, *args: str) -> dict[str, Any]:
        """``python3 -m xenvtpm probe ARGS`` inside ``guest`` (as its domain); its JSON."""
        command = f"cd {REMOTE_PACKAGE_DIR} && python3 -m xenvtpm probe " + shlex.join(args)
        rc, out, err = guest.run(command)
        if rc != 0:
            raise TargetNotReady(guest.name, f"probe {shlex.join(args)} exited {rc}: {err}")
        answer: dict[str, Any] = json.loads(out)
        return answer

    # -- evidence and the end ------------------------------------------------------------
    def collect(
        self, skip: Set[str] = frozenset(), cursors: Mapping[str, str] | None = None
    ) -> None:
        """dom0's dmesg and journal, xl dmesg, /var/log/xen and daemon logs -> artifacts;
        ``skip``: guests whose login would time out (crashed)."""
        if self.dom0 is not None and self.dom0.connected:
            guests = {
                g.name: g.ssh for g in self.guests if g.ssh is not None and g.name not in skip
            }
            if self.packaged:
                with contextlib.suppress(HarnessError):
                    self.dom0.run(dom0_units.save_logs_command(REMOTE_LOG_DIR), timeout=60)
            collect_logs(self.dom0, guests, self.artifacts, cursors)

    def close(self) -> None:
        """Close every login; the daemons are left to whoever stops the machine."""
        self.daemons.clear()
        for g in self.guests:
            if g.ssh is not None:
                g.ssh.close()
                g.ssh = None
            g.domid = None
        if self.dom0 is not None:
            self.dom0.close()
            self.dom0 = None
