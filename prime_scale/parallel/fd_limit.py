"""The open-file limit a training needs, checked (and raised where the hard limit allows) at start-up.

Every rank holds, besides what Python, torch and the libraries open (~120 descriptors measured for a
tiny run here, one process or four): a socket per peer in each gloo group it belongs to (world, TP,
DP, PP, model-parallel, DeepSpeed's pipeline grid), on rank 0 one TCPStore socket per rank, pipes to
each DataLoader worker, and up to 256 kept shard descriptors per split (data/descriptors.py, fewer
under a low limit). Under `ulimit -n 64` a training used to die in gloo's socket creation with a
traceback ("Too many open files", exit 1). The soft limit is the user's only by accident (a login
default); the hard limit is the administrator's: raise the soft limit up to what the job needs when
the hard limit allows it (as Ray and many launchers do), else stop with a named error.

Pure Python, like launch.py: checked before anything heavy is imported or any process is started.
"""

from __future__ import annotations

from typing import Optional

from prime_scale.errors import UserError

BASE = 256  # the interpreter, torch, DeepSpeed, megatron, logs and checkpoint files, with margin
PER_PEER = 8  # sockets per other rank, over the process groups a rank joins
PER_WORKER = 4  # pipes and queues per DataLoader worker
SHARDS = 64  # the data's kept descriptors at the least (data/descriptors.py: an eighth of what the limit leaves free)


def descriptors_needed(world_size: int, num_workers: int, gloo: bool = True) -> int:
    """About the open files one rank of a training of `world_size` ranks needs. gloo (CPU) keeps a
    full mesh of sockets in every group; NCCL (create_gloo_process_groups=False) does not grow per
    peer: only rank 0's TCPStore holds a socket per rank."""
    peers = PER_PEER * max(0, world_size - 1) if gloo else 0
    return BASE + peers + world_size + PER_WORKER * num_workers + SHARDS


def ensure_open_file_limit(world_size: int, num_workers: int, gloo: bool = True, *, resource=None) -> Optional[str]:
    """Raise this process's soft RLIMIT_NOFILE to what the job needs (children inherit it); a note
    when it was raised, None when nothing changed; UserError when the hard limit is too low."""
    if resource is None:
        import resource
    need = descriptors_needed(world_size, num_workers, gloo)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    if soft == infinite or soft >= need:
        return None
    if hard != infinite and hard < need:
        raise UserError(
            f"the open-file limit is {soft} (hard limit {hard}), but a training of {world_size} rank(s) with "
            f"data.num_workers={num_workers} needs about {need} open files per rank (sockets to its peers, data "
            f"shards, worker pipes); raise it before launching: `ulimit -n {max(need, 4096)}` in the job script "
            "(the hard limit too: `ulimit -Hn`, /etc/security/limits.conf or LimitNOFILE= for a service)")
    target = min(hard, max(need, 4 * need)) if hard != infinite else 4 * need
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return (f"note: raised the open-file limit from {soft} to {target} (hard limit "
            f"{'unlimited' if hard == infinite else hard}): a training of {world_size} rank(s) needs about {need}")
