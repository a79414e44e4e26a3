#!/usr/bin/python3
"""Raw AMQP for the specs: what the Lua client never does.

Run with Debian's /usr/bin/python3 (python3-aio-pika).

  amqp_raw.py publish URL < cases.json > results.json
      cases: [{"routing_key": K, "body_hex": H, "reply_to": true|false,
               "correlation_id": "123"}]
      Publishes every case to the `rpc` exchange (mandatory), with reply_to =
      a private exclusive queue unless reply_to is false, then collects the
      replies for at most --wait seconds (less once every case that asked for
      a reply has one). Prints one result per case:
      {"correlation_id", "replied", "body_hex", "body_text", "returned"}.

  amqp_raw.py serve-once URL QUEUE ROUTING_KEY REPLY_HEX OUT_FILE [TIMEOUT]
      Acts as a foreign server: declares QUEUE (auto-delete), binds it to
      `rpc` with ROUTING_KEY, writes "ready" to OUT_FILE.ready once it
      consumes, takes ONE request, writes its body and properties to OUT_FILE
      as JSON, replies REPLY_HEX (bytes) to its reply_to with its
      correlation_id, acks, and exits.
"""
import asyncio
import json
import os
import sys

import aio_pika


def text_of(b):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


async def publish(url, cases, wait):
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange("rpc", ensure=False)
        replies = await ch.declare_queue("", exclusive=True, auto_delete=True)
        results = {}
        returned = set()
        done = asyncio.Event()
        expected = {str(c["correlation_id"]) for c in cases if c.get("reply_to", True)}

        def on_return(_sender, message):
            returned.add(message.correlation_id)

        ch.return_callbacks.add(on_return)

        async def on_reply(message):
            results[message.correlation_id] = message.body
            if expected <= set(results):
                done.set()

        await replies.consume(on_reply, no_ack=True)
        for c in cases:
            props = dict(body=bytes.fromhex(c["body_hex"]), correlation_id=str(c["correlation_id"]))
            if c.get("reply_to", True):
                props["reply_to"] = replies.name
            try:
                await ex.publish(aio_pika.Message(**props), routing_key=c["routing_key"], mandatory=True)
            except Exception as e:  # a nack or a return: report it, go on
                returned.add(str(c["correlation_id"]))
                print("publish failed: %r" % (e,), file=sys.stderr)
        if expected:
            try:
                await asyncio.wait_for(done.wait(), wait)
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(wait)
        out = []
        for c in cases:
            cid = str(c["correlation_id"])
            body = results.get(cid)
            out.append({
                "correlation_id": cid,
                "replied": body is not None,
                "body_hex": body.hex() if body is not None else None,
                "body_text": text_of(body) if body is not None else None,
                "returned": cid in returned,
            })
        return out


async def serve_once(url, queue, routing_key, reply_hex, out_file, timeout):
    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange("rpc", aio_pika.ExchangeType.DIRECT, durable=True)
        q = await ch.declare_queue(queue, durable=False, auto_delete=True)
        await q.bind(ex, routing_key)
        got = asyncio.get_running_loop().create_future()

        async def on_request(message):
            if not got.done():
                got.set_result(message)

        await q.consume(on_request)
        with open(out_file + ".ready.tmp", "w") as f:
            f.write("ready\n")
        os.rename(out_file + ".ready.tmp", out_file + ".ready")
        message = await asyncio.wait_for(got, timeout)
        headers = {k: (v if isinstance(v, (int, str, float, bool)) else str(v))
                   for k, v in (message.headers or {}).items()}
        record = {
            "body_hex": message.body.hex(),
            "body_text": text_of(message.body),
            "correlation_id": message.correlation_id,
            "reply_to": message.reply_to,
            "routing_key": message.routing_key,
            "exchange": message.exchange,
            "expiration": str(message.expiration) if message.expiration is not None else None,
            "headers": headers,
        }
        if message.reply_to:
            await ch.default_exchange.publish(
                aio_pika.Message(body=bytes.fromhex(reply_hex), correlation_id=message.correlation_id),
                routing_key=message.reply_to)
        await message.ack()
        # Written aside and renamed, so a reader never sees half a file.
        with open(out_file + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(out_file + ".tmp", out_file)


def main():
    mode = sys.argv[1]
    if mode == "publish":
        url = sys.argv[2]
        wait = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
        cases = json.load(sys.stdin)
        print(json.dumps(asyncio.run(publish(url, cases, wait))))
    elif mode == "serve-once":
        url, queue, rk, reply_hex, out_file = sys.argv[2:7]
        timeout = float(sys.argv[7]) if len(sys.argv) > 7 else 20.0
        asyncio.run(serve_once(url, queue, rk, reply_hex, out_file, timeout))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
