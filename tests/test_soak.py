"""A short soak in CI (``make soak`` runs 10 minutes): past every cache bound at a fixed
rate, the server's memory and open files stay flat and every request is answered."""

from __future__ import annotations

from loadtest.soak import run


def test_short_soak_is_flat() -> None:
    result = run(seconds=15, rate=300, sample_every=1.5)
    answers = result["answers"]
    print(
        f"\n{answers}; RSS KiB {result['rss_kib_start']} -> {result['rss_kib_end']}, "
        f"fds {result['fds_start']} -> {result['fds_end']}"
    )
    assert not [k for k in answers if k.startswith("rpc_")], answers
    assert answers["allow"] >= 0.9 * 15 * 300  # the measured phase alone, at its rate
    # Caches were filled during the warm-up: what remains would be a leak. The bound leaves
    # room for allocator noise (a 30 s run moved by -0.4 MiB), not for a leak of ~1 KiB per
    # request (4.5 MiB here).
    assert result["rss_kib_end"] - result["rss_kib_start"] < 3 * 1024
    assert result["fds_end"] <= result["fds_start"] + 2
