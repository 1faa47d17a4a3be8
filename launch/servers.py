"""HTTP servers this package starts and stops: our own `tp-run serve` behind `tp-run chat`, and
the servers `tp-bench serve` measures (ours, transformers serve, llama.cpp's llama-server)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from urllib.parse import urlparse

from tp_runtime.errors import LaunchError

STOP_TIMEOUT_S = 30.0


class ServerProcess:
    """A server started as its own process group (a terminal's Ctrl-C does not reach it: the
    caller decides when it stops), reachable at `url`."""

    def __init__(self, cmd: list[str], url: str, what: str, env: dict[str, str] | None = None) -> None:
        self.url, self.what = url, what
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True)

    def wait_healthy(self, timeout: float = 900) -> None:
        """Return once GET url/health answers 200; LaunchError (and the server stopped) if it
        exits first or time runs out."""
        try:
            wait_healthy(self.url, self.proc, self.what, timeout)
        except LaunchError:
            self.stop()
            raise

    def stop(self) -> int:
        """SIGTERM (a server's graceful stop), then SIGKILL to its whole group after a while."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def wait_healthy(url: str, proc: subprocess.Popen | None, what: str, timeout: float = 900) -> None:
    u = urlparse(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what} exited with code {proc.returncode} before it was ready (its error is above)")
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise LaunchError(f"{what} was not ready after {timeout:.0f} s")
