"""The GPU path, on one CUDA device: real `prime-scale train` runs of a tiny model on NCCL (world size 1)
in bf16 and fp32, ZeRO 0 and 3; PyTorch's flash and memory-efficient SDPA kernels taking the model's
attention in bf16 (head_dim 64 and 128); checkpoint save and bitwise-exact resume; convert, eval and
sample of a GPU-trained run; building the model leaves the CUDA RNG alone; the vocab-parallel loss on
CUDA equals the dense loss, with the host syncs it makes listed (torch.cuda.set_sync_debug_mode).

Every test is marked `gpu` and skipped, with the reason, only where torch.cuda.is_available() is false:
`python -m pytest -q -m gpu tests/test_gpu.py` on a GPU machine; bench/gpu_check.sh runs them and
more. With PRIME_SCALE_GPU_CHECK_DIR set, the sync sites are also written there (sync_sites.json)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = "no CUDA GPU: torch.cuda.is_available() is false"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

TINY = ["model.layers=2", "model.hidden=64", "model.heads=2", "model.seq_len=64", "model.dropout=0.1",
        "train.global_batch=8", "train.micro_batch=4", "optim.warmup_steps=2", "optim.schedule=constant",
        "optim.ema=0.9", "eval.every=0", "eval.batches=1", "logging.wandb=disabled", "data.num_workers=0",
        "train.log_every=1", "checkpoint.keep_last=3", "eval.final_batches=null"]
STEPS = 8


# --------------------------------------------------------------------------- helpers


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "DS_ACCELERATOR")}  # DeepSpeed must pick its CUDA accelerator itself
    env.update({"OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    return env


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prime_scale.cli", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _train(run: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = _cli("train", "tiny-cpu", *TINY, f"run.dir={run}", "--samples", "0", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"], r["grad_norm"])
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _assert_trained_on_cuda(proc: subprocess.CompletedProcess, run: Path, steps: int) -> list:
    assert "on cuda" in proc.stdout, proc.stdout[-3000:]  # the banner: "... per rank on cuda" (NCCL)
    losses = _losses(run)
    assert [s for s, _, _ in losses] == list(range(1, steps + 1))
    assert all(math.isfinite(loss) for _, loss, _ in losses), losses
    return losses


def _args(**kw):
    from prime_scale.config import ModelConfig
    from prime_scale.model import ModelArgs

    base = dict(vocab_size=100, ell=2, layers=2, hidden=256, heads=4, seq_len=128, seed=3, dropout=0.0)
    base.update(kw)
    vocab, seed = base.pop("vocab_size"), base.pop("seed")
    return ModelArgs(ModelConfig(**base), vocab_size=vocab, seed=seed)


# --------------------------------------------------------------------------- training on NCCL


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """STEPS steps straight, a checkpoint every STEPS / 2."""
    run = tmp_path_factory.mktemp("gpu") / "reference"
    proc = _train(run, f"train.steps={STEPS}", f"checkpoint.every={STEPS // 2}")
    _assert_trained_on_cuda(proc, run, STEPS)
    return run


def test_nccl_world_size_one_trains_the_tiny_recipe_in_fp32(reference_run):
    """The reference run is one: the recipe's fp32, on NCCL with world size 1 (its fixture checks
    the device, the steps and finite losses)."""
    assert "precision: fp32" in (reference_run / "recipe.yaml").read_text().splitlines()


def test_a_task_that_sees_one_gpu_trains_whatever_its_local_rank(tmp_path):
    """srun --gpus-per-task=1 / per-rank CUDA_VISIBLE_DEVICES, emulated on one GPU: local rank 1 of 2
    sees only cuda:0. DeepSpeed's engine picks its device from LOCAL_RANK, so that must name cuda:0
    ("invalid device ordinal" in deepspeed.initialize before the one device decision)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(_env(), RANK="0", WORLD_SIZE="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0])
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "prime_scale.cli.train", "tiny-cpu", *TINY, f"run.dir={run}",
                           "--samples", "0", "train.steps=2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_trained_on_cuda(proc, run, 2)


def test_nccl_world_size_one_trains_the_tiny_recipe_in_bf16(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "precision=bf16", "train.steps=4", "checkpoint.every=0")
    _assert_trained_on_cuda(proc, run, 4)


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stage_trains_on_the_gpu(reference_run, tmp_path, stage):
    """ZeRO 0 and 3 (the recipe's 1 is the reference run's): the first loss comes before any update,
    so it equals ZeRO 1's; every loss is finite."""
    run = tmp_path / "run"
    proc = _train(run, f"parallel.zero_stage={stage}", "train.steps=4", "checkpoint.every=0")
    losses = _assert_trained_on_cuda(proc, run, 4)
    assert losses[0][1] == pytest.approx(_losses(reference_run)[0][1], rel=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_resume_on_the_gpu_is_bitwise_exact(reference_run, tmp_path):
    run = tmp_path / "run"
    _train(run, f"train.steps={STEPS // 2}", f"checkpoint.every={STEPS // 2}")
    assert (run / "checkpoints" / f"step_{STEPS // 2}").is_dir()
    proc = _train(run, f"train.steps={STEPS}", f"checkpoint.every={STEPS // 2}", "--resume", "auto")
    assert "resumed from" in proc.stdout, proc.stdout[-3000:]
    resumed, straight = _losses(run), _losses(reference_run)
    if resumed != straight:
        # tell a resume defect from a non-deterministic kernel: does a second straight run agree?
        again = tmp_path / "again"
        _train(again, f"train.steps={STEPS}", f"checkpoint.every={STEPS // 2}")
        deterministic = _losses(again) == straight
        pytest.fail(f"resumed losses differ from the straight run's ({'a resume defect: two straight runs agree' if deterministic else 'two straight runs differ too: a non-deterministic GPU kernel'})\n"
                    f"straight: {straight}\nresumed:  {resumed}")


def test_convert_eval_and_sample_of_a_gpu_run(reference_run, tmp_path):
    out = tmp_path / "consolidated"
    proc = _cli("convert", str(reference_run), "--out", str(out), "--weights", "ema")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _cli("eval", str(out), "--mc-samples", "2", "--max-batches", "2", "--batch-size", "4",
                "--json", str(tmp_path / "eval.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["bound"] == "subtoken_elbo" and math.isfinite(result["nll_per_token"]) and result["stderr"] > 0
    proc = _cli("eval", str(reference_run), "--mc-samples", "2", "--max-batches", "2", "--batch-size", "4",
                "--json", str(tmp_path / "sharded.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["nll_per_token"] == pytest.approx(result["nll_per_token"], abs=1e-6)
    proc = _cli("sample", str(out), "--num", "2", "--steps", "16", "--length", "32", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert len(samples["samples"]) == 2 and samples["invalid_codes"] == 0


# --------------------------------------------------------------------------- in-process: attention, RNG, loss


def _sdpa_ops(fn) -> set:
    """The aten scaled-dot-product kernels that fn() dispatched to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_flash_and_memory_efficient_sdpa_take_the_models_attention_in_bf16(single_process, head_dim):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from prime_scale.model import Block

    args = _args(hidden=256, heads=256 // head_dim)
    block = Block(args, layer_index=1).to("cuda", torch.bfloat16).train()
    x = torch.randn(2, args.seq_len, args.hidden, device="cuda", dtype=torch.bfloat16)

    def attend(backends):
        inp = x.clone().requires_grad_(True)
        with sdpa_kernel(backends):  # only these kernels may run: an unusable one raises
            out = block.attention(inp)
            out.float().square().mean().backward()
        torch.cuda.synchronize()
        return out.detach().float(), inp.grad.float()

    math_out, math_grad = attend([SDPBackend.MATH])
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        out, grad = attend([backend])
        torch.testing.assert_close(out, math_out, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(grad, math_grad, rtol=5e-2, atol=5e-2)
    # unrestricted, as in training: a fused kernel, never the math fallback
    ops = _sdpa_ops(lambda: block.attention(x))
    fused = {op for op in ops if any(k in op for k in ("flash", "efficient", "cudnn"))}
    assert fused and not any("math" in op for op in ops), ops


def test_building_the_model_leaves_the_cuda_rng_unchanged(single_process):
    from prime_scale.model import PrimeTransformer

    cuda_before, cpu_before = torch.cuda.get_rng_state(), torch.get_rng_state()
    PrimeTransformer(_args())
    PrimeTransformer(_args(ell=1))  # the vocab-parallel table path too
    assert torch.equal(torch.cuda.get_rng_state(), cuda_before), "building the model changed the CUDA RNG"
    assert torch.equal(torch.get_rng_state(), cpu_before), "building the model changed the CPU RNG"


def _case(V, ell, B=3, L=7, seed=0):
    """Random logits, tokens, t and masks (each digit masked with probability t; row 0 holds a fully
    masked, a fully visible and a partially masked token), the last row's tail not attended."""
    from prime_scale import prime

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (B, L), generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.1
    mask = torch.rand(B, L * ell, generator=g) < t.unsqueeze(-1)
    mask[0, :ell], mask[0, ell:3 * ell], mask[0, 3 * ell - 1] = True, False, True
    logits = torch.randn(B, L, V, generator=g) * 3.0
    attn = torch.ones(B, L, dtype=torch.bool)
    attn[-1, -2:] = False
    return logits, x0, prime.apply_mask(x0, mask, V, ell), t, attn


def _on_cuda(*tensors):
    return [t.cuda() if torch.is_tensor(t) else t for t in tensors]


@pytest.mark.parametrize("V,ell", [(50, 1), (64, 2), (100, 3)])
@pytest.mark.parametrize("objective", ["prime_elbo", "prime_joint"])
def test_vocab_parallel_loss_on_cuda_equals_the_dense_loss(V, ell, objective):
    """TP = 1 (one shard holds the whole vocabulary) on CUDA vs the dense prime_scale.prime reference
    (on the CPU, where the CPU tests check it). The host syncs of the parallel loss are listed."""
    from prime_scale import prime
    from prime_scale.model import vocab_parallel as vp

    logits, x0, yt, t, attn = _case(V, ell)
    ref = logits.clone().requires_grad_(True)
    ref_nll, ref_mean = prime.prime_loss(ref, x0, yt, t, attn, V, ell, objective, True)
    ref_mean.backward()
    lg, x0c, ytc, tc, attnc = _on_cuda(logits, x0, yt, t, attn)
    lg.requires_grad_(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            nll, mean = vp.prime_loss_parallel(lg, x0c, ytc, tc, attnc, V, ell, vocab_start=0, objective=objective,
                                               backward=True)
            mean.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(nll.cpu(), ref_nll.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.cpu(), ref_mean.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lg.grad.cpu(), ref.grad, rtol=1e-5, atol=1e-7)
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    _record_sync_sites(f"V={V} ell={ell} {objective}", sites)
    print(f"host syncs of prime_loss_parallel (V={V}, ell={ell}, {objective}): {sites or 'none'}")


def _record_sync_sites(case: str, sites: list) -> None:
    folder = os.environ.get("PRIME_SCALE_GPU_CHECK_DIR")
    if not folder:
        return
    path = Path(folder) / "sync_sites.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    known[case] = sites
    path.write_text(json.dumps(known, indent=1))
