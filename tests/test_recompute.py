"""Activation recompute (model.recompute: none | selective | full).

- Training is unchanged by recompute: per-step losses and gradient norms of 3 steps, fp32 with
  dropout 0.1 (so the recompute must replay the forward's dropout masks: the global generator's
  for the residual dropout, megatron's per-TP-rank stream for attention dropout), are bitwise
  equal under none, selective and full, at TP=1 (DeepSpeed's engine), TP=2 (megatron's TP layers,
  their forward all-reduces run again in the recompute), PP=2 (DeepSpeed's pipeline engine, whose
  1F1B schedule runs later micro-batches' forwards before earlier backwards) and TP=1 under ZeRO-3
  (weights gathered again for the recompute). Bitwise is possible because torch's non-reentrant
  checkpoint keeps autograd's graph and recomputes the saved tensors with the same operations on
  the same inputs, and CPU kernels are deterministic (on a GPU, SDPA's backward kernels need not
  be, even between two runs of `none`).
- Recompute is not a no-op: the bytes autograd saves for the backward pass, counted with
  saved_tensors_hooks (each storage once, parameters left out), fall from none to selective to
  full, in one forward of a small model and in the first step of every layout above.
"""

from __future__ import annotations


import pytest
import torch

from harness.dist import launch

MODES = ("none", "selective", "full")
V, L, STEPS, ROWS = 300, 16, 3, 48
BASE = [f"model.vocab_size={V}", "model.layers=2", "model.hidden=64", "model.heads=4", f"model.seq_len={L}",
        "model.ell=2", "model.dropout=0.1", "model.objective=prime_elbo", "train.global_batch=8",
        "train.micro_batch=2", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.clip=1.0", f"train.steps={STEPS}"]


class SavedActivationBytes:
    """Context: bytes of the activations autograd saves for the backward pass while it is open.
    Each storage counts once (a tensor saved by two operations is held once); parameters are left
    out (they are held anyway). The storages are referenced until the context is garbage, so a
    freed one cannot be reused under the same address and be missed."""

    def __init__(self, parameters=()):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameter_storages:
            self.storages.setdefault(storage.data_ptr(), storage)
        return tensor

    @property
    def bytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


# --------------------------------------------------------------------------- the layouts (multi-process)


def run_modes(overrides: list):
    """For each recompute mode: a fresh parallel state and engine, STEPS training steps on fixed
    global batches; rank 0 returns losses, gradient norms and the bytes saved in step 0."""
    import torch.distributed as dist

    from harness.dist import port
    from prime_scale.config import load_recipe
    from prime_scale.engine import Engine
    from prime_scale.noise import make_batch
    from prime_scale.parallel import state as pstate

    data = torch.randint(0, V, (ROWS, L), generator=torch.Generator().manual_seed(0))
    records = {}
    for k, mode in enumerate(MODES):
        cfg = load_recipe("tiny-cpu", BASE + overrides + [f"model.recompute={mode}"])
        st = pstate.init(cfg, environ=port(k), timeout_s=120)  # seeds every RNG stream alike per mode
        engine = Engine(cfg, st, V)
        G, mb = cfg.train.global_batch, cfg.train.micro_batch
        losses, norms, saved = [], [], None
        for step in range(STEPS):
            batches = []
            for j in range(engine.gas):
                first = step * G + (j * st.dp + st.dp_rank) * mb
                index = torch.arange(first, first + mb)
                batches.append(make_batch(data[index % ROWS], index, index, seed=0, step=step, global_batch=G,
                                          vocab_size=V, ell=cfg.model.ell))
            if step == 0:
                with SavedActivationBytes(engine.module.parameters()) as counter:
                    result = engine.train_step(batches)
                saved = counter.bytes
            else:
                result = engine.train_step(batches)
            losses.append(result.loss)
            norms.append(result.grad_norm)
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, saved)
        records[mode] = {"losses": losses, "norms": norms, "saved": every_rank}
        dist.barrier()
        pstate.destroy()
    return records


LAYOUTS = {"tp1": (1, ["parallel.tp=1"]), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
           # ZeRO-3 releases the weights after each module's forward: the recompute must gather them again
           "tp1-zero3": (1, ["parallel.zero_stage=3"])}


@pytest.fixture(scope="module")
def layouts():
    return {name: launch(n, "test_recompute:run_modes", {"overrides": ov}, timeout=420)[0]
            for name, (n, ov) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_trains_bitwise_like_none(layouts, layout):
    runs = layouts[layout]
    reference = runs["none"]
    assert len(set(reference["losses"])) == STEPS and all(n is not None for n in reference["norms"])
    for mode in ("selective", "full"):
        assert runs[mode]["losses"] == reference["losses"], (layout, mode, runs[mode]["losses"], reference["losses"])
        assert runs[mode]["norms"] == reference["norms"], (layout, mode, runs[mode]["norms"], reference["norms"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_saves_less_in_every_layout(layouts, layout):
    runs = layouts[layout]
    for rank, (none, selective, full) in enumerate(zip(*(runs[m]["saved"] for m in MODES))):
        # every rank holds blocks (a pipeline stage holds one of the two), so every rank saves less
        assert full < selective < none, (layout, rank, none, selective, full)


# --------------------------------------------------------------------------- one process


def _blocks(mode: str, layers=3, hidden=64, heads=4, dropout=0.1):
    from prime_scale.config import ModelConfig
    from prime_scale.model import Block, ModelArgs

    args = ModelArgs(ModelConfig(layers=layers, hidden=hidden, heads=heads, dropout=dropout, recompute=mode),
                     vocab_size=100, seed=5)
    return torch.nn.Sequential(*(Block(args, layer_index=i + 1) for i in range(layers))).train()


def _forward_backward(blocks, h0):
    """Forward under the byte counter, then backward; the same RNG state for every mode."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    streams, cpu = tracker.get_states(), torch.get_rng_state()
    h = h0.clone().requires_grad_(True)
    with SavedActivationBytes(blocks.parameters()) as counter:
        out = blocks(h)
    # advance both streams between forward and backward, as later micro-batches would
    torch.rand(7)
    with tracker.fork():
        torch.rand(7)
    out.square().sum().backward()
    tracker.set_states(streams)
    torch.set_rng_state(cpu)
    return counter.bytes, out.detach(), h.grad, [p.grad for p in blocks.parameters()]


def test_saved_bytes_fall_from_none_to_selective_to_full_and_gradients_stay(single_process):
    B, layers, hidden, heads, seq = 2, 3, 64, 4, 32
    h0 = torch.randn(B, seq, hidden, generator=torch.Generator().manual_seed(1))
    results = {mode: _forward_backward(_blocks(mode, layers, hidden, heads), h0) for mode in MODES}
    saved = {mode: r[0] for mode, r in results.items()}
    activation = B * seq * hidden * 4  # one [B, L, D] fp32 tensor
    assert saved["full"] < saved["selective"] < saved["none"], saved
    # full keeps exactly the blocks' inputs
    assert saved["full"] <= layers * activation, (saved, layers * activation)
    # selective frees at least the rotated q and k and the attention matrices ([B, H, L, L], dropout on)
    assert saved["none"] - saved["selective"] >= layers * (2 * activation + B * heads * seq * seq * 4), saved
    none = results["none"]
    for mode in ("selective", "full"):
        out, grad_in, grads = results[mode][1:]
        assert torch.equal(out, none[1]), mode
        assert torch.equal(grad_in, none[2]), mode
        assert all(torch.equal(a, b) for a, b in zip(grads, none[3])), mode


def test_evaluation_never_recomputes(single_process):
    """model.eval() (validation, sampling) runs the plain blocks: it saves what none saves."""
    h0 = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2))
    saved = {}
    for mode in MODES:
        blocks = _blocks(mode).eval()
        with SavedActivationBytes(blocks.parameters()) as counter:
            blocks(h0.clone().requires_grad_(True))
        saved[mode] = counter.bytes
    assert saved["selective"] == saved["full"] == saved["none"] > 0, saved
