"""Memory of the Space under many visitors: resident memory of a real `space/app.py` server over --sessions sessions.

Each session is a new visitor (its own session hash) who sends one message through the chat - the same queue call
the page makes, so the server keeps that visitor's state (one Trace per reply) as it does for a browser - and
waits for the whole reply. The server's resident memory (VmRSS) is read every --every sessions. The slope over the
second half is what one more session costs; the ceiling is the RSS at Gradio's session cap (10,000 sessions a
process keeps state for; each is dropped an hour after its last use), with every session at that slope and,
separately, the worst case: every session at its KEPT_TRACES replies.

  python bench/space_sessions.py --model runs/guppy            # 2,000 sessions, ~5 min on 2 idle cores
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import bench_parser, check, report, setup

ROOT = Path(__file__).resolve().parents[1]
SESSION_CAP = 10_000  # gradio's launch(state_session_capacity=...) default


def rss_mb(pid):
    kb = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS"))
    return kb / 1024


def start_space(model, port, log):
    env = dict(os.environ, GUPPYLM_MODEL=model, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # fmt: skip
    server = subprocess.Popen([sys.executable, str(ROOT / "space" / "app.py")], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return server, url
        except OSError:
            assert server.poll() is None, "space/app.py exited; see its log"
            time.sleep(0.5)
    raise TimeoutError("space/app.py did not answer within 120 s")


def reply_call(url):
    """The chat's `reply` event as the page calls it: (fn_index, default slider values)."""
    config = json.load(urllib.request.urlopen(f"{url}/config"))
    dependency = next(d for d in config["dependencies"] if d["api_name"] == "reply")
    values = {c["id"]: c["props"].get("value") for c in config["components"]}
    return dependency["id"], [values[i] for i in dependency["inputs"][2:]]


def one_session(url, fn_index, sliders, messages):
    """A new visitor sends `messages` one after the other, reading each streamed reply to its end."""
    session, history = secrets.token_hex(8), []
    for message in messages:
        history.append({"role": "user", "content": [{"type": "text", "text": message}]})  # as the page sends it
        body = json.dumps({"data": [history, None, *sliders], "fn_index": fn_index, "session_hash": session,
                           "event_data": None, "trigger_id": None}).encode()  # fmt: skip
        join = urllib.request.Request(f"{url}/gradio_api/queue/join", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(join, timeout=60).read()
        with urllib.request.urlopen(f"{url}/gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
            done = next(json.loads(line[5:]) for line in stream if line.startswith(b"data:") and b"process_completed" in line)
        assert done["success"], done
        history = done["output"]["data"][0]  # the chat as the page would show it: the reply and its notes


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = bench_parser(__doc__, repeats=1)
    parser.add_argument("--model", default="runs/guppy", help="model folder the Space loads (default runs/guppy)")
    parser.add_argument("--sessions", type=int, default=2000, help="visitors with one message each")
    parser.add_argument("--every", type=int, default=100, help="read the RSS every this many sessions")
    parser.add_argument("--busy", type=int, default=50, help="then visitors who each send KEPT_TRACES messages")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.every, args.busy = 40, 10, 2
    env = setup(args)
    sys.path.insert(0, str(ROOT / "space"))
    from app import DEMO, KEPT_TRACES

    examples = DEMO["examples"]
    with tempfile.TemporaryFile() as log:
        server, url = start_space(args.model, free_port(), log)
        try:
            fn_index, sliders = reply_call(url)
            rows, started = [dict(sessions=0, rss_mb=rss_mb(server.pid), seconds=0.0)], time.perf_counter()
            for n in range(1, args.sessions + 1):
                one_session(url, fn_index, sliders, [examples[n % len(examples)]])
                if n % args.every == 0:
                    rows.append(dict(sessions=n, rss_mb=rss_mb(server.pid), seconds=time.perf_counter() - started))
            before_busy = rss_mb(server.pid)
            for n in range(args.busy):
                one_session(url, fn_index, sliders, [examples[(n + i) % len(examples)] for i in range(KEPT_TRACES)])
            after_busy = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    half = rows[len(rows) // 2]
    per_session_kb = 1024 * (rows[-1]["rss_mb"] - half["rss_mb"]) / (rows[-1]["sessions"] - half["sessions"])
    per_busy_kb = 1024 * (after_busy - before_busy) / max(args.busy, 1)
    ceiling = rows[0]["rss_mb"] + per_session_kb * SESSION_CAP / 1024
    worst = rows[0]["rss_mb"] + per_busy_kb * SESSION_CAP / 1024
    method = (
        f"`space/app.py` with {args.model}, queue concurrency 4; {args.sessions} new sessions x 1 message (the chat's "
        f"own queue call, default settings), then {args.busy} sessions x {KEPT_TRACES} messages; VmRSS of the server "
        f"process. Per session: slope over the second half; ceiling: start + slope x {SESSION_CAP:,} (Gradio's cap)."
    )
    # before the Space kept Traces, each session held its last reply's attention tensors: ~390 KB (issue 20)
    checks = [check("a one-message session costs under 100 KB", f"{per_session_kb:.0f} KB", per_session_kb < 100)]
    report(
        args, "space_sessions", env, rows, [("sessions", "sessions", ","), ("rss_mb", "RSS MB", ".0f"), ("seconds", "s", ".0f")],
        method, checks, per_session_kb=round(per_session_kb, 2), per_busy_session_kb=round(per_busy_kb, 2),
        ceiling_mb=round(ceiling), worst_case_mb=round(worst), busy_rss_mb=[round(before_busy), round(after_busy)],
    )
    print(f"per session {per_session_kb:.1f} KB -> {ceiling:.0f} MB at {SESSION_CAP:,} sessions; "
          f"a session at {KEPT_TRACES} replies {per_busy_kb:.1f} KB -> {worst:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
