"""SigLIP-so400m's shape, shared by the benchmarks (each adds its ``image_size``:
384 for fixed-size SigLIP, 980 for MiniCPM's NaViT position table)."""

SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
