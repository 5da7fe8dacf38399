"""Run a function in a forked child under a memory and a time limit, and get back what it returned or raised.

For tests that feed hostile input to code that must refuse it before allocating: if the code regresses, the child
hits its address-space limit (MemoryError) or is killed at the deadline, and the test fails - the machine and the
test process stay unharmed. Fork keeps it fast: the parent's imports (torch, transformers) are already done.
"""

import json
import os
import resource
import signal
import tempfile
import time
import traceback

MEMORY = 1 << 30  # bytes the child may map beyond what it has at the fork: a tiny model needs a few MB
SECONDS = 60  # generous: the machine running the tests may be shared and busy


def _address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def bounded(function, *args, memory=MEMORY, seconds=SECONDS):
    """`function(*args)` in a forked child limited to `memory` more bytes of address space and `seconds` of time.

    Returns {"ok": its JSON-able result} or {"error": type name, "message": str(error), "traceback": ...};
    {"error": "Timeout"} if it ran out of time (it is killed), {"error": "Crash", "status": ...} if it died."""
    report = tempfile.NamedTemporaryFile("r", suffix=".json")  # not a pipe: a long traceback would fill it and block
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it never returns into the test runner
        try:
            try:
                limit = _address_space() + memory
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
                outcome = {"ok": function(*args)}
            except BaseException as error:
                outcome = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
            with open(report.name, "w") as file:
                file.write(json.dumps(outcome, default=repr))
        finally:
            os._exit(0)
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            report.close()
            return {"error": "Timeout", "message": f"still running after {seconds} s"}
        time.sleep(0.02)
    with report:
        text = report.read()
    return json.loads(text) if text else {"error": "Crash", "message": f"the child died (wait status {status})"}
