"""fwd+bwd benchmarks of the fused linear DPO loss (sigmoid) against the eager TRL-style path and Liger-Kernel.

Problem (benchmarks/README.md): B pairs, i.e. 2B sequences of T tokens (the chosen batch then the rejected
batch), D hidden, V vocabulary. The first half of every sequence is the prompt (labels = -100), so half the tokens
are scored. CPU: 4 pairs x T=512, D=512, V=32000, fp32. CUDA: 4 pairs x T=1024, D=4096, V=128256, bf16.
``PTK_BENCH_SMALL=1``: a tiny smoke size (figures meaningless).

Reference log-probs (``ref``):
    given      precomputed reference log-probs ``[B]`` (TRL's ``precompute_ref_log_probs``)
    ref_model  the reference model's hidden states and head (same shapes as the policy's) are scored in the step,
               under no_grad (eager: its own full logits; ptkernels: inside the same chunk loop)

Implementations (``impl``):
    eager          full logits ``F.linear(h, W).float()``, ``log_softmax``, ``gather``, masked sum per sequence,
                   DPO sigmoid loss (TRL's ``concatenated_forward`` + ``dpo_loss`` without its extras)
    liger          Liger-Kernel's ``LigerFusedLinearDPOLoss`` (when installed; ``compiled=False`` off CUDA), which
                   takes the reference model's hidden states and head (``ref_model`` only)
    ptk-<backend>  ``fused_linear_preference_loss`` on each usable backend (never the Triton interpreter)
    ptk-<backend>+compact  ``memory="compact"`` on the device's default backend (triton on CUDA, native on CPU):
                   dW one vocabulary block at a time in backward, no fp32 [V, D] accumulator; its peak memory
                   against ``grad_floor_bytes`` (dX + dW in the inputs' dtype) is ``mem_x_grad_floor``

``extra_info`` per case: ``median_s``, ``peak_mem_bytes`` (CUDA: max_memory_allocated minus baseline; CPU: peak
RSS growth of a fresh subprocess, _measure.py), ``time_x_eager``, ``mem_x_eager`` (ratios within the run), useful
FLOPs (policy 6 N_valid D V, plus 2 N_valid D V for a reference head) and time over the GEMM floor. Times are never
asserted; every case checks its loss and hidden-state gradient against eager.
"""

from __future__ import annotations

import importlib.util
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from _measure import cuda_peak_growth, peak_rss_growth, sync
from conftest import SESSION_RESULTS, bench_rounds

from ptkernels.ops.core.dispatch import triton_interpreting, unusable_reason
from ptkernels.ops.fused_preference import fused_linear_preference_loss

IGNORE = -100
BETA = 0.1
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("eager", "liger", "ptk-torch", "ptk-triton", "ptk-native", "ptk-triton+compact", "ptk-native+compact")
REFS = ("given", "ref_model")


def dpo_size() -> dict:
    if os.environ.get("PTK_BENCH_SMALL", "0") not in ("", "0"):
        return {"pairs": 2, "t": 64, "d": 64, "v": 2048, "dtype": "float32" if DEVICE.type == "cpu" else "bfloat16"}
    if DEVICE.type == "cuda":
        return {"pairs": 4, "t": 1024, "d": 4096, "v": 128256, "dtype": "bfloat16"}
    return {"pairs": 4, "t": 512, "d": 512, "v": 32000, "dtype": "float32"}


WARMUP = {"pairs": 1, "t": 16, "d": 32, "v": 256, "dtype": "float32"}


def size_name(s: dict) -> str:
    return f"{DEVICE.type}-{s['pairs']}pairs-T{s['t']}-D{s['d']}-V{s['v']}-{s['dtype']}"


class DPOProblem:
    """Policy hidden [2B, T, D] and head [V, D] (both requiring grad), labels [2B, T] (first half of each
    sequence -100), the reference model's hidden states and head, and precomputed reference log-probs [B]."""

    def __init__(self, pairs, t, d, v, dtype, device=DEVICE, seed=0):
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = 2 * pairs
        self.pairs = pairs
        self.hidden = torch.randn(n, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
        self.weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype).requires_grad_()
        labels = torch.randint(0, v, (n, t), generator=g)
        labels[:, : t // 2] = IGNORE  # the prompt half
        self.labels = labels.to(device)
        self.n_valid = int((labels != IGNORE).sum())
        self.ref_hidden = (self.hidden.detach().float() + 0.1 * torch.randn(n, t, d, generator=g).to(device)).to(
            dtype)
        self.ref_weight = (self.weight.detach().float() + 0.01 * torch.randn(v, d, generator=g).to(device)).to(dtype)
        self.ref_chosen_logps = (-0.5 * self.n_valid / n - torch.rand(pairs, generator=g) * 50).to(device)
        self.ref_rejected_logps = (-0.5 * self.n_valid / n - torch.rand(pairs, generator=g) * 50).to(device)
        self.device = device

    def reset_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def _eager_seq_logps(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != IGNORE
    tok = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, tok, 0.0).sum(-1)


def _objective(impl: str, ref: str, p: DPOProblem):
    h, w, y, b = p.hidden, p.weight, p.labels, p.pairs
    if impl == "eager":
        def eager():
            seq = _eager_seq_logps(h, w, y)
            if ref == "given":
                rc, rr = p.ref_chosen_logps, p.ref_rejected_logps
            else:
                with torch.no_grad():
                    ref_seq = _eager_seq_logps(p.ref_hidden, p.ref_weight, y)
                rc, rr = ref_seq[:b], ref_seq[b:]
            logits = (seq[:b] - seq[b:]) - (rc - rr)
            return -F.logsigmoid(BETA * logits).mean()

        return eager
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, compiled=DEVICE.type == "cuda",
                                          use_ref_model=True)

        def liger():
            out = loss_fn(w, h, y, ref_input=p.ref_hidden, ref_weight=p.ref_weight)
            return out[0] if isinstance(out, tuple) else out

        return liger
    if impl.startswith("ptk-"):
        backend, _, variant = impl[4:].partition("+")
        memory = "compact" if variant == "compact" else "default"
        ref_kw = (dict(ref_chosen_logps=p.ref_chosen_logps, ref_rejected_logps=p.ref_rejected_logps)
                  if ref == "given" else dict(ref_hidden=p.ref_hidden, ref_weight=p.ref_weight))
        return lambda: fused_linear_preference_loss(h, w, y, beta=BETA, backend=backend, memory=memory,
                                                    **ref_kw).loss
    raise ValueError(f"unknown impl {impl!r}")


def make_step(impl: str, ref: str, p: DPOProblem):
    objective = _objective(impl, ref, p)

    def step():
        out = objective()
        out.backward()
        sync(p.device)
        return out.detach()

    return step


def memory_case(impl: str, ref: str, pairs: int, t: int, d: int, v: int, dtype: str, device: str = "cpu"):
    """Factory for _measure.peak_rss_growth: builds the problem in the (fresh) process, returns its step."""
    return make_step(impl, ref, DPOProblem(pairs, t, d, v, dtype, device))


def skip_reason(impl: str, ref: str) -> str | None:
    if impl == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "Liger-Kernel is not installed (pip install liger-kernel)"
        if ref == "given":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            if "ref_chosen_logps" not in inspect.signature(LigerFusedLinearDPOLoss.forward).parameters:
                return "this Liger-Kernel's LigerFusedLinearDPOLoss takes no precomputed reference log-probs"
        return None
    if impl.startswith("ptk-"):
        backend, _, variant = impl[4:].partition("+")
        if variant == "compact" and backend != ("triton" if DEVICE.type == "cuda" else "native"):
            return "memory='compact' is measured on the device's default backend only"
        reason = unusable_reason(backend, DEVICE)
        if reason is not None:
            return f"ptkernels backend {backend!r} not usable: {reason}"
        if backend == "triton" and DEVICE.type == "cpu" and triton_interpreting():
            return "the Triton interpreter (TRITON_INTERPRET=1) is never benchmarked"
    return None


@pytest.fixture(scope="module")
def dpo_problem() -> DPOProblem:
    return DPOProblem(**dpo_size())


_REFERENCE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def eager_reference(ref: str, p: DPOProblem):
    if ref not in _REFERENCE:
        p.reset_grads()
        out = make_step("eager", ref, p)()
        _REFERENCE[ref] = (out.float(), p.hidden.grad.float().clone())
        p.reset_grads()
    return _REFERENCE[ref]


def _peak_memory(impl, ref, p, s) -> tuple[float, str]:
    if DEVICE.type == "cuda":
        return (cuda_peak_growth(make_step(impl, ref, p), DEVICE, reset=p.reset_grads),
                "cuda max_memory_allocated - baseline")
    r = peak_rss_growth(__file__, "memory_case", kwargs={"impl": impl, "ref": ref, **s},
                        warmup_kwargs={"impl": impl, "ref": ref, **WARMUP})
    return float(r["growth_bytes"]), "cpu peak RSS growth (VmHWM - VmRSS) of a fresh subprocess"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ref", REFS)
def test_dpo_fwd_bwd(benchmark, impl, ref, dpo_problem, matmul_rate):
    reason = skip_reason(impl, ref)
    if reason:
        pytest.skip(reason)
    s = dpo_size()
    p = dpo_problem
    ref_out, ref_dh = eager_reference(ref, p)  # the oracle first, outside the timed rounds
    op = f"fused_linear_dpo[{ref}]"
    benchmark.group = f"{op} fwd+bwd {size_name(s)}"
    out = benchmark.pedantic(make_step(impl, ref, p), setup=p.reset_grads, rounds=bench_rounds(), iterations=1,
                             warmup_rounds=1)
    dh = p.hidden.grad.float().clone()
    tol = 2e-4 if p.hidden.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol, msg=lambda m: f"{op}/{impl}: {m}")
    err = (dh - ref_dh).norm() / ref_dh.norm().clamp_min(1e-30)
    assert err < (1e-4 if p.hidden.dtype == torch.float32 else 3e-2), f"{op}/{impl}: d hidden rel. error {err:.3g}"

    stats = getattr(benchmark, "stats", None)
    median = float(stats.stats.median) if stats is not None else None
    mem, how = _peak_memory(impl, ref, p, s)
    flops = 6.0 * p.n_valid * s["d"] * s["v"] + (2.0 * p.n_valid * s["d"] * s["v"] if ref == "ref_model" else 0.0)
    floor_s = matmul_rate.floor_seconds(flops)
    grad_floor = (p.hidden.numel() + p.weight.numel()) * p.hidden.element_size()  # dX + dW
    info = {"op": op, "impl": impl, "size": size_name(s), **s, "n_valid": p.n_valid,
            "prompt_masked": "first half of each sequence", "median_s": median, "peak_mem_bytes": mem,
            "peak_mem_mib": mem / 2 ** 20, "peak_mem_method": how, "grad_floor_bytes": grad_floor,
            "mem_x_grad_floor": mem / grad_floor, "useful_flops": flops,
            "useful_tflops": flops / median / 1e12 if median else None, "floor_s": floor_s,
            "time_over_floor": median / floor_s if median else None, **matmul_rate.as_info()}
    base = SESSION_RESULTS.get((op, "eager"))
    if base and median and base.get("median_s"):
        info["time_x_eager"] = median / base["median_s"]
        info["mem_x_eager"] = mem / base["peak_mem_bytes"] if base["peak_mem_bytes"] else None
    benchmark.extra_info.update(info)
    SESSION_RESULTS[(op, impl)] = info
    p.reset_grads()


LOSS_TYPES = ("sigmoid", "nca_pair", "sppo_hard", "discopop", "sigmoid_norm", "sft", ["sigmoid", "sft"], "aot")


@pytest.mark.parametrize("loss_type", LOSS_TYPES, ids=lambda x: x if isinstance(x, str) else "+".join(x))
def test_dpo_loss_types_fwd_bwd(benchmark, loss_type, dpo_problem):
    """TRL 1.16's newer DPO loss types on the fused op (auto backend, precomputed reference log-probs): the loss is
    a few flops on [B] values, so each costs what sigmoid costs (3 GEMMs), except aot, whose sort over the batch
    couples pairs and takes a forward-only pass first (4 GEMMs). ``time_x_sigmoid`` is the ratio within the run."""
    p = dpo_problem
    kw = dict(ref_chosen_logps=p.ref_chosen_logps, ref_rejected_logps=p.ref_rejected_logps, beta=BETA,
              loss_type=loss_type)

    def step():
        out = fused_linear_preference_loss(p.hidden, p.weight, p.labels, **kw).loss
        out.backward()
        sync(p.device)
        return out.detach()

    name = loss_type if isinstance(loss_type, str) else "+".join(loss_type)
    benchmark.group = f"fused_linear_dpo loss types fwd+bwd {size_name(dpo_size())}"
    out = benchmark.pedantic(step, setup=p.reset_grads, rounds=bench_rounds(), iterations=1, warmup_rounds=1)
    assert torch.isfinite(out)
    stats = getattr(benchmark, "stats", None)
    median = float(stats.stats.median) if stats is not None else None
    info = {"op": "fused_linear_dpo_loss_types", "loss_type": name, "size": size_name(dpo_size()),
            "median_s": median}
    base = SESSION_RESULTS.get(("fused_linear_dpo_loss_types", "sigmoid"))
    if base and median and base.get("median_s"):
        info["time_x_sigmoid"] = median / base["median_s"]
    benchmark.extra_info.update(info)
    SESSION_RESULTS[("fused_linear_dpo_loss_types", name)] = info
    p.reset_grads()
