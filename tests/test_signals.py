"""StopRequests' rule for a second signal: only a second Ctrl-C cuts a stop short."""
import signal

import pytest

import src.signals
from src.signals import StopRequests


class Exited(Exception):
    pass


@pytest.fixture
def stops(monkeypatch):
    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(src.signals.os, "_exit", exit_now)
    requests = StopRequests()
    requests.in_loop = True
    return requests


def test_a_second_ctrl_c_exits_at_once(stops):
    stops._handle(signal.SIGINT, None)
    with pytest.raises(Exited, match="130"):
        stops._handle(signal.SIGINT, None)


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP])
@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2])
def test_the_same_stop_reaching_the_run_twice_changes_nothing(stops, first, second):
    """A terminal's Ctrl-C reaches a sweep's run directly and, as SIGTERM, through its job wrapper, in either order."""
    stops._handle(first, None)
    stops._handle(second, None)
    assert stops.requested and stops.exit_code == 128 + first


def test_outside_the_loop_a_signal_exits_at_once(stops):
    stops.in_loop = False
    with pytest.raises(Exited, match="143"):
        stops._handle(signal.SIGTERM, None)
