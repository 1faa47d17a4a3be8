"""The format-neutral tensor record (checkpoint/tensor.py): what a format's reader produces and
what mapping, slicing and validation work on."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tp_runtime import sharding
from tp_runtime.checkpoint.index import CheckpointIndex, open_index
from tp_runtime.checkpoint.mapped import MappedCheckpoint
from tp_runtime.checkpoint.tensor import TensorRecord, block_quantized
from tp_runtime.errors import CheckpointError


def test_safetensors_records_locate_every_tensor(tmp_path):
    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3, 4).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = open_index(tmp_path)
    rec = index.tensors["b"]
    assert (rec.shape, rec.storage.name, rec.storage.torch_dtype, rec.storage.is_float) == ((3, 4), "BF16", torch.bfloat16, True)
    assert rec.nbytes == 24 and rec.row_bytes == 8 and not rec.storage.quantized
    assert not index.tensors["c"].storage.is_float
    raw = (tmp_path / "model.safetensors").read_bytes()
    files = MappedCheckpoint(index)
    try:
        with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
            for name, t in tensors.items():
                r = index.tensors[name]
                assert raw[r.offset : r.offset + r.nbytes] == t.contiguous().view(torch.uint8).numpy().tobytes()
                assert torch.equal(files.view(name), f.get_tensor(name))
        cols = files.view("a", sharding.ShardSpec(sharding.Parallel.ROW, 1, 2, 5))
        assert torch.equal(cols, tensors["a"][:, 2:5])
    finally:
        files.close()


def _q8_file(tmp_path, rows=4, cols=96):
    """A raw file holding one 'Q8_0-like' tensor: blocks of 32 values in 34 bytes, 3 blocks a row."""
    q8 = block_quantized("Q8_0", 32, 34)
    data = torch.randint(0, 256, (rows, cols // 32 * 34), dtype=torch.uint8)
    path = tmp_path / "blocks.bin"
    pad = b"\0" * 64  # the tensor does not start at the beginning of the file
    path.write_bytes(pad + data.numpy().tobytes())
    rec = TensorRecord("w", path, len(pad), (rows, cols), q8)
    return CheckpointIndex(tmp_path, (path,), {"w": rec}), data, rec


def test_block_quantized_records_slice_rows_and_whole_blocks(tmp_path):
    index, data, rec = _q8_file(tmp_path)
    assert rec.nbytes == 4 * 102 and rec.row_bytes == 102 and rec.storage.quantized
    files = MappedCheckpoint(index)
    try:
        assert torch.equal(files.view("w"), data)
        assert torch.equal(files.view("w", sharding.ShardSpec(sharding.Parallel.COLUMN, 0, 1, 3)), data[1:3])
        # columns 32..96 are blocks 1 and 2: bytes 34..102 of every row
        assert torch.equal(files.view("w", sharding.ShardSpec(sharding.Parallel.ROW, 1, 32, 96)), data[:, 34:102])
        with pytest.raises(CheckpointError, match="do not fall on its Q8_0 blocks of 32"):
            files.view("w", sharding.ShardSpec(sharding.Parallel.ROW, 1, 16, 96))
    finally:
        files.close()
    with pytest.raises(ValueError, match="whole Q8_0 blocks"):
        rec.storage.nbytes(40)
