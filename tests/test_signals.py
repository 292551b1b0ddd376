"""The signal stream: config verification, garbage, one pending signal per dispatch."""

from __future__ import annotations

import pytest

from service.app import start_pod
from service.natsclient import connect
from service.signals import Signals, SignalConfigError, blocked_delay_ms

from .conftest import unique_prefix
from .pods import fast_settings, submit, wait_for, wait_runs


def test_blocked_delay_grows_and_caps():
    assert [blocked_delay_ms(n, 500, 30_000) for n in (None, 1, 2, 3, 4, 7, 8, 100)] == [
        500, 500, 1000, 2000, 4000, 30_000, 30_000, 30_000,
    ]


async def test_a_consumer_that_does_not_match_the_settings_stops_the_start(nats_url):
    prefix = unique_prefix("sig")
    nc = await connect(nats_url)
    try:
        await Signals(nc, prefix).ensure(replicas=1, ack_wait_ms=30_000, max_ack_pending=100, max_deliver=-1)
        await Signals(nc, prefix).ensure(replicas=1, ack_wait_ms=30_000, max_ack_pending=100, max_deliver=-1)  # same: fine
        with pytest.raises(SignalConfigError, match="ack_wait"):
            await Signals(nc, prefix).ensure(replicas=1, ack_wait_ms=5_000, max_ack_pending=100, max_deliver=-1)
    finally:
        await nc.close()


async def test_one_pending_signal_per_dispatch(nats_url):
    prefix = unique_prefix("sig")
    nc = await connect(nats_url)
    try:
        signals = Signals(nc, prefix)
        await signals.ensure(replicas=1, ack_wait_ms=30_000, max_ack_pending=100, max_deliver=-1)
        assert await signals.publish("t", "d1") is True
        assert await signals.publish("t", "d1") is False  # already pending: refused, not an error
        assert await signals.publish("t", "d2") is True
        # the stream's count is exact once a publish is acked; the consumer's num_pending is
        # updated by the server asynchronously (CI once read 1 here), so it is waited for
        assert (await signals.js.stream_info(signals.stream)).state.messages == 2

        async def consumer_sees_both() -> bool:
            return (await signals.pending())[0] == 2

        await wait_for(consumer_sees_both, timeout=5)
    finally:
        await nc.close()


async def test_garbage_on_the_signal_subject_is_acked_and_the_loop_goes_on(nats_url):
    prefix = unique_prefix("sig")
    pod = await start_pod(fast_settings(prefix), url=nats_url, handler="echo", start_api=False)
    try:
        js = pod.nc.jetstream()
        for body in (b"", b"not json", b'{"thread_id": 1}', b"\xff\xfe", b'{"thread_id": "t", "dispatch_id": null}'):
            await js.publish(f"{prefix}.signal.hx.hy{len(body)}", body)
        run_id = await submit(pod, "t", "still works")
        await wait_runs(pod, [run_id])

        async def drained() -> bool:  # every garbage message acked (the counts alone may lag)
            num_pending, ack_pending, _ = await pod.signals.pending()
            return num_pending == 0 and ack_pending == 0 and pod.signals.garbage == 5

        await wait_for(drained, timeout=5)
        assert pod.worker.signal_loop_running
    finally:
        await pod.stop()
