"""The GPU kinds the planner knows: vendors' datasheet figures, printed with every plan.

Peak FLOP/s are dense bf16 tensor-core figures (no sparsity). Memory is what the device reports as
its total (the allocator can use a little less). NVLink is the per-GPU bandwidth in one direction
(half the bidirectional figure vendors quote); network is the per-GPU share of the inter-node
fabric (one 400 Gb/s NIC per GPU for the HGX systems, 200 Gb/s for A100 systems).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GpuKind:
    name: str
    peak_bf16_flops: float  # dense, per GPU
    memory_bytes: int
    nvlink_bytes_per_s: float  # per GPU, one direction, inside a node
    network_bytes_per_s: float  # per GPU, between nodes
    gpus_per_node: int = 8
    source: str = ""

    def describe(self) -> dict:
        return asdict(self)


KINDS = {g.name: g for g in (
    GpuKind("h100-80gb", 989e12, 80 * 10**9, 450e9, 50e9, source="NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 "
            "dense, 80 GB HBM3, NVLink 900 GB/s bidirectional; 400 Gb/s NIC per GPU"),
    GpuKind("h200", 989e12, 141 * 10**9, 450e9, 50e9, source="NVIDIA H200 SXM datasheet: 989 TFLOP/s bf16 dense, "
            "141 GB HBM3e, NVLink 900 GB/s bidirectional; 400 Gb/s NIC per GPU"),
    GpuKind("a100-80gb", 312e12, 80 * 10**9, 300e9, 25e9, source="NVIDIA A100 SXM4 datasheet: 312 TFLOP/s bf16 "
            "dense, 80 GB HBM2e, NVLink 600 GB/s bidirectional; 200 Gb/s NIC per GPU"),
    GpuKind("a100-40gb", 312e12, 40 * 10**9, 300e9, 25e9, source="NVIDIA A100 SXM4 40 GB datasheet"),
    GpuKind("b200", 2250e12, 180 * 10**9, 900e9, 50e9, source="NVIDIA B200 (HGX) datasheet: 2.25 PFLOP/s bf16 "
            "dense, 180 GB HBM3e usable, NVLink 1.8 TB/s bidirectional; 400 Gb/s NIC per GPU"),
    GpuKind("l40s", 362e12, 48 * 10**9, 32e9, 12.5e9, source="NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense, "
            "48 GB GDDR6, no NVLink (PCIe 4.0 x16, 32 GB/s one direction); 100 Gb/s NIC per GPU"),
)}


def gpu_kind(name: str) -> GpuKind:
    from prime_scale.errors import UserError

    if name not in KINDS:
        raise UserError(f"--gpu {name}: unknown GPU kind; known: {', '.join(sorted(KINDS))}")
    return KINDS[name]
