"""Transports behind the Communicator protocol. The only package that imports torch.distributed."""

from tp_runtime.comm.local import LocalCommunicator
from tp_runtime.comm.torch_dist import TorchDistCommunicator

__all__ = ["LocalCommunicator", "TorchDistCommunicator", "create"]


def create(parallel, device):
    """The communicator for this process: world 1 needs no transport at all."""
    if parallel.world_size == 1:
        return LocalCommunicator()
    return TorchDistCommunicator.init(parallel, device)
