"""The whole model against a PyTorch composition of the same parts and weights.

Each family is one config of the same MLX model: MiniCPM-Llama3-V 2.5 (NaViT strip
layout + resampler), the article's design (SigLIP + attention projector) and Bunny
(SigLIP up to its second-to-last layer + mlp2x_gelu).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models.cache import make_prompt_cache

from mlx_llama3v.config import ModelConfig
from mlx_llama3v.models.llama3v import Model
from references import (
    NAVIT,
    SIGLIP,
    TEXT,
    TorchAttentionProjector,
    TorchMLPProjector,
    TorchResampler,
    assert_close,
    hf_llama,
    hf_navit,
    hf_siglip,
    random_tiles,
    randomize,
    strip_nchw,
    to_mlx,
)

IMAGE_ID, OPEN_ID, CLOSE_ID = 5, 6, 7
QUERIES = 8


class Family:
    """One family's MLX config, PyTorch parts and reference image path."""

    def __init__(self, name):
        self.name = name
        self.llm, _ = hf_llama(TEXT, seed=1)
        D = TEXT["hidden_size"]
        if name == "minicpm_v2_5":
            self.vision = hf_navit()
            self.proj = randomize(TorchResampler(QUERIES, D, 32), seed=2)
            vision = dict(NAVIT, variant="navit", strip_positions=True)
            projector = dict(kind="resampler", num_queries=QUERIES)
            self.grids = [(3, 5), (4, 4), (2, 7)]
        else:
            self.vision = hf_siglip()
            vision = dict(SIGLIP, variant="siglip")
            self.grids = [(6, 6), (6, 6)]
            if name == "bunny":
                vision["feature_layer"] = -2
                self.proj = randomize(TorchMLPProjector(32, D), seed=2)
                projector = dict(kind="mlp2x_gelu")
            else:
                self.proj = randomize(TorchAttentionProjector(32, 4, 64, D), seed=2)
                projector = dict(kind="attention", num_attention_heads=4, intermediate_size=64)
        self.config = ModelConfig.from_dict(
            dict(
                family=name,
                vision_config=vision,
                projector_config=dict(projector, vision_hidden_size=32, text_hidden_size=D),
                text_config=self.llm.config.to_dict(),
                image_token_id=IMAGE_ID,
            )
        )

    def mlx_model(self):
        model = Model(self.config)
        weights = {
            **to_mlx(self.vision.state_dict(), "vision_tower."),
            **to_mlx(self.proj.state_dict(), "projector."),
            **to_mlx(self.llm.state_dict(), "language_model."),
        }
        model.load_weights(list(model.sanitize(weights).items()), strict=True)
        return model

    def tokens_per_tile(self, grid):
        return QUERIES if self.name == "minicpm_v2_5" else grid[0] * grid[1]

    def prompt(self, n_tiles, seed=0):
        """Text ids around <open> placeholder* <close> blocks, one per tile."""
        rng = np.random.default_rng(seed)
        text = lambda n: list(rng.integers(10, TEXT["vocab_size"], n))
        ids = [1] + text(3)
        for g in self.grids[:n_tiles]:
            ids += [OPEN_ID] + [IMAGE_ID] * self.tokens_per_tile(g) + [CLOSE_ID]
        return np.array([ids + text(6)])

    @torch.no_grad()
    def reference_logits(self, ids, tiles):
        embeds = self.llm.get_input_embeddings()(torch.from_numpy(ids))
        if tiles:
            feats = self.reference_features(tiles)
            embeds[torch.from_numpy(ids == IMAGE_ID)] = torch.cat(feats)
        return self.llm(inputs_embeds=embeds).logits

    def reference_features(self, tiles):
        p = NAVIT["patch_size"]
        if self.name == "minicpm_v2_5":
            x, mask = strip_nchw(tiles, p)
            hidden = self.vision(pixel_values=x, patch_attention_mask=mask).last_hidden_state
            grids = self.grids[: len(tiles)]
            return list(self.proj(hidden, grids))
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        out = self.vision(pixel_values=x, output_hidden_states=True)
        hidden = out.hidden_states[-2] if self.name == "bunny" else out.last_hidden_state
        return list(self.proj(hidden))


FAMILIES = ["minicpm_v2_5", "siglip_llama3", "bunny"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    fam = Family(request.param)
    return fam, fam.mlx_model()


@pytest.mark.parametrize("n_tiles", [0, 1, 2])
def test_logits_match_pytorch_composition(family, n_tiles):
    fam, model = family
    tiles = random_tiles(fam.grids[:n_tiles], SIGLIP["patch_size"], seed=n_tiles)
    ids = fam.prompt(n_tiles, seed=n_tiles)
    logits = model(ids, tiles=tiles)
    assert_close(logits, fam.reference_logits(ids, tiles))


def test_cached_decode_with_images_equals_full_pass(family):
    fam, model = family
    tiles = random_tiles(fam.grids, SIGLIP["patch_size"], seed=7)
    ids = fam.prompt(len(tiles), seed=7)
    full = model(ids, tiles=tiles)
    cache = make_prompt_cache(model.language_model)
    split = ids.shape[1] - 5
    steps = [model(ids[:, :split], tiles=tiles, cache=cache)]
    steps += [model(ids[:, i : i + 1], cache=cache) for i in range(split, ids.shape[1])]
    assert_close(mx.concatenate(steps, axis=1), np.array(full))


def test_placeholder_count_mismatch_is_a_clear_error(family):
    fam, model = family
    tiles = random_tiles(fam.grids[:1], SIGLIP["patch_size"])
    ids = fam.prompt(1)
    short = ids[:, np.r_[0 : ids.shape[1]][ids[0] != IMAGE_ID][:-1]]  # drop all placeholders
    short = np.concatenate([short, [[IMAGE_ID] * 3]], axis=1)
    with pytest.raises(ValueError, match=r"3 image placeholder tokens but the images give \d+"):
        model(short, tiles=tiles)


def test_image_features_reach_only_placeholder_positions(family):
    fam, model = family
    tiles = random_tiles(fam.grids[:1], SIGLIP["patch_size"])
    ids = fam.prompt(1)
    with_image = np.array(model.get_input_embeddings(ids, tiles))
    text_only = np.array(model.language_model.model.embed_tokens(mx.array(ids)))
    slots = ids == IMAGE_ID
    np.testing.assert_array_equal(with_image[~slots], text_only[~slots])
    assert np.abs(with_image[slots] - text_only[slots]).max() > 1e-3
