"""--max-bandwidth: the token bucket driven by a fake clock, rates as users write them,
and a capped clone over a real sshd that cannot finish sooner than the cap allows."""

from __future__ import annotations

import time

import pytest

from p2v.bandwidth import TokenBucket, parse_rate
from tests.p2v.conftest import connect_options
from tests.p2v.disks import striped_disk

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize(
    ("text", "value"),
    [("40M", 40e6), ("40MB/s", 40e6), ("1.5G", 1.5e9), ("512Ki", 512 * 1024), ("1000", 1000.0)],
)
def test_rates_parse_as_users_write_them(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "0", "-4M", "40 parsecs", ""])
def test_bad_rates_are_refused_in_one_line(text):
    with pytest.raises(ValueError, match="bandwidth"):
        parse_rate(text)


def test_bucket_lets_the_burst_through_then_holds_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.take(500) == 0  # the burst passes at once
    assert bucket.take(250) == pytest.approx(0.25)
    # 10,000 bytes more in pieces: exactly 10 s at 1000 B/s, whatever the piece sizes
    start = clock.now
    for n in (1, 4000, 999, 3000, 2000):
        bucket.take(n)
    assert clock.now - start == pytest.approx(10.0)


def test_bucket_refills_while_idle_but_never_above_the_burst():
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    bucket.take(500)
    clock.now += 3600  # an idle hour buys a burst, not an hour of bytes
    assert bucket.take(500) == 0
    assert bucket.take(1000) == pytest.approx(1.0)


def test_capped_clone_takes_at_least_bytes_over_rate(sshd, tmp_path):
    disk = striped_disk(str(tmp_path / "sda.raw"), 24, seed=7)  # 8 MiB of data
    rate = 4e6
    from p2v.clone import CloneOptions, clone

    t0 = time.monotonic()
    res = clone(
        connect_options(sshd),
        str(tmp_path / "out"),
        CloneOptions(out_format="raw", disks=[disk], compress=False, max_bandwidth=rate),
    )
    seconds = time.monotonic() - t0
    wire = res.disks[0].bytes_wire
    assert wire >= 8 * MiB
    # the bucket's burst (rate/4) and one SSH window (2 MiB) may pass unpaced; the rest
    # cannot cross faster than the rate. A slower machine only lengthens `seconds`.
    assert seconds >= (wire - rate / 4 - 2 * MiB) / rate
    with open(disk, "rb") as a, open(res.disks[0].image, "rb") as b:
        assert a.read() == b.read()


def test_clone_command_refuses_a_bad_rate(capsys):
    from p2v.cli import main

    with pytest.raises(SystemExit):
        main(["clone", "--max-bandwidth", "lots", "root@h", "out"])
    assert "bandwidth 'lots'" in capsys.readouterr().err
