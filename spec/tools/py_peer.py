#!/usr/bin/python3
"""A Python RabiBridge peer for the interop specs: design.md section 4 as the
Python library speaks it, written with aio-pika (Debian's python3-aio-pika),
msgpack and zstandard. It is the other end of the wire, not our code.

  py_peer.py serve URL SERIALISER SUFFIX READY_FILE
      Serves py_add(a, b), py_echo(*args, **kwargs) -> [args, kwargs] and
      py_fail() (raises ValueError) as async functions, until SIGTERM.
  py_peer.py call URL SERIALISER NAME ARGS_JSON KWARGS_JSON [TIMEOUT]
      One remote_call; prints {"success", "err_code", "result"} as JSON.
"""
import asyncio
import json
import random
import signal
import sys
import traceback

import aio_pika
import msgpack
import zstandard

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
THRESHOLD = 1024


def serialise(obj, kind):
    data = json.dumps(obj).encode() if kind == "json" else msgpack.packb(obj, use_bin_type=True)
    if len(data) > THRESHOLD:
        data = zstandard.ZstdCompressor().compress(data)
    return data


def deserialise(data, kind):
    if data[:4] == ZSTD_MAGIC:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return json.loads(data) if kind == "json" else msgpack.unpackb(data, raw=False)


def plain(v):
    """JSON-printable form of a msgpack result (bytes become text)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {plain(k): plain(x) for k, x in v.items()}
    return v


async def serve(url, kind, suffix, ready_file):
    funcs = {
        "py_add" + suffix: lambda a, b: a + b,
        "py_echo" + suffix: lambda *args, **kwargs: [list(args), kwargs],
        "py_fail" + suffix: lambda: (_ for _ in ()).throw(ValueError("boom from python")),
    }
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=16)
        ex = await ch.declare_exchange("rpc", aio_pika.ExchangeType.DIRECT, durable=True)
        for name, fn in funcs.items():
            q = await ch.declare_queue("rpc_async_" + name, durable=True, auto_delete=True,
                                       arguments={"x-overflow": "reject-publish"})
            await q.bind(ex, routing_key="async_" + name)

            async def on_message(message, fn=fn):
                try:
                    args, kwargs = deserialise(message.body, kind)
                    response = [0, fn(*args, **kwargs)]
                except Exception:
                    response = [1, traceback.format_exc()]
                await ch.default_exchange.publish(
                    aio_pika.Message(body=serialise(response, kind), correlation_id=message.correlation_id),
                    routing_key=message.reply_to)
                await message.ack()

            await q.consume(on_message)
        open(ready_file, "w").write("ready")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


async def call(url, kind, name, args, kwargs, timeout):
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        reply = await ch.declare_queue("", exclusive=True)
        cid = str(random.randrange(1 << 30))
        fut = asyncio.get_running_loop().create_future()

        async def on_reply(message):
            if message.correlation_id == cid and not fut.done():
                fut.set_result(message.body)

        await reply.consume(on_reply, no_ack=True)
        ex = await ch.get_exchange("rpc", ensure=False)
        try:
            await ex.publish(aio_pika.Message(body=serialise([args, kwargs], kind), correlation_id=cid,
                                              reply_to=reply.name),
                             routing_key="async_" + name, mandatory=True)
            code, result = deserialise(await asyncio.wait_for(fut, timeout), kind)
            out = {"success": True, "err_code": code, "result": plain(result)}
        except Exception as e:
            out = {"success": False, "err_code": 1, "result": "%s: %s" % (type(e).__name__, e)}
        print(json.dumps(out))


def main():
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]))
    else:
        timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 10
        asyncio.run(call(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]),
                         json.loads(sys.argv[6]), timeout))


if __name__ == "__main__":
    main()
