"""Process groups and parallel layout (megatron-core + DeepSpeed), and CPU compatibility."""
