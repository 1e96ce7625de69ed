"""A real `monailabel start_server` process with the De-LightSAM app on a free loopback port, for the tests,
the benchmarks and the load test: started, waited on until `/info/` answers, stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "delightsam"


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp: Path, studies: Path, conf: list[str], timeout: float = 240, env: dict | None = None,
                   app: Path = APP_DIR):
    """Yields (url, process); ``conf``: extra command-line arguments (``--conf KEY VALUE`` pairs); ``app``: another
    tree's app (a benchmark's "before"). The log is ``tmp/server.log``; ServerFailed (with the log's end) if the
    server exits or does not answer in time."""
    port = free_port()
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "MONAI_LABEL_SESSION_PATH": str(tmp / "sessions"), **(env or {})}
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bindir / "monailabel"), "start_server", "--app", str(app), "--studies",
                                 str(studies), "--conf", "models", "delightsam", *conf,
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/info/", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise ServerFailed(f"the server did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the server: the python process under monailabel's launcher script, or
    the launcher itself, whichever is larger."""
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    peaks = []
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)
