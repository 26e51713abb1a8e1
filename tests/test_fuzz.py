"""The fuzzing campaign (``nox -s fuzz``), short, plus its saved regression inputs.

A ~8 s run of every target with the in-process engine (hypothesis), so that ``nox -s
tests`` catches a property broken by a change; the long coverage-guided campaign is
``nox -s fuzz -- --seconds 300``. Every file under ``tests/fuzz_corpus/<target>/`` is
replayed: put a crashing input from ``artifacts/fuzz/`` there once it is fixed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from harness import fuzz
from xenvtpm import tpm, tpmif
from xenvtpm.intake import Forward, intake

CORPUS = Path(__file__).parent / "fuzz_corpus"


def test_regression_inputs_pass() -> None:
    assert fuzz.replay(CORPUS) == {}


def test_the_inputs_that_once_ended_simxend_are_replayed() -> None:
    """Issue 14's inputs, on the targets that drive simxend itself."""
    assert {"json-nested-3000-deep", "integer-5000-digits", "gnt-unshare-one-ref-twice"} <= {
        p.name for p in (CORPUS / "hypercall").iterdir()
    }
    assert {"get-domain-path-superscript-two", "is-domain-introduced-superscript-two"} <= {
        p.name for p in (CORPUS / "xs-domid").iterdir()
    }


@pytest.mark.parametrize("name", list(fuzz.TARGETS))
def test_seeds_pass(name: str) -> None:
    for seed in fuzz.seeds(name):
        assert fuzz.run_one(fuzz.TARGETS[name], seed) is None, seed[:64].hex()


def test_short_campaign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--seconds", "8", "--engine", "hypothesis", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    inputs = int(last.split()[1])
    assert last == f"fuzz: {inputs} inputs, 0 crashes, 0 hangs"
    assert inputs >= len(fuzz.TARGETS)  # every target ran (how many: the host's speed)
    assert not list(tmp_path.glob("*-crash-*")) and not list(tmp_path.glob("*-hang-*"))


def test_a_crash_and_a_hang_are_counted_and_saved(tmp_path: Path) -> None:
    def target(data: bytes) -> None:
        if data == b"crash":
            raise ValueError("boom")
        if data == b"hang":
            while True:
                pass

    assert fuzz.run_one(target, b"fine") is None
    assert fuzz.run_one(target, b"crash") == "crash"
    assert fuzz.run_one(target, b"hang", hang_s=0.2) == "hang"
    saved = fuzz._save(tmp_path, "t", "crash", b"crash")
    assert saved.read_bytes() == b"crash" and saved.name.startswith("t-crash-")


def _pages(packet: bytes, npages: int = 10) -> list[memoryview]:
    return [memoryview(packet[i * 4096 : (i + 1) * 4096].ljust(4096, b"\0")) for i in range(npages)]


def _ring(size: int) -> bytes:
    return tpmif.TxRequest(0xFFFF_FFFF_FFFF_FFFF, 999, 0xFFFF, size).to_bytes().ljust(160, b"\0")


def test_intake_forwards_a_good_command_and_ignores_ref_and_addr() -> None:
    command = tpm.get_random_command(16)
    assert intake(_ring(len(command)), _pages(command), 10) == Forward(command, 0x17B)


@pytest.mark.parametrize(
    ("size", "packet", "npages", "rc"),
    [
        (0, b"", 10, tpm.TPM_RC.COMMAND_SIZE),
        (0xFFFF, tpm.get_random_command(16), 10, tpm.TPM_RC.COMMAND_SIZE),
        (4097, struct.pack(">HII", 0x8001, 4097, 0x17B) + bytes(4087), 1, tpm.TPM_RC.COMMAND_SIZE),
        (12, struct.pack(">HIIH", 0x8001, 0xFFFFFFFF, 0x17B, 16), 10, tpm.TPM_RC.COMMAND_SIZE),
        (12, struct.pack(">HIIH", 0x8003, 12, 0x17B, 16), 10, tpm.BAD_TAG_RC),
        (14, tpm.bind_command(7), 10, tpm.TPM_RC.COMMAND_CODE),
        # XENVTPM_CC_CANCEL, the manager's other control code: never from a guest
        (10, bytes.fromhex("80010000000a20000f02"), 10, tpm.TPM_RC.COMMAND_CODE),
    ],
)
def test_intake_answers_by_itself(size: int, packet: bytes, npages: int, rc: int) -> None:
    assert intake(_ring(size), _pages(packet, npages), npages) == tpm.error_response(rc)
