"""Model parts in MLX: SigLIP vision towers, projectors, and the whole Llama 3-V."""
