"""Same-run baselines on the same nats-server, with nats-py (issue 7, scenario 7).

- `raw_work_queue`: publish N jobs to a work-queue stream, pull batches, ack each.
- `raw_kv_pattern`: per job a KV create on submit, then two CAS updates (claim, done) and a
  signal ack — the minimum a KV-backed durable queue does, without any of our guarantees'
  extra reads.
Both report jobs/s; the mailbox's end-to-end throughput is compared with `raw_kv_pattern`.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.js.api import KeyValueConfig, RetentionPolicy, StreamConfig

from service.natsclient import connect


async def raw_work_queue(url: str, n: int, prefix: str = "bq") -> float:
    nc = await connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=f"{prefix}-wq", subjects=[f"{prefix}.wq.>"],
                                     retention=RetentionPolicy.WORK_QUEUE))
    psub = await js.pull_subscribe(f"{prefix}.wq.>", durable=f"{prefix}-c", stream=f"{prefix}-wq")
    started = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def publish(i: int) -> None:
        async with sem:
            await js.publish(f"{prefix}.wq.{i % 1000}", b"x")

    async def consume() -> None:
        done = 0
        while done < n:
            try:
                msgs = await psub.fetch(128, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            done += len(msgs)

    await asyncio.gather(asyncio.gather(*(publish(i) for i in range(n))), consume())
    elapsed = time.perf_counter() - started
    await js.delete_stream(f"{prefix}-wq")
    await nc.close()
    return n / elapsed


async def raw_kv_pattern(url: str, n: int, prefix: str = "bk") -> float:
    nc = await connect(url)
    js = nc.jetstream()
    kv = await js.create_key_value(KeyValueConfig(bucket=f"{prefix}-kv", history=1, direct=True))
    await js.add_stream(StreamConfig(name=f"{prefix}-sig", subjects=[f"{prefix}.sig.>"],
                                     retention=RetentionPolicy.WORK_QUEUE))
    psub = await js.pull_subscribe(f"{prefix}.sig.>", durable=f"{prefix}-c", stream=f"{prefix}-sig")
    enc = msgspec.json.encode
    started = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def submit(i: int) -> None:
        async with sem:
            await kv.create(f"job.{i}", enc({"id": i, "status": "queued"}))
            await js.publish(f"{prefix}.sig.{i}", str(i).encode())

    async def work(m) -> None:
        i = int(m.data)
        entry = await kv.get(f"job.{i}")
        rev = await kv.update(f"job.{i}", enc({"id": i, "status": "claimed"}), last=entry.revision)
        await kv.update(f"job.{i}", enc({"id": i, "status": "done"}), last=rev)
        await m.ack()

    async def consume() -> None:
        done = 0
        while done < n:
            try:
                msgs = await psub.fetch(128, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            await asyncio.gather(*(work(m) for m in msgs))
            done += len(msgs)

    await asyncio.gather(asyncio.gather(*(submit(i) for i in range(n))), consume())
    elapsed = time.perf_counter() - started
    await js.delete_stream(f"{prefix}-sig")
    await js.delete_key_value(f"{prefix}-kv")
    await nc.close()
    return n / elapsed
