"""A converted model (linear attention + Block AttnRes) trains under torch.distributed on the CPU (gloo, 2 ranks).

examples/train_distributed.py is launched by torchrun (`--standalone`: a free port is picked) with DDP and
with FSDP2; its per-step global-batch losses equal a single process's on the same global batch, the
AttnRes gradients are the same on both ranks, and a DCP checkpoint saved by 2 ranks loads into 1 process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
STEPS = 3
RTOL = 1e-5


def _example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchrun(out: Path, *args: str) -> dict:
    """Run the example on 2 ranks; rank-wise results, states and AttnRes gradients from its --dump folder."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           "--dump", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return _results(out, ranks=2) | {"stdout": proc.stdout}


def _results(out: Path, ranks: int) -> dict:
    return {
        "result": [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(ranks)],
        "state": [torch.load(out / f"state_rank{r}.pt") for r in range(ranks)],
        "grads": {r: {int(p.stem.split("step")[1]): torch.load(p) for p in out.glob(f"grads_rank{r}_step*.pt")}
                  for r in range(ranks)},
    }


def _in_process(out: Path, *args: str) -> dict:
    """The example in this process, world 1, not wrapped (the single-process reference, or a 1-rank load)."""
    out.mkdir(parents=True, exist_ok=True)
    torch._dynamo.reset()
    module = _example()
    module.train(0, 1, module.parse(["--dump", str(out), *args]))
    return _results(out, ranks=1)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(tmp):
    return _in_process(tmp / "single", "--steps", str(STEPS + 1))


@pytest.fixture(scope="module")
def ddp(tmp):
    return _torchrun(tmp / "ddp", "--steps", str(STEPS), "--save", str(tmp / "ddp_ckpt"))


@pytest.fixture(scope="module")
def fsdp(tmp):
    return _torchrun(tmp / "fsdp", "--fsdp", "--steps", str(STEPS), "--save", str(tmp / "fsdp_ckpt"))


def _check_run(run: dict, single: dict) -> None:
    ranks = run["result"]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["result"][0]["losses"][:STEPS]),
                               rtol=RTOL, atol=0)
    for r in ranks:  # each rank compiled one graph with the attention and the residual stream rewritten
        assert (r["graphs"], r["rewritten_attention"], r["rewritten_residual"]) == (1, 2, 4)
    assert "step   0  loss" in run["stdout"]


def _check_grads(run: dict, single: dict) -> None:
    """AttnRes gradients: identical on both ranks (synchronized), nonzero, equal to the single process's."""
    for step in range(STEPS):
        g0, g1, ref = run["grads"][0][step], run["grads"][1][step], single["grads"][0][step]
        assert set(g0) == set(ref) and len(g0) == 2 * 4  # query and key-norm weight of 4 aggregations
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
            torch.testing.assert_close(g0[name], ref[name], rtol=1e-4, atol=1e-6)
        assert any(g.abs().sum() > 0 for name, g in g0.items() if name.endswith("query"))


def test_ddp_losses_equal_single_process(ddp, single):
    _check_run(ddp, single)


def test_ddp_attnres_gradients_synchronized(ddp, single):
    _check_grads(ddp, single)
    for name, p in ddp["state"][0].items():  # and the parameters after the steps
        assert torch.equal(p, ddp["state"][1][name]), name


def test_fsdp2_losses_equal_single_process(fsdp, single):
    _check_run(fsdp, single)


def test_fsdp2_attnres_gradients_synchronized(fsdp, single):
    _check_grads(fsdp, single)


@pytest.mark.parametrize("saved_by", ["ddp", "fsdp"])
def test_checkpoint_saved_by_two_ranks_loads_into_one(saved_by, request, tmp, single):
    run = request.getfixturevalue(saved_by)
    loaded = _in_process(tmp / f"load_{saved_by}", "--load", str(tmp / f"{saved_by}_ckpt"), "--steps", "1")
    # the state dumped by the 1-process run is after its one step: compare the loaded parameters through
    # that step's loss (a function of the parameters before the step) and the 2-rank run's final state
    saved = run["state"][0]
    assert any(k.startswith("attncc_attnres.") for k in saved)
    assert set(loaded["state"][0]) == set(saved)
    torch.testing.assert_close(torch.tensor(loaded["result"][0]["losses"][0]),
                               torch.tensor(single["result"][0]["losses"][STEPS]), rtol=RTOL, atol=0)


def test_checkpoint_parameters_load_exactly(ddp, tmp):
    """The parameters a 1-process model holds after loading the 2-rank checkpoint are the saved ones, bit for bit."""
    module = _example()
    args = module.parse([])
    policy = module.attncc.load_policy(module.POLICY)
    model = module.build_model(args.layers)
    module.attncc.prepare(model, policy, (module.global_batch(0),), {"use_cache": False})
    with torch.no_grad():  # nothing of the fresh model may survive the load
        for p in model.parameters():
            p.add_(1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    assert module.load(model, optimizer, str(tmp / "ddp_ckpt")) == STEPS
    state = model.state_dict()
    for name, p in ddp["state"][0].items():
        assert torch.equal(state[name], p), name
    assert len(module.attncc.parameters(model)) == 8


@pytest.mark.xfail(strict=True, reason="FSDP2 fully_shard per decoder layer: torch 2.13 runs FSDP2's hooks under "
                   "torch._dynamo.disable ('skipping FSDP hooks'), so each unit is a graph break and the residual "
                   "stream is never whole in one graph; attncc then rewrites no residual site (the report marks "
                   "each one unsupported: 'the stream enters this graph as an input')")
def test_fsdp2_per_layer_rewrites_attnres(tmp):
    run = _torchrun(tmp / "fsdp_per_layer", "--fsdp", "--fsdp-per-layer", "--steps", "1")
    assert run["result"][0]["rewritten_residual"] == 4


def test_ddp_small_buckets_keep_one_graph(tmp):
    """DDP with several gradient buckets (8 layers, 1 MB buckets): dynamo's DDPOptimizer would split the graph
    at the buckets, which cuts the residual stream; the example turns it off for AttnRes, so the stream
    stays whole and is rewritten (without that, the split graphs fail: no AttnRes parameters in this graph)."""
    run = _torchrun(tmp / "ddp_buckets", "--layers", "8", "--bucket-cap-mb", "1", "--steps", "1")
    for r in run["result"]:
        assert (r["graphs"], r["rewritten_attention"], r["rewritten_residual"]) == (1, 8, 16)
    assert run["result"][0]["losses"] == run["result"][1]["losses"]
