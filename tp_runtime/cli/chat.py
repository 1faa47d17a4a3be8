"""`tp-run chat`: an interactive terminal chat on the serving engine.

It starts `tp-run serve` (every launch mode: --tp N local ranks, --workers) on a free loopback
port with a one-time API key, and talks to it as any OpenAI client would: the conversation's
history through the model's chat template, each answer streamed as it is generated. Ctrl-C
during an answer stops it (the server aborts the request on every rank) and keeps what was
shown; Ctrl-D (or /quit) leaves, /clear forgets the history.
"""

from __future__ import annotations

import http.client
import json
import secrets
import sys
from typing import Any, Iterator

from tp_runtime.errors import LaunchError
from tp_runtime.launch.servers import ServerProcess
from tp_runtime.launch.spawn import free_port

_OWN_FLAGS = {"--system": 1}  # chat's flags that serve does not take, with their value counts
READY_TIMEOUT_S = 600


def serve_argv(argv: list[str], port: int, key: str) -> list[str]:
    """chat's command line as the serve one behind it."""
    out, skip = [], 0
    for a in argv[1:]:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _OWN_FLAGS:
            skip = 0 if "=" in a else _OWN_FLAGS[name]
            continue
        out.append(a)
    return ["serve", *out, "--host", "127.0.0.1", "--port", str(port), "--api-key", key, "--max-num-seqs", "1", "--quiet"]


class _Backend:
    def __init__(self, argv: list[str]) -> None:
        self.port, self.key = free_port(), secrets.token_hex(16)
        self.server = ServerProcess([sys.executable, "-m", "tp_runtime", *serve_argv(argv, self.port, self.key)], f"http://127.0.0.1:{self.port}", "the chat's server")
        self.server.wait_healthy(READY_TIMEOUT_S)

    def stream(self, body: dict[str, Any]) -> Iterator[str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise LaunchError(json.loads(resp.read() or b"{}").get("error", {}).get("message", f"HTTP {resp.status}"))
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise LaunchError(event["error"]["message"])
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text
        finally:
            conn.close()  # closed early (Ctrl-C): the server aborts the request

    def close(self) -> int:
        return self.server.stop()


def run_chat(args: Any) -> int:
    backend = _Backend(args.argv)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print("chat: Ctrl-C stops an answer, Ctrl-D quits, /clear forgets the conversation", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                text = input("> " if interactive else "")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl-D quits)", file=sys.stderr)
                continue
            if text.strip() in ("/quit", "/exit"):
                return 0
            if text.strip() == "/clear":
                history = history[:1] if args.system else []
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            body = {"messages": history, "max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                    "top_k": args.top_k, "seed": args.seed, "stream": True}
            answer = []
            try:
                for piece in backend.stream(body):
                    answer.append(piece)
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            except LaunchError as e:
                print(f"\nchat: error: {e}", file=sys.stderr)
                history.pop()
                continue
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        backend.close()
