#!/usr/bin/python3
"""A Python RabiBridge peer for the interop specs, written from RabiBridge's
documented behaviour with aio-pika, msgpack and zstandard as Debian ships
them. It behaves as RabiBridge's RMQServer and RMQClient do at their
defaults (config/env.toml: msgpack, COMPRESS_THRESHOLD 1024, CID_MAX 2^30):

- serialisers: msgpack.dumps / msgpack.loads with no options, or
  json.dumps(x).encode("utf-8") / json.loads; zstd level 3 above 1024
  bytes, recognised by the frame magic and read with
  ZstdDecompressor().decompress (which needs the content size in the frame);
- server: one channel per function, no basic.qos (fetch_size None), queue
  rpc_async_NAME durable and auto-delete with x-overflow reject-publish,
  bound to exchange rpc; each message processed and acked after the reply,
  which is [0, result] or [1, the whole formatted traceback], published to
  the default exchange with the correlation_id. A body it cannot read gets
  no reply (the message is rejected), as in RabiBridge;
- client: publisher confirms, mandatory publish of [args, kwargs] with a
  decimal correlation_id and an exclusive server-named reply queue.
  RabiBridge waits without a timeout by default; here every call has one so
  that a failing spec ends.

Values are given to it as Python literals (eval'd with nan and inf
defined), so that a spec can name ints of any size, floats such as 1.0 or
-0.0, bytes and lone surrogates exactly; results come back as canon(v), a
text that shows every type (int(1) is not float(1.0)).

  py_peer.py serve URL SERIALISER SUFFIX READY_FILE
      Serves until SIGTERM: py_add(a, b), py_echo(*args, **kwargs) ->
      [args, kwargs], py_fail() (ValueError), py_fail_chained() (a
      ValueError raised while handling a KeyError), py_value_echo(v, pad)
      -> v, py_canon(v, pad) -> canon(v), py_canon_args(*args, **kwargs) ->
      canon([args, kwargs]), py_make(literal, pad) -> the value, py_stats()
      -> {"requests": n, "compressed": n}. With pad, a result r goes back
      as [r, pad] (pad makes bodies long enough to be compressed).
  py_peer.py call URL SERIALISER NAME ARGS_JSON KWARGS_JSON [TIMEOUT]
      One remote_call; prints {"success", "err_code", "result"} as JSON.
  py_peer.py batch URL SERIALISER
      Reads [{"name", "args": literal, "kwargs": literal, "timeout"}] as
      JSON on stdin, makes the calls in turn on one connection, prints
      [{"success", "err_code", "canon", "sent", "text", "error",
      "reply_compressed"}]: sent is canon(args[0]), text the result (or its
      first element) when it is an ASCII str.
"""
import asyncio
import json
import math
import random
import signal
import sys
import traceback

import aio_pika
import msgpack
import zstandard

ZSTD_MAGIC = 0x28B52FFD
COMPRESS_THRESHOLD = 1024
CID_MAX = 1073741824


class Codec:
    def __init__(self, kind):
        if kind == "msgpack":
            self.dumps, self.loads = msgpack.dumps, msgpack.loads
        elif kind == "json":
            self.dumps, self.loads = (lambda x: json.dumps(x).encode("utf-8")), json.loads
        else:
            raise ValueError("unknown serialiser " + kind)
        self.compressor = zstandard.ZstdCompressor(level=3)
        self.decompressor = zstandard.ZstdDecompressor()

    @staticmethod
    def is_compressed(body):
        return int.from_bytes(body[:4], "big") == ZSTD_MAGIC

    def pack(self, obj):
        body = self.dumps(obj)
        if len(body) > COMPRESS_THRESHOLD:
            body = self.compressor.compress(body)
        return body

    def unpack(self, body):
        if self.is_compressed(body):
            return self.loads(self.decompressor.decompress(body))
        return self.loads(body)


def literal(text):
    return eval(text, {"__builtins__": {}, "nan": math.nan, "inf": math.inf})


def canon(v):
    """Every value with its type: int(1), float(1.0), str('\\ud800'), bytes(ff)."""
    if v is None:
        return "None"
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, int):
        return "int(%d)" % v
    if isinstance(v, float):
        return "float(%r)" % v
    if isinstance(v, str):
        return "str(%s)" % ascii(v)
    if isinstance(v, bytes):
        return "bytes(%s)" % v.hex()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(canon(x) for x in v) + "]"
    if isinstance(v, dict):
        items = sorted((canon(k), canon(x)) for k, x in v.items())
        return "{" + ", ".join("%s: %s" % kv for kv in items) + "}"
    return "%s(%r)" % (type(v).__name__, v)


def plain(v):
    """JSON-printable form of a result (bytes become text)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {plain(k): plain(x) for k, x in v.items()}
    return v


def padded(result, pad):
    return result if pad is None else [result, pad]


def fail_chained():
    try:
        {}["missing"]
    except KeyError:
        raise ValueError("boom after a KeyError")


async def serve(url, kind, suffix, ready_file):
    codec = Codec(kind)
    stats = {"requests": 0, "compressed": 0}
    funcs = {
        "py_add": lambda a, b: a + b,
        "py_echo": lambda *args, **kwargs: [list(args), kwargs],
        "py_fail": lambda: (_ for _ in ()).throw(ValueError("boom from python")),
        "py_fail_chained": fail_chained,
        "py_value_echo": lambda v=None, pad=None: padded(v, pad),
        "py_canon": lambda v=None, pad=None: padded(canon(v), pad),
        "py_canon_args": lambda *args, **kwargs: canon([list(args), kwargs]),
        "py_make": lambda text, pad=None: padded(literal(text), pad),
        "py_stats": lambda: dict(stats),
    }
    conn = await aio_pika.connect_robust(url)
    async with conn:
        for name, fn in funcs.items():
            queue_name = "rpc_async_" + name + suffix
            ch = await conn.channel()
            ex = await ch.declare_exchange("rpc", aio_pika.ExchangeType.DIRECT, durable=True)
            q = await ch.declare_queue(queue_name, durable=True, auto_delete=True,
                                       arguments={"x-overflow": "reject-publish"})
            await q.bind(ex, routing_key=queue_name[4:])

            async def handle(message, fn=fn, ch=ch):
                try:
                    async with message.process():
                        if message.reply_to is None:
                            raise ValueError("Reply_to queue is None")
                        stats["requests"] += 1
                        stats["compressed"] += Codec.is_compressed(message.body)
                        # RabiBridge reads no header; this only shows one came.
                        stats["traceparent"] = (message.headers or {}).get("traceparent")
                        args, kwargs = codec.unpack(message.body)
                        try:
                            body = codec.pack([0, fn(*args, **kwargs)])
                        except Exception as e:
                            text = "".join(traceback.format_exception(type(e), value=e, tb=e.__traceback__))
                            body = codec.pack([1, text])
                        await ch.default_exchange.publish(
                            aio_pika.Message(body=body, correlation_id=message.correlation_id),
                            routing_key=message.reply_to)
                except Exception:
                    traceback.print_exc()

            async def on_message(message, handle=handle):
                asyncio.get_running_loop().create_task(handle(message))

            await q.consume(on_message)
        with open(ready_file, "w") as f:
            f.write("ready")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


class Client:
    def __init__(self, url, kind):
        self.url, self.codec = url, Codec(kind)
        self.futures = {}
        self.cid = random.randint(0, CID_MAX) % CID_MAX

    async def connect(self):
        self.conn = await aio_pika.connect_robust(self.url)
        self.channel = await self.conn.channel(on_return_raises=True)
        self.exchange = await self.channel.declare_exchange("rpc", aio_pika.ExchangeType.DIRECT, durable=True)
        self.replies = await self.channel.declare_queue("", exclusive=True)
        await self.replies.consume(self.on_reply, no_ack=True)

    async def on_reply(self, message):
        fut = self.futures.pop(message.correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_result(message.body)

    async def remote_call(self, name, args, kwargs, timeout):
        """-> err_code, result, whether the reply was compressed; raises as RabiBridge does."""
        cid = str(self.cid)
        self.cid = (self.cid + 1) % CID_MAX
        fut = asyncio.get_running_loop().create_future()
        self.futures[cid] = fut
        await self.exchange.publish(
            aio_pika.Message(body=self.codec.pack([args, kwargs]), correlation_id=cid,
                             reply_to=self.replies.name),
            routing_key="async_" + name, mandatory=True)
        try:
            body = await asyncio.wait_for(fut, timeout)
        finally:
            self.futures.pop(cid, None)
        code, result = self.codec.unpack(body)
        return code, result, Codec.is_compressed(body)

    async def close(self):
        await self.conn.close()


def failure(e):
    return {"success": False, "err_code": 1, "canon": None, "error": "%s: %s" % (type(e).__name__, e)}


async def call(url, kind, name, args, kwargs, timeout):
    client = Client(url, kind)
    await client.connect()
    try:
        code, result, _ = await client.remote_call(name, args, kwargs, timeout)
        out = {"success": True, "err_code": code, "result": plain(result)}
    except Exception as e:
        out = {"success": False, "err_code": 1, "result": "%s: %s" % (type(e).__name__, e)}
    await client.close()
    print(json.dumps(out))


async def batch(url, kind, calls):
    client = Client(url, kind)
    await client.connect()
    out = []
    for c in calls:
        try:
            args, kwargs = literal(c.get("args", "[]")), literal(c.get("kwargs", "{}"))
            sent = canon(args[0]) if args else None
            code, result, compressed = await client.remote_call(c["name"], args, kwargs, c.get("timeout", 10))
            r = {"success": True, "err_code": code, "sent": sent, "reply_compressed": compressed}
            if code == 0:
                r["canon"] = canon(result)
                first = result[0] if isinstance(result, list) and result else result
                r["text"] = first if isinstance(first, str) and first.isascii() else None
            else:
                r["error"] = result
        except Exception as e:
            r = failure(e)
        out.append(r)
    await client.close()
    print(json.dumps(out))


def main():
    mode = sys.argv[1]
    if mode == "serve":
        asyncio.run(serve(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]))
    elif mode == "call":
        timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 10
        asyncio.run(call(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]),
                         json.loads(sys.argv[6]), timeout))
    elif mode == "batch":
        asyncio.run(batch(sys.argv[2], sys.argv[3], json.load(sys.stdin)))
    else:
        sys.exit("usage: py_peer.py serve|call|batch ...")


if __name__ == "__main__":
    main()
