"""One-shot device check on one GPU (within 10 minutes): every CUDA path a job takes, in one JSON.

Sections (each {"ok": bool, ...}, or {"ok": false, "error": one line}; one
failing section does not stop the others):

- versions: torch, CUDA, cuDNN, NCCL, Triton; device name, compute capability,
  and the dense bf16 peak of that exact model (PEAK_DENSE_BF16_TFLOPS);
- params: the giant spec's ensemble built on the meta device (no memory): parameters;
- sdpa_backends: the correlation mixer (lag-stacked queries and keys d*w wide,
  values d wide, scale 1/sqrt(d)) through every SDPA backend and the Triton
  kernel, in bf16, forward and backward, against a float64 reference of the
  float32 inputs, at the base preset's widths (head dim 40, w = 4) and at
  head dim 64 (w = 4); each in three cases (CASES): the causal training
  forward, a masked prefill after cached positions, a one-token decode;
- prefill_decode: a base member under bf16 autocast, cached: a plain prefill,
  a masked prefill after it (P cached positions, K new ones) and a one-token
  decode, each against the uncached float32 forward's logits;
- member_gelu4, member_relu3: a base member of each flavour, B = 32, T = 512,
  bf16 autocast, AdamW steps: tokens/s, peak memory, a finite loss;
- mfu: flops() of each member step (`leviathan.model.flops`, following the mixer
  path this device takes) / median step time / the device's peak;
- merge_step: one joint phase-2 step at world size 1 (`cluster.merge`, the
  worker's functions) on two base members;
- collectives: the NCCL primitives phase 2 and validation use, on a one-rank
  group, called directly (the job's exchange short-circuits at world size 1);
  a multi-rank NCCL run needs 2 GPUs and is not part of this check;
- checkpoint: the merge step's members (weights and optimiser states) and this
  rank's RNG (cluster.checkpointing) saved, restored into fresh members, compared;
- kernel: the Triton kernel's self-check (`leviathan.kernels.check`), accuracy and timings.

    python benchmarks/gpu_check.py [--out FILE]            # on a GPU machine
    python benchmarks/gpu_check.py --cpu                   # smoke test of the code paths, tiny sizes

Exit status 0 when every section is ok.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIANT_SPEC = REPO_ROOT / "jobs" / "specs" / "giant.toml"

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by the substrings of
# torch.cuda.get_device_name(). NVIDIA's datasheets quote bf16 "with sparsity",
# twice these: H100 SXM 1,979, H100 PCIe 1,513, H100 NVL 1,671; H200 SXM 1,979,
# H200 NVL 1,671 (https://www.nvidia.com/en-us/data-center/h100/ and
# https://www.nvidia.com/en-us/data-center/h200/, "Technical Specifications").
# The H100 SXM reports itself as "NVIDIA H100 80GB HBM3". Checked in order.
PEAK_DENSE_BF16_TFLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100", "PCIe"), "H100 PCIe", 756.0),
    (("H100", "HBM3"), "H100 SXM", 989.0),
    (("H100", "SXM"), "H100 SXM", 989.0),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.0),
)

# Largest relative error accepted in bf16 against the reference (bf16 keeps 8 mantissa bits).
BF16_TOLERANCE = 5e-2
MULTI_RANK_NOTE = "a multi-rank NCCL run needs 2 GPUs; this check runs one rank only"


def peak_for(device_name: str) -> tuple[str | None, float | None]:
    """(model, dense bf16 TFLOP/s) of the exact device model, or (None, None) when unknown."""
    for parts, model, tflops in PEAK_DENSE_BF16_TFLOPS:
        if all(p in device_name for p in parts):
            return model, tflops
    return None, None


class Sizes:
    """The check's shapes: the real ones on a GPU, tiny ones for the --cpu smoke test."""

    def __init__(self, cpu: bool):
        self.preset = "tiny" if cpu else "base"
        self.batch, self.seq_len = (2, 32) if cpu else (32, 512)
        self.merge_batch = 2 if cpu else 8
        self.steps, self.warmup = (2, 1) if cpu else (10, 3)
        # (head dim, window) pairs of the backend check, and its (B, H, T).
        self.backend_shapes = ((16, 4), (64, 4)) if cpu else ((40, 4), (64, 4))
        self.backend_bht = (1, 2, 64) if cpu else (4, 20, 512)
        self.prefill, self.masked, self.decode_len = (8, 4, 1) if cpu else (256, 128, 1)


# --------------------------------------------------------------------------- sections


def versions(device: torch.device, peak_override: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        model, peak = peak_for(name)
        if peak_override is not None:
            model, peak = f"--peak-tflops {peak_override:g}", peak_override
        out.update(
            cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            nccl=_version_text(torch.cuda.nccl.version()), device=name,
            compute_capability=f"{major}.{minor}", device_count=torch.cuda.device_count(),
            peak_model=model, peak_dense_bf16_tflops=peak,
        )
        out["ok"] = peak is not None
        if peak is None:
            out["error"] = f"no dense bf16 peak known for {name!r}: pass --peak-tflops for MFU"
    else:
        out.update(device="cpu", ok=True)
    return out


def _version_text(version: Any) -> str:
    """NCCL's version as text: torch gives a (major, minor, patch) tuple (an int in old releases)."""
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def params_on_meta(vocab_size: int) -> dict[str, Any]:
    """The giant spec's ensemble, built on the meta device: parameter counts without memory."""
    from jobs.spec import EnsembleSpec
    from leviathan.model.ensemble import LeviathanEnsemble

    raw = tomllib.loads(GIANT_SPEC.read_text())
    block_size = max(256, raw["training"]["seq_len"])
    config = EnsembleSpec.model_validate(raw["ensemble"]).to_config(vocab_size=vocab_size, block_size=block_size)
    with torch.device("meta"):
        ensemble = LeviathanEnsemble(config)
    per_member = [m.num_params() for m in ensemble.members]
    return {
        "ok": True, "spec": str(GIANT_SPEC.relative_to(REPO_ROOT)), "vocab_size": vocab_size,
        "ensemble": ensemble.num_params(), "per_member": per_member,
        "merger_and_projections": ensemble.num_params() - sum(per_member),
    }


def correlation_inputs(B: int, H: int, T: int, d: int, w: int, device: torch.device) -> list[torch.Tensor]:
    """Float32 q, k, v (B, H, T, d) and lag weights a (H, w), a[:, 0] = 1."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, d, generator=gen, device=device) for _ in range(3))
    lag = 0.5 * torch.randn(H, w, generator=gen, device=device)
    lag[:, 0] = 1.0
    return [q, k, v, lag]


CASES = ("causal", "masked_prefill", "decode")
"""Query shapes of the backend rows: a training forward; a prefill of the last quarter of
the positions after the rest were cached (an explicit mask, since SDPA's is_causal aligns
top-left); a one-token decode (no mask)."""


def lag_stacked_correlation(q, k, v, lag, backend=None, case: str = "causal") -> torch.Tensor:
    """Correlation as one SDPA call: Q~[i] = concat_u a[u] q[i-u], K~[j] = concat_u k[j-u]
    (B, H, T, d*w), values (B, H, T, d), scale 1/sqrt(d), for the queries of `case`.
    backend: an SDPBackend to force (else PyTorch's own dispatch)."""
    from torch.nn.attention import sdpa_kernel

    from leviathan.model.correlation import lag_stack

    B, H, T, d = q.shape
    w = lag.shape[1]
    qs = (lag_stack(q, w).view(B, H, T, w, d) * lag.view(1, H, 1, w, 1).to(q.dtype)).view(B, H, T, w * d)
    ks = lag_stack(k, w)
    kwargs: dict[str, Any] = {}
    if case == "causal":
        kwargs["is_causal"] = True
    elif case == "masked_prefill":
        P = T - T // 4  # cached positions
        qs = qs[:, :, P:]
        kwargs["attn_mask"] = torch.ones(T - P, T, dtype=torch.bool, device=q.device).tril(diagonal=P)
    else:  # decode: the last position's query against every key
        qs = qs[:, :, -1:]
    with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qs, ks, v, scale=d**-0.5, **kwargs)


def relative_errors(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dtype: torch.dtype, case: str) -> dict[str, float]:
    """Max |fn(dtype) - reference| / max |reference| of the output and every input gradient.

    The reference is SDPA's math backend on the float32 inputs computed in float64, so
    neither TF32 matmuls (float32 precision "high") nor rounding blur it."""
    from torch.nn.attention import SDPBackend

    ref_in = [x.double().requires_grad_() for x in inputs]
    ref = lag_stacked_correlation(*ref_in, backend=SDPBackend.MATH, case=case)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    ref, ref_grads = ref.float(), [g.float() for g in ref_grads]
    low = [x.to(dtype).requires_grad_() if i < 3 else x.clone().requires_grad_() for i, x in enumerate(inputs)]
    out = fn(*low)
    grads = torch.autograd.grad(out, low, grad_out.to(out.dtype))
    names = ("out", "dq", "dk", "dv", "dlag")
    return {
        n: ((got.float() - want).abs().max() / want.abs().max()).item()
        for n, got, want in zip(names, (out, *grads), (ref, *ref_grads))
    }


def sdpa_backends(device: torch.device, sizes: Sizes, dtype: torch.dtype) -> dict[str, Any]:
    """Every SDPA backend (and the Triton kernel on CUDA, causal only) on the correlation's shapes."""
    from torch.nn.attention import SDPBackend

    B, H, T = sizes.backend_bht
    backends = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
    rows = []
    for d, w in sizes.backend_shapes:
        inputs = correlation_inputs(B, H, T, d, w, device)
        for case in CASES:
            candidates: dict[str, Callable] = {
                b.name.lower(): (lambda q, k, v, a, b=b, case=case: lag_stacked_correlation(q, k, v, a, backend=b, case=case))
                for b in backends
            }
            if device.type == "cuda" and case == "causal":
                candidates["triton"] = _triton_correlation
            for name, fn in candidates.items():
                row: dict[str, Any] = {"backend": name, "case": case, "head_dim": d, "window": w, "B": B, "H": H, "T": T}
                try:
                    errors = relative_errors(fn, inputs, dtype, case)
                    row.update(errors, ok=max(errors.values()) <= BF16_TOLERANCE)
                except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is a finding
                    row.update(ok=False, error=one_line(e))
                rows.append(row)
    # The mixer needs one backend that runs every shape and case; the rest are findings.
    usable = sorted({r["backend"] for r in rows if r["ok"]} - {r["backend"] for r in rows if not r["ok"]})
    out: dict[str, Any] = {"ok": bool(usable), "dtype": str(dtype).removeprefix("torch."),
                           "tolerance": BF16_TOLERANCE, "usable_for_every_case": usable, "rows": rows}
    try:
        from leviathan.model.correlation import CUDA_SDPA_BACKENDS

        out["mixer_backend_order"] = [b.name.lower() for b in CUDA_SDPA_BACKENDS]
    except ImportError:
        pass
    return out


def _triton_correlation(q, k, v, lag):
    from leviathan.kernels import shifted_diagonal_attention

    return shifted_diagonal_attention(q, k, v, lag, q.shape[-1] ** -0.5)


def member_config(sizes: Sizes, flavour: str, vocab_size: int):
    from leviathan.config import ComponentConfig

    return ComponentConfig.preset(
        sizes.preset, flavour=flavour, vocab_size=vocab_size, block_size=max(256, sizes.seq_len), window=4,
    )


def tokens(B: int, T: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    return torch.randint(0, vocab_size, (B, T + 1), generator=gen).to(device)


def prefill_decode(device, sizes: Sizes, autocast, vocab_size: int) -> dict[str, Any]:
    """A base member's cached forwards under bf16 autocast (the model's own SDPA choice)
    against its uncached float32 forward: prefill, masked prefill, one-token decode."""
    from leviathan.model.component import build_component

    torch.manual_seed(0)
    model = build_component(member_config(sizes, "gelu4", vocab_size)).to(device).eval()
    P, K, D = sizes.prefill, sizes.masked, sizes.decode_len
    x = tokens(1, P + K + D, vocab_size, device)[:, : P + K + D]
    out: dict[str, Any] = {}
    with torch.no_grad():
        full = model(x)[0].float()
        with autocast():
            cache = model.new_cache()
            parts = {
                "prefill": (model(x[:, :P], cache=cache)[0], slice(0, P)),
                "masked_prefill": (model(x[:, P : P + K], cache=cache)[0], slice(P, P + K)),
                "decode": (model(x[:, P + K :], cache=cache)[0], slice(P + K, P + K + D)),
            }
    scale = full.abs().max().item()
    for name, (logits, where) in parts.items():
        out[f"{name}_rel_error"] = (logits.float() - full[:, where]).abs().max().item() / scale
    out["ok"] = all(v <= BF16_TOLERANCE for v in out.values())
    out["shapes"] = {"prefill": P, "masked_prefill": [P, K], "decode": D}
    return out


def train_member(device, sizes: Sizes, autocast, flavour: str, vocab_size: int) -> dict[str, Any]:
    """AdamW steps of one member at (batch, seq_len): tokens/s, peak memory, a finite loss."""
    from leviathan.model.component import build_component, configure_adamw

    config = member_config(sizes, flavour, vocab_size)
    torch.manual_seed(0)
    model = build_component(config).to(device).train()
    opt = configure_adamw(model, 6e-4, 0.1)
    batch = tokens(sizes.batch, sizes.seq_len, vocab_size, device)
    x, y = batch[:, :-1], batch[:, 1:]
    reset_peak(device)
    times, loss = [], None
    for i in range(sizes.warmup + sizes.steps):
        t0 = sync_time(device)
        with autocast():
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= sizes.warmup:
            times.append(sync_time(device) - t0)
    step_s = statistics.median(times)
    tokens_per_s = sizes.batch * sizes.seq_len / step_s
    out: dict[str, Any] = {
        "preset": sizes.preset, "flavour": flavour, "B": sizes.batch, "T": sizes.seq_len,
        "params": model.num_params(), "step_s_median": step_s, "tokens_per_s": tokens_per_s,
        "peak_memory_gib": peak_gib(device), "loss": loss.item(), "ok": math.isfinite(loss.item()),
    }
    return out


def mfu(device, sizes: Sizes, vocab_size: int, members: dict[str, dict[str, Any]], peak: float | None) -> dict[str, Any]:
    """Model FLOPs utilisation of each member step: flops() (the mixer path this device takes) / step time / peak."""
    from leviathan.model.correlation import mixer_path
    from leviathan.model.flops import flops

    rows = {}
    for flavour, measured in members.items():
        config = member_config(sizes, flavour, vocab_size)
        step_flops = flops(config, sizes.seq_len, sizes.batch, device=device.type)
        achieved = step_flops / measured["step_s_median"]
        rows[flavour] = {
            "mixer_path": mixer_path(device.type, sizes.seq_len, config.window, dropout=config.dropout > 0),
            "flops_per_step": step_flops, "model_tflops": achieved / 1e12,
            "mfu": None if peak is None else achieved / (peak * 1e12),
        }
    return {"ok": bool(rows) and (peak is not None or device.type == "cpu"), "peak_dense_bf16_tflops": peak, **rows}


def merge_step(device, sizes: Sizes, autocast, vocab_size: int):
    """One joint phase-2 step at world size 1 through the worker's functions; returns (section, members)."""
    from cluster.members import Member, adamw, build_member, build_merger
    from cluster.merge import Exchange, local_parameters, merged_loss, reduce_and_clip
    from leviathan.config import EnsembleConfig

    members_cfg = [member_config(sizes, f, vocab_size) for f in ("gelu4", "relu3")]
    width = members_cfg[0].n_embd
    config = EnsembleConfig(members=members_cfg, modules=1, members_per_module=2, merge="fusion",
                            merge_width=width, merge_heads=members_cfg[0].n_head)
    members = []
    for j in range(2):
        model, projection = build_member(config, j, seed=0)
        m = Member(j, config.member_names[j], model.to(device), projection.to(device))
        m.projection_optimizer = adamw(m.projection, 3e-4, 0.1)
        m.joint_optimizer = adamw(m.model, 6e-5, 0.1)
        members.append(m)
    merger = build_merger(config, seed=0).to(device)
    merger_opt = adamw(merger, 3e-4, 0.1)
    exchange = Exchange.for_placement(0, 1, config.modules, config.members_per_module)
    batch = tokens(sizes.merge_batch, sizes.seq_len, vocab_size, device)
    x, y = batch[:, :-1], batch[:, 1:]
    reset_peak(device)
    t0 = sync_time(device)
    with autocast():
        share = merged_loss(members, merger, x, y, exchange, joint=True)
    share.backward()
    loss, norm = reduce_and_clip(merger, local_parameters(members, joint=True), share, 1, grad_clip=1.0)
    for opt in [merger_opt] + [o for m in members for o in (m.projection_optimizer, m.joint_optimizer)]:
        opt.step()
    seconds = sync_time(device) - t0
    section = {
        "ok": math.isfinite(loss) and math.isfinite(norm), "B": sizes.merge_batch, "T": sizes.seq_len,
        "members": [m.name for m in members], "loss": loss, "grad_norm": norm, "step_s": seconds,
        "peak_memory_gib": peak_gib(device),
    }
    return section, members


def collectives(device: torch.device) -> dict[str, Any]:
    """The primitives phase 2 and validation call, on a one-rank NCCL (gloo on CPU) group."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    results: dict[str, bool] = {}
    try:
        x = torch.arange(6.0, device=device).reshape(2, 3)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        results["all_gather"] = torch.equal(parts[0], x)

        leaf = x.clone().requires_grad_()
        gathered = dist_nn.all_gather(leaf)  # differentiable; backward reduces the gradients
        torch.cat(gathered).sum().backward()
        results["differentiable_all_gather_backward"] = torch.equal(leaf.grad, torch.ones_like(x))

        leaf = x.clone().requires_grad_()
        swapped = dist_nn.all_to_all_single(torch.empty_like(leaf), leaf)  # differentiable row exchange
        (2 * swapped).sum().backward()
        results["differentiable_all_to_all_backward"] = torch.equal(swapped, x) and torch.equal(
            leaf.grad, torch.full_like(x, 2.0)
        )

        out = torch.empty(2, 3, device=device)
        dist.reduce_scatter_tensor(out, x)
        results["reduce_scatter"] = torch.equal(out, x)

        y = x.clone()
        dist.all_reduce(y)
        results["all_reduce"] = torch.equal(y, x)

        objects: list[Any] = [None]
        dist.all_gather_object(objects, {"rank": 0})
        results["all_gather_object"] = objects == [{"rank": 0}]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        dist.destroy_process_group()
    multi = "not run: " + MULTI_RANK_NOTE
    return {"ok": all(results.values()), "backend": backend, "world_size": 1, **results, "multi_rank": multi}


def checkpoint_round_trip(device: torch.device, members) -> dict[str, Any]:
    """Members (weights, optimiser states) and this rank's RNG through cluster.checkpointing's files."""
    from cluster import checkpointing
    from cluster.members import Member, adamw
    from leviathan.model.component import build_component

    with tempfile.TemporaryDirectory(prefix="leviathan-gpu-check-") as tmp:
        d = Path(tmp)
        torch.save([m.state_dict() for m in members], d / "members.pt")
        checkpointing.save_rank(d, 0, device)
        expected = torch.rand(4, device=device)
        fresh = []
        for m in members:
            model = build_component(m.model.config).to(device)
            projection = torch.nn.Linear(m.projection.in_features, m.projection.out_features, bias=False).to(device)
            copy = Member(m.index, m.name, model, projection)
            copy.projection_optimizer = adamw(copy.projection, 3e-4, 0.1)
            copy.joint_optimizer = adamw(copy.model, 6e-5, 0.1)
            fresh.append(copy)
        for copy, state in zip(fresh, torch.load(d / "members.pt", map_location=device, weights_only=False)):
            copy.load_state_dict(state)
        checkpointing.load_rank(d, 0, device)
        rng_ok = torch.equal(torch.rand(4, device=device), expected)
    weights_ok = all(
        torch.equal(p, q)
        for a, b in zip(members, fresh)
        for p, q in zip((*a.model.parameters(), *a.projection.parameters()), (*b.model.parameters(), *b.projection.parameters()))
    )
    opt_ok = all(
        torch.equal(sa["exp_avg"], sb["exp_avg"])
        for a, b in zip(members, fresh)
        for sa, sb in zip(a.joint_optimizer.state.values(), b.joint_optimizer.state.values())
    )
    return {"ok": weights_ok and opt_ok and rng_ok, "weights": weights_ok, "optimizer_state": opt_ok, "rng": rng_ok}


def kernel_self_check(device: torch.device, quick: bool) -> dict[str, Any]:
    """The Triton kernel's own GPU self-check: accuracy in fp32 and bf16, timings against flash."""
    if device.type != "cuda":
        return {"ok": True, "skipped": "needs CUDA"}
    from leviathan.kernels.check import gpu_self_check

    kwargs = dict(windows=(1, 4), head_dims=(64,), lengths=(512, 2048), repeats=5) if quick else {}
    result = gpu_self_check(device="cuda", **kwargs)
    return {**result, "ok": bool(result["ok"])}


# --------------------------------------------------------------------------- helpers


def one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:400]


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_section(report: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one section into report[name]; an exception becomes its one-line error."""
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - one broken path must not hide the others
        report[name] = {"ok": False, "error": one_line(e)}
    report[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"gpu_check: {name}: {'ok' if report[name]['ok'] else 'FAILED'} ({report[name]['seconds']} s)",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="smoke-test the code paths on CPU at tiny sizes")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the members (BPE default 4096)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a device not in the table")
    p.add_argument("--quick-kernel", action="store_true", help="fewer kernel timing shapes")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    if not args.cpu and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device visible to torch (use --cpu for the smoke test)"}))
        return 1
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    sizes = Sizes(args.cpu)
    vocab = 256 if args.cpu else args.vocab_size
    dtype = torch.bfloat16

    def autocast():
        return torch.autocast(device.type, dtype=dtype)

    started = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "gpu_check", "mode": "cpu smoke test" if args.cpu else "gpu",
                              "note": MULTI_RANK_NOTE}
    run_section(report, "versions", lambda: versions(device, args.peak_tflops))
    peak = report["versions"].get("peak_dense_bf16_tflops")
    run_section(report, "params", lambda: params_on_meta(args.vocab_size))
    run_section(report, "sdpa_backends", lambda: sdpa_backends(device, sizes, dtype))
    run_section(report, "prefill_decode", lambda: prefill_decode(device, sizes, autocast, vocab))
    for flavour in ("gelu4", "relu3"):
        run_section(report, f"member_{flavour}", lambda: train_member(device, sizes, autocast, flavour, vocab))
    measured = {f: report[f"member_{f}"] for f in ("gelu4", "relu3") if report[f"member_{f}"]["ok"]}
    run_section(report, "mfu", lambda: mfu(device, sizes, vocab, measured, peak))
    members: list = []

    def merge_and_keep() -> dict[str, Any]:
        section, kept = merge_step(device, sizes, autocast, vocab)
        members.extend(kept)
        return section

    run_section(report, "merge_step", merge_and_keep)
    run_section(report, "checkpoint", lambda: checkpoint_round_trip(device, members))
    members.clear()
    run_section(report, "collectives", lambda: collectives(device))
    run_section(report, "kernel", lambda: kernel_self_check(device, args.quick_kernel))
    sections = [v for v in report.values() if isinstance(v, dict)]
    report["ok"] = all(s["ok"] for s in sections)
    report["failed"] = [k for k, v in report.items() if isinstance(v, dict) and not v["ok"]]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
