#!/usr/bin/python3
"""Raw AMQP and zstd bodies for spec/faults_spec.lua.

Run with Debian's /usr/bin/python3 (python3-aio-pika, python3-zstandard).

  faults_raw.py bodies
      Prints JSON with hostile zstd bodies (hex):
        bomb_hex       a zstd frame of a well-formed request ([["000..."], {}])
                       whose content is 10 MB: a few hundred bytes on the wire
        bomb_plain_len the size it decompresses to
        truncated_hex  a zstd frame of a well-formed 4 kB request, cut in half

  faults_raw.py publish URL WAIT < cases.json > results.json
      cases: [{"exchange": "rpc" (default) | "" | ..., "routing_key": K,
               "body_hex": H, "reply_to": true|false,
               "correlation_id": "123" | null (no correlation_id at all)}]
      Publishes every case (mandatory), with reply_to = a private exclusive
      queue unless reply_to is false, then collects replies for at most WAIT
      seconds (less once every case with reply_to and a correlation id has
      its reply; the whole WAIT when some case has reply_to but no
      correlation id). Prints
      {"results": [{"correlation_id", "replied", "body_hex", "returned"}],
       "uncorrelated": [hex of each reply that came without a correlation id]}
"""
import asyncio
import json
import sys

import aio_pika
import zstandard


def bodies():
    plain = b'[["' + b"0" * 10_000_000 + b'"], {}]'
    bomb = zstandard.ZstdCompressor(level=3).compress(plain)
    small = b'[["' + b"abcdefgh" * 500 + b'"], {}]'
    z = zstandard.ZstdCompressor(level=3).compress(small)
    return {
        "bomb_hex": bomb.hex(),
        "bomb_plain_len": len(plain),
        "truncated_hex": z[: len(z) // 2].hex(),
    }


async def publish(url, cases, wait):
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        exchanges = {}
        replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
        results = {}
        uncorrelated = []
        returned = set()
        done = asyncio.Event()
        expected = {str(c["correlation_id"]) for c in cases
                    if c.get("reply_to", True) and c.get("correlation_id") is not None}
        wait_all = any(c.get("reply_to", True) and c.get("correlation_id") is None for c in cases)

        def on_return(_sender, message):
            returned.add(message.correlation_id)

        ch.return_callbacks.add(on_return)

        async def on_reply(message):
            if message.correlation_id is None:
                uncorrelated.append(message.body.hex())
                return
            results[message.correlation_id] = message.body
            if expected <= set(results) and not wait_all:
                done.set()

        await replies.consume(on_reply, no_ack=True)
        for c in cases:
            name = c.get("exchange", "rpc")
            if name not in exchanges:
                exchanges[name] = ch.default_exchange if name == "" else await ch.get_exchange(name, ensure=False)
            props = dict(body=bytes.fromhex(c["body_hex"]))
            cid = c.get("correlation_id")
            if cid is not None:
                props["correlation_id"] = str(cid)
            if c.get("reply_to", True):
                props["reply_to"] = replies.name
            try:
                await exchanges[name].publish(aio_pika.Message(**props), routing_key=c["routing_key"],
                                              mandatory=True)
            except Exception as e:  # a nack or a return: report it, go on
                returned.add(None if cid is None else str(cid))
                print("publish failed: %r" % (e,), file=sys.stderr)
        if expected and not wait_all:
            try:
                await asyncio.wait_for(done.wait(), wait)
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(wait)
        out = []
        for c in cases:
            cid = c.get("correlation_id")
            cid = None if cid is None else str(cid)
            body = results.get(cid) if cid is not None else None
            out.append({
                "correlation_id": cid,
                "replied": body is not None,
                "body_hex": body.hex() if body is not None else None,
                "returned": cid in returned,
            })
        return {"results": out, "uncorrelated": uncorrelated}


def main():
    mode = sys.argv[1]
    if mode == "bodies":
        print(json.dumps(bodies()))
    elif mode == "publish":
        url = sys.argv[2]
        wait = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
        cases = json.load(sys.stdin)
        print(json.dumps(asyncio.run(publish(url, cases, wait))))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
