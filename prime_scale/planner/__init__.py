"""The planner: what a recipe needs on N GPUs before anyone rents them (prime-scale plan).

shapes: per-rank parameters (stages cut as DeepSpeed cuts them, TP slices as megatron's layers);
memory: model state by ZeRO stage, activations, margin; traffic: communication, FLOPs, step time;
gpus: the GPU kinds; plan: the assembled plan and its table; dryrun: `plan --verify`, which builds
chosen ranks' real models on the meta device under a fake process group and checks the plan's
parameter counts and the layout against megatron and DeepSpeed.
"""
