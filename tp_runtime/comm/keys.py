"""CURVE keys of the worker network: keypairs, the files that say whom to trust, the ZAP gate.

Like SSH: every machine has a keypair (`tp-worker --keygen DIR`: DIR/tp-runtime.key_secret,
mode 600, and DIR/tp-runtime.key, public). A worker admits only coordinators whose public keys
are in its authorized-keys file (one key a line, re-read when it changes); a coordinator talks
only to workers whose keys it has pinned in its known-workers file (`HOST:PORT KEY` a line), the
way ssh pins known_hosts. The encryption, the handshake and the nonces inside a connection are
ZeroMQ's CURVE (libsodium); this module only decides which keys go where.

A keyed job extends the trust: the coordinator names every rank's public key in the job, and each
rank's data inbox admits exactly the other ranks' keys for that job (`Gate.admit`, ZAP domain
"data"); the control socket (domain "control") admits the authorized keys. Every CURVE server
socket refuses all clients when no ZAP handler answers (ZAP_ENFORCE_DOMAIN): a dead gate fails
closed, not open.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable

import zmq
from zmq.auth import create_certificates, load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from tp_runtime.errors import ConfigError

log = logging.getLogger("tp_runtime.keys")

KEY_NAME = "tp-runtime"  # DIR/tp-runtime.key (public) and DIR/tp-runtime.key_secret
AUTHORIZED_FILE = "authorized_keys"  # a worker's default, inside its --keys DIR
KNOWN_FILE = "known_workers"  # a coordinator's default, inside its --worker-keys DIR
CONTROL_DOMAIN = "control"
DATA_DOMAIN = "data"
Z85_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text


@dataclass(frozen=True)
class Keypair:
    public: bytes  # Z85 text, as zmq's socket options take it
    secret: bytes

    @property
    def public_text(self) -> str:
        return self.public.decode()


@dataclass(frozen=True)
class CurveServer:
    """A bound socket that encrypts with `keys` and admits the clients its gate admits for `domain`."""

    keys: Keypair
    domain: str


@dataclass(frozen=True)
class CurveClient:
    """A connecting socket that encrypts with `keys` and talks only to the holder of `server_key`."""

    keys: Keypair
    server_key: bytes


@dataclass(frozen=True)
class JobKeys:
    """A keyed job as one rank sees it: its own pair and every rank's public key, by rank."""

    own: Keypair
    ranks: tuple[bytes, ...]

    def others(self, rank: int) -> set[bytes]:
        return {k for r, k in enumerate(self.ranks) if r != rank}


def parse_key(text: str, where: str) -> bytes:
    """A Z85 public key as it appears in a file or a message; the error names where it was."""
    key = text.strip().strip("\"'")
    try:
        if len(key) != Z85_KEY_LEN or len(z85.decode(key.encode())) != 32:
            raise ValueError
    except (ValueError, KeyError, struct.error, UnicodeEncodeError):
        raise ConfigError(f"{where}: {text.strip()[:60]!r} is not a public key (40 characters of Z85, as `tp-worker --keygen` prints)") from None
    return key.encode()


def is_loopback(host: str) -> bool:
    """Whether an address (a --listen host or a --workers host) stays on this machine: there keys
    are optional, anywhere else they are required unless --insecure says otherwise."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, an interface, '*': it may face the network
        return False


# -- keypairs --


def keygen(directory: str | Path) -> Keypair:
    """A new keypair in `directory` (created 0700). An existing pair is never overwritten: every
    authorized-keys and known-workers entry of the old key would silently stop matching."""
    d = Path(directory).expanduser()
    secret_file, public_file = d / f"{KEY_NAME}.key_secret", d / f"{KEY_NAME}.key"
    if secret_file.exists() or public_file.exists():
        raise ConfigError(f"{d} already holds a keypair ({secret_file.name}); delete both files first to make a new one "
                          f"(then replace the old public key wherever it was listed)")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    # written inside a private temporary folder, so the secret is never readable by others, even briefly
    tmp = Path(tempfile.mkdtemp(dir=d, prefix=".keygen-"))
    try:
        pub, sec = create_certificates(tmp, KEY_NAME)
        os.chmod(sec, 0o600)
        os.chmod(pub, 0o644)
        os.replace(sec, secret_file)
        os.replace(pub, public_file)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return load_keypair(d)


def load_keypair(directory: str | Path) -> Keypair:
    d = Path(directory).expanduser()
    secret_file = d / f"{KEY_NAME}.key_secret"
    if not secret_file.is_file():
        raise ConfigError(f"no keypair in {d} (no {secret_file.name}): make one with `tp-worker --keygen {d}`")
    mode = stat.S_IMODE(secret_file.stat().st_mode)
    if mode & 0o077:  # as ssh refuses an unprotected private key
        raise ConfigError(f"{secret_file} is readable by other users (mode {mode:o}): `chmod 600 {secret_file}`; "
                          f"if others may have read it, make a new keypair")
    try:
        public, secret = load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{secret_file} is not a keypair written by `tp-worker --keygen`: {e}") from None
    if not secret:
        raise ConfigError(f"{secret_file} holds no secret key")
    public = parse_key(public.decode(errors="replace"), str(secret_file))
    try:
        derived = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError):
        raise ConfigError(f"{secret_file}: the secret key is not a Z85 key") from None
    if derived != public:
        raise ConfigError(f"{secret_file}: its public key does not belong to its secret key; the file was edited or corrupted")
    return Keypair(public, secret)


# -- whom to trust --


def _lines(path: Path, what: str, form: str) -> Iterable[tuple[int, list[str]]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"no {what} file {path}: make one, {form}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} file {path}: {e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):  # only whole-line comments: '#' is a Z85 digit
            yield n, line.split()


def read_authorized(path: str | Path) -> frozenset[bytes]:
    """Public keys, one a line (`KEY [comment]`; a line starting with `#` is a comment)."""
    p = Path(path).expanduser()
    return frozenset(parse_key(words[0], f"{p}:{n}") for n, words in _lines(p, "authorized-keys", "a coordinator's public key a line"))


class AuthorizedKeys:
    """A worker's authorized-keys file, re-read when it changes (adding a coordinator needs no
    restart, removing one takes effect at its next connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[int, int] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()
        self.current()  # a missing or malformed file is an error at start, not at the first client

    def current(self) -> frozenset[bytes]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                raise ConfigError(f"no authorized-keys file {self.path}: this worker would admit no coordinator; "
                                  f"put each coordinator's public key in it, one a line") from None
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._keys, self._stamp = read_authorized(self.path), stamp
            return self._keys


class KnownWorkers:
    """A coordinator's pins: `HOST:PORT KEY [comment]` a line, the address spelt as in --workers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.keys: dict[str, tuple[bytes, int]] = {}
        for n, words in _lines(self.path, "known-workers", "a `HOST:PORT KEY` line for each worker (its key: `tp-worker --keys DIR --show-key`)"):
            if len(words) < 2:
                raise ConfigError(f"{self.path}:{n}: expected `HOST:PORT KEY`, got {' '.join(words)!r}")
            addr, key = words[0], parse_key(words[1], f"{self.path}:{n}")
            if addr in self.keys and self.keys[addr][0] != key:
                raise ConfigError(f"{self.path}:{n}: {addr} is pinned twice with different keys (line {self.keys[addr][1]} too)")
            self.keys[addr] = (key, n)

    def key_for(self, addr: str) -> bytes:
        if addr not in self.keys:
            raise ConfigError(f"worker {addr} is not in {self.path}: add the line `{addr} KEY` with the public key that "
                              f"`tp-worker --keys DIR --show-key` prints on that machine (the address spelt as in --workers)")
        return self.keys[addr][0]

    def where(self, addr: str) -> str:
        return f"{self.path}:{self.keys[addr][1]}" if addr in self.keys else str(self.path)


# -- the ZAP gate of one context --


class Gate:
    """The ZAP handler of one zmq context (a thread, pyzmq's ThreadAuthenticator): which client
    keys each server domain admits. A refusal is logged with the key, as sshd logs one."""

    def __init__(self, ctx: zmq.Context) -> None:
        self._allowed: dict[str, Callable[[], Collection[bytes]]] = {}
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("tp_runtime.keys.zap"))
        self._auth.start()

    def admit(self, domain: str, keys: Collection[bytes] | Callable[[], Collection[bytes]]) -> None:
        """From now on `domain` admits `keys` (or what the callable returns at each handshake)."""
        self._allowed[domain] = keys if callable(keys) else (lambda fixed=frozenset(keys): fixed)
        self._auth.configure_curve_callback(domain, self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook; never raises (the ZAP thread must live)."""
        try:
            ok = key in self._allowed.get(domain, lambda: ())()
        except Exception as e:  # a file that went bad since the start: refuse, and say why
            log.warning("refused a CURVE client on %s: %s", domain, e)
            return False
        if not ok:
            log.warning("refused a CURVE client on %s: key %s is not admitted", domain, key.decode(errors="replace"))
        return ok

    def alive(self) -> bool:
        return self._auth.is_alive()

    def stop(self) -> None:
        self._auth.stop()


def apply(sock: zmq.Socket, curve: CurveServer | CurveClient) -> None:
    """Set a socket's CURVE options (before it binds or connects)."""
    sock.curve_publickey = curve.keys.public
    sock.curve_secretkey = curve.keys.secret
    if isinstance(curve, CurveServer):
        sock.curve_server = True
        sock.zap_domain = curve.domain.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler answering: refuse, never admit all
    else:
        sock.curve_serverkey = curve.server_key
