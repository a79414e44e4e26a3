#!/usr/bin/env python3
"""Drives a program through a pseudo-terminal, as a person at a keyboard.

usage: pty_session.py PROGRAM [ARG...] < steps.json

steps.json is a list of steps, each one of:
  {"send": "text"}                 keys to type ("\\t" Tab, "\\u0003" Ctrl-C,
                                   "\\r" Enter, "\\u0004" Ctrl-D)
  {"expect": "regex", "timeout": s}  wait until the output since the last
                                   match matches (escape sequences and \\r
                                   removed); then the mark moves past it
  {"sleep": s}
  {"exit": s}                      wait for the program to end

Prints one JSON object: {"ok": bool, "failed": step index or null,
"why": text, "output": everything the program wrote (cleaned), "code":
exit code or null}. The program is killed if it is still running at the end.
"""
import json
import os
import pty
import re
import select
import signal
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\x1b\][^\x07]*\x07|\r")


def main():
    steps = json.load(sys.stdin)
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(sys.argv[1], sys.argv[1:])
    raw = b""
    mark = 0
    code = None
    result = {"ok": True, "failed": None, "why": ""}

    def clean():
        return ANSI.sub("", raw.decode("utf-8", "replace"))

    def pump(timeout):
        nonlocal raw, code
        r, _, _ = select.select([fd], [], [], timeout)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if chunk:
                raw += chunk
                return True
        if code is None:
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid == pid:
                code = os.waitstatus_to_exitcode(status)
        return False

    for i, step in enumerate(steps):
        if "send" in step:
            try:
                os.write(fd, step["send"].encode())
            except OSError:
                pass  # the program has ended: a later step says so
        elif "sleep" in step:
            end = time.monotonic() + step["sleep"]
            while time.monotonic() < end:
                pump(end - time.monotonic())
        elif "expect" in step:
            pattern = re.compile(step["expect"], re.S)
            end = time.monotonic() + step.get("timeout", 10)
            while True:
                m = pattern.search(clean(), mark)
                if m:
                    mark = m.end()
                    break
                if time.monotonic() > end or (code is not None and not pump(0)):
                    result = {"ok": False, "failed": i, "why": "no match for " + step["expect"]}
                    break
                pump(0.05)
        elif "exit" in step:
            end = time.monotonic() + step["exit"]
            while code is None and time.monotonic() < end:
                pump(0.05)
            if code is None:
                result = {"ok": False, "failed": i, "why": "still running"}
        if not result["ok"]:
            break
    if code is None:
        os.kill(pid, signal.SIGKILL)
        while code is None:
            pump(0.05)
    while pump(0):
        pass
    result["output"] = clean()
    result["code"] = code
    print(json.dumps(result))


if __name__ == "__main__":
    main()
