"""``python3 -m xenvtpm probe OP ARGS``: try one hypervisor operation as this domain.

Isolation scenarios run it inside a guest ("can guest A read guest B's xenstore or map
its grants?"). It goes through ``open_hypervisor()`` and the interface only, like the
driver pair, so the answer holds for the real adapter too. It prints one JSON object,
``{"ok": bool, "errno": str | null, "value": ...}``, and exits 0 whenever it could try
(a denied operation is a successful probe); 2 on bad usage, 1 if no hypervisor.

    whoami                   value: this domain's id
    xs-read PATH             value: the node's contents (text)
    xs-write PATH VALUE      value: null
    xs-directory PATH        value: the children's names
    gnt-map DOMID REF        value: {"pages": 1, "head": hex of the first 16 bytes}
    evtchn-bind DOMID PORT   value: the local port bound

Standard library only (it deploys with the driver into any domain).
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from xenvtpm.xen import open_hypervisor
from xenvtpm.xen.interface import Hypervisor

_ERRNO_WORD = re.compile(r"\bE[A-Z0-9]{2,}\b")


def errno_name(exc: BaseException) -> str:
    """The errno name behind ``exc`` (``EACCES``...), searching its causes; else its type."""
    seen: BaseException | None = exc
    while seen is not None:
        name = getattr(seen, "errno_name", None)
        if isinstance(name, str) and name:
            return name
        num = getattr(seen, "errno", None)
        if isinstance(num, int) and num in errno_mod.errorcode:
            return str(errno_mod.errorcode[num])
        seen = seen.__cause__ or seen.__context__
    for word in _ERRNO_WORD.findall(str(exc)):
        if hasattr(errno_mod, word):
            return str(word)
    return type(exc).__name__


def _whoami(hv: Hypervisor) -> int:
    domid = getattr(hv, "domid", None)
    if isinstance(domid, int):
        return domid
    # Real Xen: the toolstack writes /local/domain/<id>/domid; relative paths are ours.
    return int(hv.xenstore.read("domid"))


def _gnt_map(hv: Hypervisor, domid: int, ref: int) -> dict[str, Any]:
    mapped = hv.grants.map_grant_refs(domid, [ref], writable=False)
    try:
        head = bytes(mapped.pages[0][:16]).hex()
        return {"pages": len(mapped.pages), "head": head}
    finally:
        mapped.close()


def _evtchn_bind(hv: Hypervisor, domid: int, port: int) -> int:
    channel = hv.events.bind_interdomain(domid, port)
    try:
        return channel.port
    finally:
        channel.close()


def _operations(hv: Hypervisor) -> dict[str, tuple[int, Callable[..., Any]]]:
    xs = hv.xenstore
    return {
        "whoami": (0, lambda: _whoami(hv)),
        "xs-read": (1, lambda path: xs.read(path).decode(errors="replace")),
        "xs-write": (2, lambda path, value: xs.write(path, value)),
        "xs-directory": (1, lambda path: sorted(xs.directory(path))),
        "gnt-map": (2, lambda domid, ref: _gnt_map(hv, int(domid), int(ref))),
        "evtchn-bind": (2, lambda domid, port: _evtchn_bind(hv, int(domid), int(port))),
    }


OPERATIONS = ("whoami", "xs-read", "xs-write", "xs-directory", "gnt-map", "evtchn-bind")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m xenvtpm probe",
        description="Try one hypervisor operation as this domain; print one JSON object.",
    )
    p.add_argument("op", choices=OPERATIONS)
    p.add_argument("args", nargs="*")
    return p


def run(hv: Hypervisor, op: str, args: Sequence[str]) -> dict[str, Any]:
    """Try ``op``; the result object (never raises for a refused operation)."""
    arity, fn = _operations(hv)[op]
    if len(args) != arity:
        raise ValueError(f"{op} takes {arity} argument(s), got {len(args)}")
    try:
        value = fn(*args)
    except Exception as e:  # every refusal is an answer, with its errno
        return {"ok": False, "errno": errno_name(e), "value": None, "error": str(e)}
    return {"ok": True, "errno": None, "value": value}


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        hv = open_hypervisor()
    except Exception as e:  # reported as JSON like any other failure
        print(json.dumps({"ok": False, "errno": errno_name(e), "value": None, "error": str(e)}))
        return 1
    try:
        try:
            result = run(hv, ns.op, ns.args)
        except ValueError as e:
            print(f"probe: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result))
        return 0
    finally:
        hv.close()


if __name__ == "__main__":
    sys.exit(main())
