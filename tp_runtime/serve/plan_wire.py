"""Rank 0's step changes on the wire: one small broadcast per engine step, timed like any
collective (site `schedule`), so the control plane's cost shows in the comm stats.

A message is JSON in a frame of FRAME_BYTES (uint8): its length (int64), then as much of the JSON
as fits; only a longer message (several new prompts at once) takes a second broadcast, of the
rest, whose size every rank reads from the frame. A step's message is a few hundred bytes, so a
step costs one broadcast (a length-first second one was another round trip with the waiting
follower every step).
Every broadcast is under the site. It carries the diff (serve: engine/scheduler.py StepChanges): new
sequences with their prompts and sampling parameters, aborted ids, and the step's plan as ids.
Generated tokens never travel: every rank samples them itself from the same logits, so the
bytes grow with the requests that change, not with the tokens generated so far.

Besides a step, rank 0 sends "idle" while it has nothing to run (about once a second: a
follower waiting longer than the collective timeout would take rank 0 for dead) and "stop" when
the server shuts down. A step carries rank 0's `digest` of its sequences after the changes;
each follower compares its own, so ranks that drift apart stop at once instead of serving
different tokens.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import numpy as np
import torch

from tp_runtime.communicator import Communicator
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.engine.scheduler import Admission, StepChanges
from tp_runtime.errors import LaunchError

SITE = "schedule"
STEP, IDLE, STOP = "step", "idle", "stop"
FRAME_BYTES = 4096  # fits any shared-memory slot (comm/shm.py: at least 4096), so the frame never goes through gloo
_HEAD = 8  # the int64 length in front


def digest(engine) -> int:
    """What every rank must agree on before a step: its sequences, their slots and token counts
    (the tokens each rank sampled itself). A follower that differs stops the job, naming itself."""
    state = sorted((s.seq_id, s.slot, s.num_tokens, s.cached) for s in engine.running.values())
    return zlib.crc32(repr(state).encode())


def encode(op: str, changes: StepChanges | None = None, check: int | None = None) -> bytes:
    msg: dict[str, Any] = {"op": op}
    if check is not None:
        msg["check"] = check
    if changes is not None:
        msg["admit"] = [[a.req_id, a.slot, a.reused, a.prompt, _params(a.params), a.seed] for a in changes.admitted]
        msg["abort"] = changes.aborted
        msg["prefill"] = changes.prefill
        msg["decode"] = changes.decode
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(payload: bytes) -> tuple[str, StepChanges | None, int | None]:
    try:
        msg = json.loads(payload)
        op = msg["op"]
        if op != STEP:
            return op, None, None
        admitted = [Admission(int(i), int(slot), int(reused), [int(t) for t in prompt], SamplingParams(**{**p, "stop_token_ids": tuple(p["stop_token_ids"])}), int(seed))
                    for i, slot, reused, prompt, p, seed in msg["admit"]]
        changes = StepChanges(admitted, [int(i) for i in msg["abort"]], [(int(i), int(s)) for i, s in msg["prefill"]], [int(i) for i in msg["decode"]])
        return op, changes, msg.get("check")
    except (ValueError, KeyError, TypeError) as e:
        raise LaunchError(f"a step plan from rank 0 could not be read ({type(e).__name__}: {e}); the ranks run different versions?") from None


def _params(p: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["stop_token_ids"] = list(p.stop_token_ids)
    return d


def send(comm: Communicator, op: str, changes: StepChanges | None = None, check: int | None = None) -> int:
    """Rank 0: broadcast a message; returns its bytes."""
    payload = encode(op, changes, check)
    if comm.world_size > 1:
        frame = torch.zeros(FRAME_BYTES, dtype=torch.uint8)
        buf = frame.numpy()
        buf[:_HEAD].view(np.int64)[0] = len(payload)
        head = min(len(payload), FRAME_BYTES - _HEAD)
        buf[_HEAD : _HEAD + head] = np.frombuffer(payload, dtype=np.uint8, count=head)
        comm.broadcast(frame, src=0, site=SITE)
        if len(payload) > head:
            comm.broadcast(torch.frombuffer(bytearray(payload[head:]), dtype=torch.uint8), src=0, site=SITE)
    return len(payload)


def receive(comm: Communicator) -> tuple[str, StepChanges | None, int | None]:
    """A rank other than 0: the next message (op, changes, rank 0's digest after them)."""
    buf = comm.broadcast(torch.empty(FRAME_BYTES, dtype=torch.uint8), src=0, site=SITE).numpy()
    n = int(buf[:_HEAD].view(np.int64)[0])
    head = min(n, FRAME_BYTES - _HEAD)
    payload = buf[_HEAD : _HEAD + head].tobytes()
    if n > head:
        payload += comm.broadcast(torch.empty(n - head, dtype=torch.uint8), src=0, site=SITE).numpy().tobytes()
    return decode(payload)
