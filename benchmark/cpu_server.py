"""Start and stop one real SGLang server on the CPU machine (`scripts/cpu/serve.sh`), for
benchmark/elastic_cpu_server.py and test/server/.

Lifecycle contract: `start()` returns once /health answers (the process group is the caller's until
`stop()`), raises with the log's tail if the server exits or is not ready in time; `stop()` sends
SIGTERM to the whole process group (launcher, scheduler, detokenizer) and SIGKILL after 60 s.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
import urllib.error
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]


def start(args: list[str], port: int, log: pathlib.Path, timeout_s: float = 300) -> subprocess.Popen:
    """scripts/cpu/serve.sh --port `port` `args...`, output to `log`; returns when /health answers."""
    cmd = ["bash", str(REPO / "scripts" / "cpu" / "serve.sh"), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); {log}:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            stop(proc)
            raise RuntimeError(f"server not ready in {timeout_s:.0f} s; {log}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
