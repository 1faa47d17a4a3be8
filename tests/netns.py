"""Separate "hosts" on this machine for the worker tests: one network namespace per worker, each
joined to the test's own namespace by a veth pair on its own /24 (host side .1, worker side .2),
with forwarding on so that workers reach each other through the host like machines behind one
switch. Nothing outside this machine is addressed. Where namespaces cannot be made (no root,
no `ip`), `rig()` returns None and the caller falls back to loopback, saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUBNET = "10.231.{}.{}"  # 10.231.<worker>.1 on the host side, .2 in the worker's namespace
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass
class Host:
    name: str  # the namespace
    link: str  # the host side of its veth pair: `ip link set LINK down` cuts it off
    addr: str  # its address, as the coordinator and the other workers reach it
    gateway: str  # the host's address on its link

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def set_link(self, up: bool) -> None:
        _ip("link", "set", self.link, "up" if up else "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command"
    probe = f"tp-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@contextmanager
def rig(n: int) -> Iterator[list[Host] | None]:
    """n worker hosts, removed afterwards (forwarding restored); None where not permitted."""
    if unavailable() is not None:
        yield None
        return
    tag = os.getpid() % 10000
    hosts = [Host(f"tp-w{i}-{tag}", f"tpv{i}h{tag}", SUBNET.format(i, 2), SUBNET.format(i, 1)) for i in range(1, n + 1)]
    forward = FORWARD.read_text().strip()
    try:
        FORWARD.write_text("1")
        for i, h in enumerate(hosts, 1):
            inner = f"tpv{i}n{tag}"
            _ip("netns", "add", h.name)
            _ip("link", "add", h.link, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", h.name)
            _ip("addr", "add", f"{h.gateway}/24", "dev", h.link)
            _ip("link", "set", h.link, "up")
            _ip("-n", h.name, "addr", "add", f"{h.addr}/24", "dev", inner)
            _ip("-n", h.name, "link", "set", inner, "up")
            _ip("-n", h.name, "link", "set", "lo", "up")
            _ip("-n", h.name, "route", "add", "default", "via", h.gateway)
        yield hosts
    finally:
        for h in hosts:  # deleting a namespace deletes its end of the pair, and with it the pair
            subprocess.run(["ip", "netns", "del", h.name], capture_output=True, timeout=10)
            subprocess.run(["ip", "link", "del", h.link], capture_output=True, timeout=10)
        FORWARD.write_text(forward)
