"""Thread choice: free cores from the load average, an explicit count wins, one line says which and how to change."""

import pytest

from gistlib.threads import choose_threads, free_cores


@pytest.mark.parametrize(
    "cpus,load,expected", [(2, 0.0, 2), (2, 1.2, 1), (2, 1.6, 1), (2, 5.0, 1), (16, 3.4, 13), (4, 0.4, 4)]
)
def test_free_cores_leaves_busy_cores_alone(cpus, load, expected):
    assert free_cores(cpus, load) == expected


def test_an_explicit_count_wins_and_the_choice_is_announced(capsys, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (1.3, 1.0, 1.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert choose_threads(3) == 3
    assert choose_threads(None) == 1 and choose_threads(0) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("--set run.threads=N" in line for line in lines)
    assert "torch threads: 1" in lines[1] and "load average 1.3" in lines[1]
    assert choose_threads(None, announce=False) == 1 and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="run.threads"):
        choose_threads(-1)
