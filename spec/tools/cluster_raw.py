#!/usr/bin/python3
"""Raw AMQP against one node of the spec cluster (spec/cluster_spec.lua).

Run with Debian's /usr/bin/python3 (python3-aio-pika). Each command opens its
own connection to URL, so it says what THAT node does.

  cluster_raw.py reachable URL
      Exit 0 if an AMQP connection to URL opens, else 1 (the error on stderr).
  cluster_raw.py declare-quorum URL QUEUE
      Declares QUEUE durable with x-queue-type = quorum.
  cluster_raw.py exists URL QUEUE
      Exit 0 if QUEUE exists (a passive declare), 4 if the broker says it
      does not.
  cluster_raw.py publish URL QUEUE TEXT
      Publishes TEXT, persistent, to QUEUE through the default exchange;
      exit 0 only once the broker confirms it (for a quorum queue: once a
      majority of its members has it).
  cluster_raw.py get URL QUEUE
      Takes one message from QUEUE (basic.get, acked) and prints its body;
      exit 3 if the queue is empty.
  cluster_raw.py delete URL QUEUE
      Deletes QUEUE.
"""
import asyncio
import sys

import aio_pika
import aiormq

NOT_FOUND = 4
EMPTY = 3


async def run(cmd, url, args):
    conn = await aio_pika.connect(url, timeout=10)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        if cmd == "reachable":
            return 0
        queue = args[0]
        if cmd == "declare-quorum":
            await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        elif cmd == "exists":
            try:
                await ch.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return NOT_FOUND
        elif cmd == "publish":
            # With confirms on, publish returns once the broker has acked it
            # and raises on a nack.
            await ch.default_exchange.publish(
                aio_pika.Message(body=args[1].encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue)
        elif cmd == "get":
            q = await ch.get_queue(queue, ensure=False)
            message = await q.get(fail=False)
            if message is None:
                return EMPTY
            await message.ack()
            sys.stdout.write(message.body.decode())
        elif cmd == "delete":
            await ch.queue_delete(queue)
        else:
            sys.exit("unknown command " + cmd)
    return 0


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd, url, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        code = asyncio.run(run(cmd, url, args))
    except (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError) as e:
        print("%s %s: %r" % (cmd, url, e), file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
