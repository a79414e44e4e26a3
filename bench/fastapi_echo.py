#!/usr/bin/env python3
"""The combined HTTP echo as RabiBridge's production guide builds it: a
FastAPI app whose handler calls the echo service over the broker with
aio-pika (RabiBridge's protocol: [args, kwargs] in msgpack to exchange rpc,
routing key async_NAME, a reply queue and a correlation id).

usage: fastapi_echo.py AMQP_URL PORT FUNCTION
"""
import asyncio
import sys

import aio_pika
import msgpack
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

url, port, function = sys.argv[1], int(sys.argv[2]), sys.argv[3]
app = FastAPI()
state = {}


@app.on_event("startup")
async def connect():
    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel()
    state["exchange"] = await channel.declare_exchange("rpc", aio_pika.ExchangeType.DIRECT, durable=True)
    replies = await channel.declare_queue("", exclusive=True)
    state["futures"], state["replies"], state["cid"] = {}, replies.name, 0

    async def on_reply(message):
        fut = state["futures"].pop(message.correlation_id, None)
        if fut is not None and not fut.done():
            fut.set_result(message.body)
    await replies.consume(on_reply, no_ack=True)
    state["conn"] = conn


@app.post("/rpc/{name}")
async def call(name: str, request: Request):
    args = await request.json()
    state["cid"] += 1
    cid = str(state["cid"])
    fut = asyncio.get_running_loop().create_future()
    state["futures"][cid] = fut
    await state["exchange"].publish(
        aio_pika.Message(body=msgpack.dumps([args, {}]), correlation_id=cid, reply_to=state["replies"]),
        routing_key="async_" + name)
    try:
        code, result = msgpack.loads(await asyncio.wait_for(fut, 30))
    except asyncio.TimeoutError:
        return JSONResponse({"kind": "timeout", "message": "no reply"}, status_code=504)
    if code:
        return JSONResponse({"kind": "remote", "message": str(result)}, status_code=502)
    return JSONResponse(result)


if __name__ == "__main__":
    print("fastapi echo on port %d calling %s" % (port, function), file=sys.stderr, flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
