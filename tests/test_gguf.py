"""GGUF input: tiny files written with the `gguf` package's writer, every supported type, read,
sliced and loaded, against transformers' own GGUF loader; bad files refused with a clear error."""

import struct
import time

import numpy as np
import pytest
import torch

from conftest import last_json, run_cli
from tp_runtime import sharding
from tp_runtime.checkpoint.codecs import dequantize
from tp_runtime.checkpoint.mapped import MappedCheckpoint
from tp_runtime.checkpoint.model_files import open_model
from tp_runtime.checkpoint.synthetic import llama_config_dict
from tp_runtime.checkpoint.synthetic_gguf import write_gguf
from tp_runtime.config import ParallelConfig, RuntimeConfig
from tp_runtime.engine.llm import LLM
from tp_runtime.engine.sampling import SamplingParams
from tp_runtime.errors import CheckpointError
from tp_runtime.model.step import StepInfo
from tp_runtime.kernels import cpu_quant

pytest.importorskip("gguf")
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PROMPT = [1, 5, 9, 200, 17, 33, 250, 4]


def _cfg(arch: str) -> dict:
    # K-quant blocks are 256 values: hidden, q heads x head size and the MLP are multiples of it
    return llama_config_dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=300, architecture=ARCHS[arch])


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _file(gguf_dir, arch: str, qtype: str):
    path = gguf_dir / f"{arch}-{qtype}.gguf"
    if not path.is_file():
        write_gguf(path, _cfg(arch), qtype, seed=3)
    return path


def _load(path, **kw):
    return LLM.load(path, ParallelConfig(), RuntimeConfig(show_progress=False, max_seq_len=64, **kw))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_greedy_tokens_match_transformers_gguf_loader(gguf_dir, arch, qtype):
    """--gguf-weights dequantize: weights decoded at load (the gguf package's codecs, as
    transformers'), q/k rows put back from llama.cpp's order: float32 logits equal to
    transformers' to 1e-4 (the same float32 weights; only the summation order of the ops
    differs), greedy tokens identical."""
    hf = _transformers_model(gguf_dir, arch, qtype)
    path = _file(gguf_dir, arch, qtype)
    llm = _load(path, gguf_weights="dequantize")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    got = llm.prompt_logits([PROMPT])[0]
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    ours = [e.token_id for e in llm.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))]
    theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, len(PROMPT) :].tolist()
    assert ours == theirs
    llm.close()


def _transformers_model(gguf_dir, arch, qtype):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path = _file(gguf_dir, arch, qtype)
    return transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=path.name, dtype=torch.float32)


NATIVE_GAP = 2e-2  # of max |logit|: the int8 activations' rounding (kernels/cpu_quant.py)
BF16_PREFILL_ATOL = 0.25  # the bfloat16 prefill's logits (these are O(1)), as test_parity's bfloat16 bound


@pytest.mark.parametrize("decode_step", ["fused", "eager"])
@pytest.mark.parametrize("qtype", [t for t in TYPES if t[0] == "Q"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_native_blocks_follow_transformers(gguf_dir, arch, qtype, decode_step, monkeypatch):
    """--gguf-weights native (the default on CPU): the linears keep the file's blocks, and a
    float32 prefill (blocks decoded into the GEMM, bit-exact) gives transformers' logits to 1e-4;
    the bfloat16 prefill (blocks decoded to bfloat16, activations rounded to it: the default on
    AVX512-BF16) within BF16_PREFILL_ATOL; decode multiplies the blocks against
    int8-rounded activations, so each greedy token is scored by transformers (teacher-forced on
    our output) within NATIVE_GAP x max |logit| of its best."""
    from tp_runtime.model import blocks
    from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear

    hf = _transformers_model(gguf_dir, arch, qtype)
    llm = _load(_file(gguf_dir, arch, qtype), decode_step=decode_step)
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, (BlockColumnParallelLinear, BlockRowParallelLinear))]
    assert len(linears) == 4 * llm.cfg.num_layers and all(cpu_quant.base_type(p.storage) == qtype for m in linears for p in m.parts)
    assert (llm.engine.fused_decode is not None) == (decode_step == "fused")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    monkeypatch.setattr(blocks, "prefill_bf16", False)
    got = llm.prompt_logits([PROMPT])[0]
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    monkeypatch.setattr(blocks, "prefill_bf16", True)
    got = llm.prompt_logits([PROMPT])[0]
    assert (got - want).abs().max().item() <= BF16_PREFILL_ATOL
    monkeypatch.setattr(blocks, "prefill_bf16", None)  # the machine's choice for the generation below
    n = 24
    ours = [e.token_id for e in llm.generate([PROMPT], SamplingParams(max_new_tokens=n, ignore_eos=True))]
    with torch.no_grad():
        scored = hf(torch.tensor([PROMPT + ours])).logits[0, len(PROMPT) - 1 : -1]
    gap = scored.max(-1).values - scored[torch.arange(n), torch.tensor(ours)]
    assert gap.max().item() <= NATIVE_GAP * scored.abs().max().item(), gap.tolist()
    llm.close()


@pytest.mark.parametrize("decode_step", ["fused", "eager"])
@pytest.mark.parametrize("tied", [False, True])
def test_f16_weights_stay_float16_and_follow_transformers(gguf_dir, tied, decode_step):
    """An F16 file on CPU (the default native weights): the linears, the embedding and the LM
    head keep the file's float16 values (the bytes the planner counted: half of float32), and
    decode multiplies them in the GEMV kernel, each weight widened exactly, so logits equal
    transformers' (which decodes the file to float32) to 1e-4 at prefill and at every decode
    step, and the greedy tokens are the same."""
    from tp_runtime import placement
    from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear

    path = gguf_dir / f"llama-F16-tied{int(tied)}.gguf"
    if not path.is_file():
        write_gguf(path, {**_cfg("llama"), "tie_word_embeddings": tied}, "F16", seed=4)
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=path.name, dtype=torch.float32)
    llm = _load(path, decode_step=decode_step)
    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, (BlockColumnParallelLinear, BlockRowParallelLinear))]
    assert len(linears) == 4 * llm.cfg.num_layers and {m.data(p).dtype for m in linears for p in m.parts} == {torch.float16}
    head = model.lm_head._source
    assert model.embed_tokens.table.dtype == torch.float16 and head.table.dtype == torch.float16
    assert (llm.engine.fused_decode is not None) == (decode_step == "fused")
    files = open_model(path)
    planned = placement.shard_bytes(files.cfg, 1, 0, "float32", 64, 1, blocks=placement.stored_blocks(files.index))
    held = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
    assert held == sum(r.nbytes for n, r in files.index.tensors.items() if ".layers." in n and r.storage.name == "F16")
    assert sum(planned.layers) == sum(r.nbytes for n, r in files.index.tensors.items() if ".layers." in n)
    n = 16
    ours = [e.token_id for e in llm.generate([PROMPT], SamplingParams(max_new_tokens=n, ignore_eos=True))]
    theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=n, do_sample=False, min_new_tokens=n)[0, len(PROMPT) :].tolist()
    assert ours == theirs
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT + ours])).logits[0]
    scale = max(1.0, want.abs().max().item())
    eng = llm.engine
    got = eng.prompt_logits([PROMPT])[0]
    assert (got - want[: len(PROMPT)]).abs().max().item() <= 1e-4 * scale
    # decode rows, one token each (the float16 GEMVs), against transformers' rows of the same tokens
    for i, tok in enumerate(ours[:-1]):
        pos = len(PROMPT) + i
        if decode_step == "fused":
            row = eng.fused_decode([tok], [pos])[0]
        else:
            step = StepInfo(torch.tensor([[pos]]), prefill=False, cache_lens=torch.tensor([pos + 1]), max_len=pos + 1)
            row = eng.model(torch.tensor([[tok]]), step, eng.cache).float().reshape(-1, want.shape[-1])[-1]
        assert (row - want[pos]).abs().max().item() <= 1e-4 * scale, i
    llm.close()


@pytest.mark.parametrize("qtype", sorted(cpu_quant.PACKED))
def test_packed_rows_give_what_the_files_layout_gives(gguf_dir, qtype, monkeypatch):
    """Q4_0 / Q4_1 / Q8_0 linears held with 8 rows interleaved (the AVX2 machine's default) or
    as the file lays them out: prefill identical (the same decoded values), and decode (the
    same integer dot products, summed in another float32 order) the same greedy tokens, in both
    decode steps."""
    from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear

    path = _file(gguf_dir, "llama", qtype)
    runs = {}
    for packed in (True, False):
        monkeypatch.setattr(cpu_quant, "pack_at_load", packed)
        for step in ("fused", "eager"):
            llm = _load(path, decode_step=step)
            parts = [p for m in llm.engine.model.modules() if isinstance(m, (BlockColumnParallelLinear, BlockRowParallelLinear)) for p in m.parts]
            assert {p.storage for p in parts} == {cpu_quant.PACKED[qtype] if packed else qtype}
            tokens = [e.token_id for e in llm.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))]
            runs[packed, step] = (llm.prompt_logits([PROMPT])[0], tokens)
            llm.close()
    base_logits, base_tokens = runs[False, "eager"]
    for key, (logits, tokens) in runs.items():
        assert torch.equal(logits, base_logits), key
        assert tokens == base_tokens, key


def test_native_weights_hold_the_files_bytes(gguf_dir):
    """A rank keeps its slice of each linear as the file's blocks: its layer weights take what
    the planner counted from the stored types (Q4_K: 4.5 bits a value), not float32."""
    from tp_runtime.model.blocks import BlockColumnParallelLinear, BlockRowParallelLinear

    path = _file(gguf_dir, "llama", "Q4_K")
    llm = _load(path)
    layer_bytes = sum(b.numel() * b.element_size() for m in llm.engine.model.modules() if isinstance(m, (BlockColumnParallelLinear, BlockRowParallelLinear)) for b in m.buffers())
    files = open_model(path)
    stored = sum(r.nbytes for n, r in files.index.tensors.items() if ".layers." in n and r.storage.quantized)
    assert layer_bytes == stored
    from tp_runtime import placement

    planned = placement.shard_bytes(files.cfg, 1, 0, "float32", 64, 1, blocks=placement.stored_blocks(files.index))
    norms = sum(r.nbytes for n, r in files.index.tensors.items() if ".layers." in n and not r.storage.quantized)
    assert sum(planned.layers) == stored + norms
    llm.close()
    with pytest.raises(Exception, match="--gguf-weights native keeps the file's blocks"):
        _load(path, gguf_weights="native", quantize="int8")


@pytest.mark.parametrize("tied", [False, True])
def test_vocab_rows_stay_blocks(gguf_dir, tied):
    """The embedding table and the LM head (its own output.weight, or the tied embedding's
    table) keep the file's Q4_1 blocks: the bytes the planner counted (vocab padding included)
    and no more; a looked-up row is its decoded row exactly; prefill logits (several rows: tiles
    decoded into a GEMM) equal the decoded table's to 1e-5; a decode row's (the native GEMV
    against int8-rounded activations) within NATIVE_GAP x max |logit|."""
    from tp_runtime import placement
    from tp_runtime.model.blocks import BlockParallelLMHead, BlockVocabParallelEmbedding

    path = gguf_dir / f"llama-Q4_1-tied{int(tied)}.gguf"
    if not path.is_file():
        write_gguf(path, {**_cfg("llama"), "tie_word_embeddings": tied}, "Q4_1", seed=5)
    files = open_model(path)
    assert files.cfg.tie_word_embeddings == tied
    llm = _load(path)
    model = llm.engine.model
    embed, head = model.embed_tokens, model.lm_head
    assert type(embed) is BlockVocabParallelEmbedding and type(head) is BlockParallelLMHead
    assert embed.storage == "Q4_1" and embed.table.dtype == torch.uint8
    assert hasattr(head, "table") != tied and (tied or head.storage == "Q4_1")
    planned = placement.shard_bytes(files.cfg, 1, 0, "float32", 64, 1, blocks=placement.stored_blocks(files.index))
    held = lambda m: sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))  # noqa: E731
    assert held(embed) == planned.embedding and held(head) == planned.lm_head
    assert planned.lm_head == (0 if tied else planned.embedding)
    mapped = MappedCheckpoint(files.index)
    try:
        table = mapped.values("model.embed_tokens.weight").clone()
        weight = table if tied else mapped.values("lm_head.weight").clone()
    finally:
        mapped.close()
    ids = torch.tensor([[0, 7, 299, 7, 150]])
    assert torch.equal(embed(ids)[0], table[ids[0]])
    h = torch.randn(3, files.cfg.hidden_size)
    want = h @ weight.T
    assert (head.local_logits(h)[:, : files.cfg.vocab_size] - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    one = head.local_logits(h[:1])[0, : files.cfg.vocab_size]
    assert (one - want[0]).abs().max().item() <= NATIVE_GAP * want[0].abs().max().item()
    llm.close()


@pytest.mark.parametrize(("arch", "qtype", "tp", "weights"), [
    ("llama", "Q4_K", 2, "native"), ("llama", "Q4_1", 3, "native"), ("qwen2", "Q6_K", 4, "native"), ("qwen2", "Q6_K", 4, "dequantize"),
])
def test_tp_gives_the_tokens_of_tp1(gguf_dir, arch, qtype, tp, weights):
    """Native blocks: where every rank's column range falls on blocks, the int8-rounded
    activation blocks are tp=1's and the tokens are tp=1's. tp=4 splits 4 heads of 64 values
    inside Q6_K's 256-value blocks: those o_proj slices are decoded around their range and held
    as float32 (exact activations there), so the tokens are checked against transformers'
    scores instead (teacher-forced, NATIVE_GAP); dequantized, tp=4 gives tp=1's tokens."""
    path = _file(gguf_dir, arch, qtype)
    common = ["generate", "--model", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "16", "--ignore-eos", "--json", "--quiet", "--max-seq-len", "64", "--gguf-weights", weights]
    one = last_json(run_cli(common).stdout)
    many = run_cli([*common, "--tp", str(tp)])
    assert many.returncode == 0, many.stderr[-2000:]
    ours = last_json(many.stdout)["output_ids"]
    cfg, block = open_model(path).cfg, (256 if "_K" in qtype else 32)
    row_parallel = [sharding.spec(role, "weight", cfg, tp, r) for r in range(tp) for role in ("o_proj", "down_proj")]
    on_blocks = weights == "dequantize" or all(s.start % block == 0 and s.stop % block == 0 for s in row_parallel)
    if on_blocks:
        assert ours == one["output_ids"]
    else:
        hf = _transformers_model(gguf_dir, arch, qtype)
        with torch.no_grad():
            scored = hf(torch.tensor([PROMPT + ours])).logits[0, len(PROMPT) - 1 : -1]
        gap = scored.max(-1).values - scored[torch.arange(len(ours)), torch.tensor(ours)]
        assert gap.max().item() <= NATIVE_GAP * scored.abs().max().item(), gap.tolist()


@pytest.mark.parametrize("qtype", TYPES)
def test_every_slice_decodes_to_the_matching_slice_of_the_whole(gguf_dir, qtype):
    """Row ranges (column-parallel) and column ranges (row-parallel, on blocks or inside them)
    of every type, at tp 1..4, equal that part of the whole tensor decoded."""
    files = open_model(_file(gguf_dir, "llama", qtype))
    mapped = MappedCheckpoint(files.index)
    try:
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"):
            whole = mapped.values(name).clone()
            for tp in range(1, 5):
                for r in range(tp):
                    e = next(e for e in _entries(files.cfg) if e.hf_name == name)
                    spec = sharding.spec(e.role, e.kind, files.cfg, tp, r)
                    part = mapped.values(name, spec)
                    want = whole.narrow(spec.dim, spec.start, spec.stop - spec.start)
                    assert torch.equal(part, want), (name, tp, r)
    finally:
        mapped.close()


def _entries(cfg):
    from tp_runtime.checkpoint.names import expected_tensors

    return expected_tensors(cfg)


def test_quantized_bytes_are_decoded_by_the_gguf_reference_codecs(gguf_dir):
    """The bytes of a Q4_K tensor as records locate them, decoded, are what the gguf package's
    own reader gives for that tensor (offsets and shapes read right)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as reference

    path = _file(gguf_dir, "llama", "Q4_K")
    files = open_model(path)
    mapped = MappedCheckpoint(files.index)
    try:
        reader = GGUFReader(path)
        t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
        rec = files.index.tensors["model.layers.1.mlp.down_proj.weight"]
        assert rec.shape == tuple(reversed(t.shape.tolist())) and rec.nbytes == t.n_bytes
        assert np.array_equal(dequantize(mapped.view(rec.name), rec.storage).numpy(), reference(t.data, t.tensor_type))
    finally:
        mapped.close()


def test_gguf_tokenizer_encodes_like_the_tokenizer_it_was_written_from(gguf_dir, tmp_path):
    from tp_runtime.checkpoint.synthetic import train_byte_tokenizer
    from tokenizers import Tokenizer

    train_byte_tokenizer(300, tmp_path / "tokenizer.json")
    want = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    got = open_model(_file(gguf_dir, "llama", "Q8_0")).tokenizer
    for text in ["The quick brown fox", "tensor parallelism, 42 ranks!", "  spaces\tand\nnewlines", "</s> is special"]:
        assert got.encode(text).ids == want.encode(text).ids, text
        assert got.decode(got.encode(text).ids) == want.decode(want.encode(text).ids)


# ---------------------------------------------------------------- bad files


def _corrupt(src, dst, edit):
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s info (its name length field) in the header."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.find(key)
    assert at > 0
    return at


@pytest.mark.parametrize("case", ["magic", "version", "truncated", "type", "misaligned", "overlap", "block"])
def test_bad_files_are_refused_naming_the_problem(gguf_dir, tmp_path, case):
    src = _file(gguf_dir, "llama", "Q8_0")
    name = "blk.0.ffn_down.weight"

    def info(data):
        at = _tensor_info_offset(data, name) + 8 + len(name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        return at + 4 + 8 * n_dims  # the type id, then the u64 data offset

    edits = {
        "magic": (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), "not a readable GGUF"),
        "version": (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 7)), "unsupported version"),
        "truncated": (lambda d: d.__delitem__(slice(len(d) - 5000, len(d))), "truncated"),
        "type": (lambda d: struct.pack_into("<I", d, info(d), 10), "has type Q2_K"),
        "misaligned": (lambda d: struct.pack_into("<Q", d, info(d) + 4, struct.unpack_from("<Q", d, info(d) + 4)[0] + 1), "alignment"),
        "overlap": (lambda d: struct.pack_into("<Q", d, info(d) + 4, 0), "overlap"),
        "block": (lambda d: struct.pack_into("<Q", d, _tensor_info_offset(d, name) + 8 + len(name) + 4, 500), "multiple of its Q8_0 block of 32"),
    }
    edit, message = edits[case]
    bad = _corrupt(src, tmp_path / "bad.gguf", edit)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as err:
        open_model(bad)
    assert time.perf_counter() - t0 < 1.0
    assert "bad.gguf" in str(err.value)
    if case in ("type", "misaligned", "block"):
        assert name in str(err.value)


def test_missing_and_unknown_tensors_and_metadata_are_named(gguf_dir, tmp_path):
    from gguf import GGUFWriter

    def rewrite(dst, drop_tensor=None, drop_key=None, extra_tensor=None):
        from gguf import GGUFReader

        reader = GGUFReader(_file(gguf_dir, "llama", "F32"))
        w = GGUFWriter(str(dst), "llama")
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key == drop_key:
                continue
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
        for t in reader.tensors:
            if t.name != drop_tensor:
                w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        if extra_tensor:
            w.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return dst

    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        llm = _load(rewrite(tmp_path / "a.gguf", drop_tensor="blk.1.ffn_up.weight"))
    with pytest.raises(CheckpointError, match="llama.block_count"):
        open_model(rewrite(tmp_path / "b.gguf", drop_key="llama.block_count"))
    with pytest.raises(CheckpointError, match="blk.0.mystery.weight"):
        open_model(rewrite(tmp_path / "c.gguf", extra_tensor="blk.0.mystery.weight"))


def test_block_prefill_is_chosen_per_model(gguf_dir):
    """--block-prefill: float32 multiplies the decoded blocks exactly (transformers' logits to
    1e-4 whatever the machine's default), bfloat16 rounds them and the activations (within
    BF16_PREFILL_ATOL, and not equal); a bad value is refused before loading."""
    hf = _transformers_model(gguf_dir, "llama", "Q4_0")
    with torch.no_grad():
        want = hf(torch.tensor([PROMPT])).logits[0]
    got = {}
    for choice in ("float32", "bfloat16"):
        llm = _load(_file(gguf_dir, "llama", "Q4_0"), block_prefill=choice)
        got[choice] = llm.prompt_logits([PROMPT])[0]
        llm.close()
    assert (got["float32"] - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())
    assert 0 < (got["bfloat16"] - want).abs().max().item() <= BF16_PREFILL_ATOL
    with pytest.raises(Exception, match="block prefill 'half'"):
        RuntimeConfig(block_prefill="half")
