"""The kernel ops: torch.library registration (opcheck), autograd through the backward kernels, and the
kernel path end to end under torch.compile (interpreted on the CPU, native on the GPU)."""

from __future__ import annotations

import operator

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

import attncc
from attncc.codegen import emit
from attncc.codegen.variants.softmax import ops
from attncc.codegen.variants.softmax.reference import softmax_attention
from models import zoo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

OP_CASES = [
    pytest.param(dict(causal=False, pattern="dense"), False, id="dense"),
    pytest.param(dict(causal=True, pattern="dense"), True, id="causal-padded"),
    pytest.param(dict(causal=True, pattern="sliding_window", window=8, sinks=2), False, id="window"),
    pytest.param(dict(causal=True, pattern="power", block=4, window_blocks=1), True, id="power-padded"),
]


@pytest.mark.parametrize("constants,padded", OP_CASES)
def test_opcheck(constants, padded):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(1, 2, 20, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(1, 2, 20, 16, generator=g).to(DEVICE).requires_grad_()
    key_padding = None
    if padded:
        key_padding = torch.ones(1, 20, dtype=torch.bool, device=DEVICE)
        key_padding[0, -3:] = False
    args = (q, k, v, key_padding, 0.25, constants["causal"], constants["pattern"], constants.get("window", 0),
            constants.get("sinks", 0), constants.get("block", 128), constants.get("window_blocks", 0))
    torch.library.opcheck(torch.ops.attncc.flash_attention.default, args)


def test_flash_op_gradients_match_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    out = ops.flash(q, k, v, None, scale=0.25, causal=True)
    ref = softmax_attention(q, k, v, scale=0.25, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _llama16(padding: bool):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=zoo.VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    kwargs = {"use_cache": False}
    if padding:
        kwargs["attention_mask"] = zoo.padding_mask(2, 23).to(DEVICE)
    return LlamaModel(cfg).to(DEVICE), (zoo._ids(2, 23).to(DEVICE),), kwargs


@pytest.mark.parametrize("policy,kernel", [
    ("softmax", "flash_dense_causal_d16_g2_fp32"),
    ({"variant": "sparse", "window": 8, "sinks": 2}, "flash_sliding_window_causal_w8_s2_d16_g2_fp32"),
    ({"variant": "sparse", "pattern": "power", "block": 4, "window_blocks": 2}, "flash_power_causal_b4_wb2_d16_g2_fp32"),
])
@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
def test_llama_kernel_path_matches_reference_path(policy, kernel, padding):
    model, args, kwargs = _llama16(padding)
    torch._dynamo.reset()
    reference = attncc.backend({"attention": policy}, inner="aot_eager", kernels="reference")
    ref = torch.compile(model, backend=reference)(*args, **kwargs)[0]
    torch._dynamo.reset()
    kernels = attncc.backend({"attention": policy}, inner="aot_eager", kernels="triton")
    out = torch.compile(model, backend=kernels, fullgraph=True)(*args, **kwargs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    sites = kernels.report.attention()
    expected = kernel.replace("_fp32", "_padded_fp32") if padding else kernel
    assert [s.kernel for s in sites] == [expected] * 2, kernels.report
    assert all(s.kernel == "reference" for s in reference.report.attention())
    assert any(spec.name == expected for spec in emit.EMITTED)
    w = torch.randn_like(out)
    params = list(model.parameters())
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_unsupported_head_dim_falls_back_with_a_reason():
    model, args, kwargs, _ = zoo.llama("sdpa")  # head dim 8
    be = attncc.backend({"attention": "softmax"}, inner="aot_eager", kernels="triton")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    torch.testing.assert_close(out, model(*args, **kwargs)[0], rtol=1e-5, atol=1e-5)
    (site, _) = be.report.attention()
    assert site.kernel.startswith("reference (") and "head dim 8" in site.kernel


def test_kernel_sources_are_dumped(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_DUMP_KERNELS", str(tmp_path))
    emit.EMITTED.clear()
    q = torch.randn(1, 2, 16, 16, device=DEVICE)
    ops.flash(q, q, q, None, scale=0.25, causal=True, pattern="sliding_window", window=4, sinks=1)
    (path,) = tmp_path.glob("*.py")
    assert path.name == "flash_sliding_window_causal_w4_s1_d16_g1_fp32.py"
    text = path.read_text()
    assert "# w = 4" in text and "def flash_fwd_kernel" in text


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [
    {"variant": "sparse", "window": 256, "sinks": 4},
    {"variant": "sparse", "pattern": "power", "block": 128, "window_blocks": 2},
    {"variant": "softmax", "kernel": "attncc"},
], ids=["window", "power", "softmax"])
def test_gpu_llama_bf16_kernel_path_matches_reference(policy):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaModel(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    torch._dynamo.reset()
    ref = torch.compile(model, backend=attncc.backend({"attention": policy}, inner="aot_eager",
                                                      kernels="reference"))(ids, use_cache=False)[0]
    torch._dynamo.reset()
    be = attncc.backend({"attention": policy})  # Inductor, kernels auto -> the flash kernel on CUDA
    out = torch.compile(model, backend=be)(ids, use_cache=False)[0]
    assert all(s.kernel.startswith("flash_") for s in be.report.attention()), be.report
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < 2e-2, err


REFERENCE_OP_CASES = [
    pytest.param("linear_attention", lambda kp: (kp, None, True, "elu1", True, 1e-6), id="linear-causal"),
    pytest.param("linear_attention", lambda kp: (kp, torch.full((4,), 0.1), True, "relu", False, 1e-6), id="lightning"),
    pytest.param("linear_attention", lambda kp: (kp, None, False, "taylor2", True, 1e-6), id="linear-bidirectional"),
    pytest.param("sparse_attention", lambda kp: (kp, 0.25, "sliding_window", 4, 1, 128, 5, None, True), id="sparse-window"),
    pytest.param("sparse_attention", lambda kp: (kp, 0.25, "power", 0, 0, 2, 1, None, True), id="sparse-power"),
    pytest.param("softplus_attention", lambda kp: (kp, True, 3.0), id="lssar"),
    pytest.param("softplus_attention", lambda kp: (kp, False, 0.0), id="lssa-bidirectional"),
    pytest.param("mala_attention", lambda kp: (kp, True, None), id="mala-causal"),
    pytest.param("mala_attention", lambda kp: (kp, False, 0.5), id="mala-bidirectional"),
]


@pytest.mark.parametrize("name,rest", REFERENCE_OP_CASES)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
def test_reference_ops_opcheck(name, rest, padded):
    """Every variant's reference is a torch.library op (fake, autograd) that passes opcheck."""
    import attncc.codegen.variants  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
    key_padding = None
    if padded:
        key_padding = torch.ones(2, 9, dtype=torch.bool)
        key_padding[1, -2:] = False
    torch.library.opcheck(getattr(torch.ops.attncc, name).default, (q, k, v, *rest(key_padding)))


@pytest.mark.parametrize("name,rest", REFERENCE_OP_CASES)
def test_reference_op_gradients_are_the_references(name, rest):
    """The op's backward (its own op, differentiating the reference) gives the reference's gradients."""
    from attncc.codegen import variants

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 9, 8, generator=g, requires_grad=True) for h in (4, 2, 2))
    key_padding = torch.ones(2, 9, dtype=torch.bool)
    key_padding[0, :3] = False
    args = rest(key_padding)
    grad = torch.randn(2, 4, 9, 8, generator=g)
    got = torch.autograd.grad(getattr(torch.ops.attncc, name)(q, k, v, *args), (q, k, v), grad)
    module = {"linear_attention": variants.linear, "sparse_attention": variants.sparse,
              "softplus_attention": variants.softplus, "mala_attention": variants.mala}[name]
    want = torch.autograd.grad(module.ops.reference(q, k, v, *args), (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name,rest", REFERENCE_OP_CASES[::2])
def test_reference_op_backward_graph_does_not_grow_with_length(name, rest):
    """AOT's backward graph holds one opaque backward op call at any length, not the reference traced
    into it (whose chunked loops would make the first compile of a training step grow with N)."""
    from torch._functorch.aot_autograd import aot_function
    from functorch.compile import make_boxed_func

    import attncc.codegen.variants  # noqa: F401

    def backward_ops(length: int) -> list:
        graphs = {}

        def keep(kind):
            def compiler(gm, _):
                graphs[kind] = gm
                return make_boxed_func(gm.forward)
            return compiler

        op = getattr(torch.ops.attncc, name)
        q, k, v = (torch.randn(1, h, length, 8, requires_grad=True) for h in (4, 2, 2))
        f = aot_function(lambda q, k, v: op(q, k, v, *rest(None)), keep("forward"), keep("backward"))
        f(q, k, v).sum().backward()
        return [n.target for n in graphs["backward"].graph.nodes if n.op == "call_function"]

    short, long = backward_ops(16), backward_ops(640)
    assert len(short) == len(long)
    assert getattr(torch.ops.attncc, f"{name}_backward").default in short
    assert all(t is operator.getitem or "attncc" in str(t) for t in short), short


def _causal_masks(kind: str, t: int = 20) -> torch.Tensor:
    """[2, 1, t, t] bool: causal with left padding in batch 0, or packed documents (not causal+padding)."""
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if kind == "packed":
        doc = torch.arange(t) >= t // 2
        packed = ((doc[:, None] == doc[None, :]) & causal).expand(2, 1, t, t).clone()
        packed[1, :, :3] = False  # and rows with no allowed key
        return packed
    keys = torch.ones(2, t, dtype=torch.bool)
    keys[0, :5] = False
    return causal & keys[:, None, None, :]


@pytest.mark.parametrize("kind", ["causal", "packed"])
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_checked_op_opcheck_and_gradients(kind, additive):
    """attncc::flash_attention_checked: the kernel under a mask of the compiled structure, the dense
    reference under any other; outputs and gradients equal the reference either way."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 20, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(2, 2, 20, 16, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(2, 2, 20, 16, generator=g).to(DEVICE).requires_grad_()
    mask = _causal_masks(kind).to(DEVICE)
    if additive:
        mask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, torch.finfo(torch.float32).min)
    keys, holds = torch.ops.attncc.mask_check(mask, "causal", 0, 20)
    assert bool(holds) == (kind == "causal")
    torch.library.opcheck(torch.ops.attncc.mask_check.default, (mask, "causal", 0, 20))
    args = (q, k, v, mask, keys, holds, 0.25, "causal", 0, "test-site")
    torch.library.opcheck(torch.ops.attncc.flash_attention_checked.default, args)
    out, _, keys, ran_kernel = torch.ops.attncc.flash_attention_checked(*args)
    assert bool(ran_kernel) == (kind == "causal")
    assert emit.RAN["test-site"].startswith("flash_dense_causal" if kind == "causal" else "reference (the mask is not causal")
    ref = softmax_attention(q, k, v, scale=0.25, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_mask_keys_opcheck_and_refusal():
    from attncc.codegen.runtime_mask import MaskMismatch

    mask = _causal_masks("causal").to(DEVICE)
    torch.library.opcheck(torch.ops.attncc.mask_keys.default, (mask, "causal", 0, 20, "site"))
    keys = torch.ops.attncc.mask_keys(mask, "causal", 0, 20, "site")
    assert keys.tolist()[0] == [False] * 5 + [True] * 15 and all(keys[1].tolist())
    with pytest.raises(MaskMismatch, match="site layers.3: the mask is not causal with key padding"):
        torch.ops.attncc.mask_keys(_causal_masks("packed").to(DEVICE), "causal", 0, 20, "layers.3")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["softmax", {"variant": "sparse", "window": 256, "sinks": 4}], ids=["softmax", "window"])
def test_gpu_padded_calls_kernel_path_matches_reference(policy):
    """bf16 Llama through Inductor and the kernels, called with masks whose padding changes between
    calls (none, left, a fully padded row): each call matches the reference path at real tokens."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaModel(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 1024), device="cuda")
    be = attncc.backend({"attention": policy})
    compiled = torch.compile(model, backend=be)
    ref_be = attncc.backend({"attention": policy}, inner="aot_eager", kernels="reference")
    reference = torch.compile(model, backend=ref_be)
    for pad in ("none", "left", "empty_row"):
        mask = torch.ones(2, 1024, dtype=torch.long, device="cuda")
        if pad == "left":
            mask[0, :300] = 0
        elif pad == "empty_row":
            mask[1] = 0
        with torch.no_grad():
            out = compiled(ids, attention_mask=mask, use_cache=False)[0].float()
            ref = reference(ids, attention_mask=mask, use_cache=False)[0].float()
        real = mask.bool()
        assert not out[real].isnan().any(), pad
        err = ((out - ref)[real].abs().max() / ref[real].abs().max()).item()
        assert err < 2e-2, (pad, err)
        assert all(s.kernel.startswith("flash_") for s in be.report.attention()), be.report


def test_mask_check_sees_a_mask_changed_in_place():
    """Every call checks the mask it is given (no result is kept: a compiled graph may reuse a mask's
    memory for another mask without a version bump), so a mask changed in place is caught."""
    from attncc.codegen.runtime_mask import MaskMismatch

    mask = _causal_masks("causal").to(DEVICE)
    torch.ops.attncc.mask_keys(mask, "causal", 0, 20, "site")
    mask.copy_(_causal_masks("packed").to(DEVICE))
    with pytest.raises(MaskMismatch):
        torch.ops.attncc.mask_keys(mask, "causal", 0, 20, "site")


@pytest.mark.parametrize("policy", ["softmax", {"variant": "sparse", "window": 8, "sinks": 2},
                                    {"variant": "linear", "feature_map": "elu1"}], ids=["softmax", "window", "linear"])
def test_kernels_under_autocast_see_one_dtype(policy):
    """Under torch.autocast the model's rotary q and k are fp32 beside a low-precision v; SDPA casts them
    (autocast), so the site casts them for its kernel too, whose name then says the autocast dtype."""
    model, args, kwargs = _llama16(False)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter has no bf16 tl.dot
    torch._dynamo.reset()
    reference = attncc.backend({"attention": policy}, inner="aot_eager", kernels="reference")
    kernels = attncc.backend({"attention": policy}, inner="aot_eager", kernels="triton")
    with torch.autocast(DEVICE, dtype=dtype):
        ref = torch.compile(model, backend=reference)(*args, **kwargs)[0]
        torch._dynamo.reset()
        out = torch.compile(model, backend=kernels, fullgraph=True)(*args, **kwargs)[0]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    names = [s.kernel for s in kernels.report.attention()]
    assert len(names) == 2 and all(n.endswith(emit.dtype_name(dtype)) for n in names), names


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "cudnn", "flash"])
def test_gpu_dense_site_runs_the_kernel_measured_or_chosen(kernel):
    """A dense causal softmax site on CUDA runs the fastest kernel measured at trace time (auto) or the
    policy's: the report names it (with the times under auto), and a training step compiled on one batch
    and called with another matches the reference path, outputs and gradients."""
    from transformers import LlamaConfig, LlamaModel

    from attncc.codegen.variants.softmax import route

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaModel(cfg).to("cuda", torch.bfloat16)
    policy = {"attention": {"variant": "softmax", "kernel": kernel}}
    torch._dynamo.reset()
    be = attncc.backend(policy)
    compiled = torch.compile(model, backend=be)
    reference = torch.compile(model, backend=attncc.backend(policy, inner="aot_eager", kernels="reference"))
    for batch in (1, 2):
        ids = torch.randint(0, 1000, (batch, 1024), device="cuda")
        out = compiled(ids, use_cache=False)[0]
        ref = reference(ids, use_cache=False)[0]
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < 2e-2, (batch, err)
        w = torch.randn_like(out)
        params = [p for p in model.parameters() if p.dim() == 2][:4]
        grads = torch.autograd.grad((out.float() * w).sum(), params)
        ref_grads = torch.autograd.grad((ref.float() * w).sum(), params)
        for a, b in zip(grads, ref_grads):
            assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 5e-2
    names = [s.kernel for s in be.report.attention()]
    assert len(names) >= 2, be.report  # 2 sites per graph (the second batch size may compile another)
    if kernel == "auto":
        assert all("fastest measured fwd+bwd" in n and n.split(" ")[0] in ("sdpa_cudnn", "sdpa_flash")
                   or n.startswith("flash_dense_causal") for n in names), names
        assert route._CHOSEN, "the measurement is cached"
    else:
        assert all(n == f"sdpa_{kernel} (the policy's kernel)" for n in names), names


def test_dense_kernel_choice_on_the_cpu_and_its_errors():
    """The policy's `kernel` is a CUDA choice: on the CPU the site runs the reference; a forced SDPA
    backend that cannot run a site names the fix; fp32 sites are not measured (cuDNN and FA2 take fp16/bf16)."""
    from attncc.codegen.variants.softmax import route
    from attncc.errors import AttnccError

    model, args, kwargs, _ = zoo.llama("sdpa")
    be = attncc.backend({"attention": {"variant": "softmax", "kernel": "cudnn"}}, inner="aot_eager")
    out = torch.compile(model, backend=be)(*args, **kwargs)[0]
    torch.testing.assert_close(out, model(*args, **kwargs)[0], rtol=1e-5, atol=1e-5)
    assert {s.kernel for s in be.report.attention()} == {"reference"}
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(AttnccError, match="kernel 'cudnn'.*cannot run.*kernel: auto"):
        route.sdpa("cudnn", q, q, q, scale=0.25, causal=True)
    choice = route.choose("auto", q, q, q, scale=0.25, causal=True)
    assert choice.kernel == "attncc" and "fp16 and bf16" in choice.note


def test_dense_kernel_is_measured_once_per_shape_and_a_failed_measurement_keeps_attncc(monkeypatch):
    """`kernel: auto` measures once per (shape, strides, dtype, grad, causal) in a process; a measurement
    that raises leaves the site on attncc's kernel, with the error as the report's reason."""
    from attncc.codegen.variants.softmax import route

    calls = []

    def measure(q, k, v, sizes, *, grad, scale, causal):
        calls.append((tuple(sizes), grad))
        if len(calls) == 3:
            raise RuntimeError("out of memory\nmore")
        return route.Choice("cudnn", "fastest measured fwd: ...")

    monkeypatch.setattr(route, "_measure", measure)
    monkeypatch.setattr(route, "_CHOSEN", {})
    q = torch.randn(1, 4, 64, 16, dtype=torch.float16)
    k = torch.randn(1, 2, 64, 16, dtype=torch.float16)
    first = route.choose("auto", q, k, k, scale=0.25, causal=True)
    again = route.choose("auto", q.clone(), k.clone(), k.clone(), scale=0.25, causal=True)
    assert first == again == route.Choice("cudnn", "fastest measured fwd: ...") and len(calls) == 1
    trained = route.choose("auto", q.requires_grad_(), k, k, scale=0.25, causal=True)
    assert trained.kernel == "cudnn" and calls[-1][1] is True and len(calls) == 2
    failed = route.choose("auto", q.detach()[:, :, :32], k[:, :, :32], k[:, :, :32], scale=0.25, causal=True)
    assert failed == route.Choice("attncc", "not measured: RuntimeError: out of memory")
    assert route.choose("flash", q, k, k, scale=0.25, causal=True) == route.Choice("flash", "the policy's kernel")


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwd+bwd"])
def test_dense_kernel_measurement_runs_outside_the_trace(grad):
    """A site measures while AOT traces it with fake tensors: the measurement leaves the tracing modes,
    times real kernels on the site's device (here attncc's, interpreted, and SDPA's CPU FlashAttention;
    cuDNN cannot run on the CPU) and adds nothing to the traced graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from attncc.codegen.variants.softmax import route

    chosen = []

    def site(q, k, v):
        sizes = [int(s) for t in (q, k, v) for s in (*t.shape, *t.stride())]
        chosen.append(route._measure(q, k, v, sizes, grad=grad, scale=0.25, causal=True))
        return q * 2

    q = torch.randn(1, 4, 40, 16).transpose(1, 2).contiguous().transpose(1, 2)  # strides of a [B, T, H, D] view
    k = torch.randn(1, 2, 40, 16)
    graph = make_fx(site, tracing_mode="fake")(q, k, k)
    (choice,) = chosen
    assert choice.note.startswith(f"fastest measured {'fwd+bwd' if grad else 'fwd'}: "), choice
    assert "attncc flash" in choice.note and choice.note.endswith("; SDPA cuDNN cannot run it"), choice
    assert choice.kernel in ("attncc", "flash"), choice  # SDPA has a CPU FlashAttention; cuDNN is CUDA only
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [torch.ops.aten.mul.Tensor]


@pytest.mark.parametrize("policy", ["softmax", {"variant": "linear", "feature_map": "elu1"}], ids=["softmax", "linear"])
def test_sites_that_read_one_mask_check_it_once_per_call(policy, monkeypatch):
    """The two layers of a padded Llama read one mask: the compiled graph checks it once per call (not
    once per layer), on every call, and a call whose padding changes still matches the reference."""
    from attncc.codegen import runtime_mask

    model, args, kwargs = _llama16(padding=True)
    paddings = (kwargs["attention_mask"], torch.ones_like(kwargs["attention_mask"]))
    torch._dynamo.reset()
    reference = torch.compile(model, backend=attncc.backend({"attention": policy}, inner="aot_eager",
                                                            kernels="reference"))
    refs = [reference(*args, attention_mask=padding, use_cache=False)[0] for padding in paddings]
    torch._dynamo.reset()
    be = attncc.backend({"attention": policy}, inner="aot_eager", kernels="triton")
    compiled = torch.compile(model, backend=be)
    compiled(*args, **kwargs)
    checks = []
    check = runtime_mask.check
    monkeypatch.setattr(runtime_mask, "check", lambda *a: checks.append(a[1]) or check(*a))
    for padding, ref in zip(paddings, refs):
        checks.clear()
        out = compiled(*args, attention_mask=padding, use_cache=False)[0]
        assert len(checks) == 1, checks
        real = padding.bool()
        torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-4)
