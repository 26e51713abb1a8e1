"""Requests and responses that span several of the ten data pages, both ways."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from echo_manager import EchoManager, echo_command, expected_response
from simenv import SimEnv


@pytest.fixture(scope="module")
def echo_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimEnv, EchoManager]]:
    env = SimEnv(tmp_path_factory.mktemp("echo"))
    try:
        env.start_hypervisor()
        with EchoManager(env.manager_socket) as manager:
            env.start_backend()
            env.add_guest("guest1", instance=7)
            yield env, manager
    finally:
        env.close()


@pytest.mark.parametrize(
    ("request_padding", "response_size"),
    [(0, 10), (4082, 4096), (4083, 4097), (30000, 20000), (40946, 40960), (0, 40960)],
)
def test_packet_spans_pages(
    echo_env: tuple[SimEnv, EchoManager], request_padding: int, response_size: int
) -> None:
    env, manager = echo_env
    command = echo_command(response_size, request_padding)
    assert env.guests[0].transmit(command) == expected_response(command)
    assert manager.packets[-1] == (7, len(command))


def test_response_larger_than_the_ring_becomes_failure(
    echo_env: tuple[SimEnv, EchoManager],
) -> None:
    env, _ = echo_env
    guest = env.guests[0]
    assert guest.transmit(echo_command(40961)) == struct.pack(">HII", 0x8001, 10, 0x101)
    command = echo_command(100)
    assert guest.transmit(command) == expected_response(command)


def test_instance_prefix_is_big_endian(echo_env: tuple[SimEnv, EchoManager]) -> None:
    env, manager = echo_env
    env.guests[0].transmit(echo_command(10))
    assert manager.packets[-1][0] == 7  # decoded as >I by the manager double
