"""Small trainable discriminator heads on the features of a frozen network.

f-distill puts them on the frozen teacher's features at the noisy input x_t; SMT on the
bottleneck of its score network; LADD and SDXL-Lightning put them on teacher blocks too.
A `FeatureDiscriminator` holds one head per feature map and returns the logits of all heads
concatenated, [B, K]; a caller that wants one number per sample averages over K (f-distill's
density ratio is exp(mean_K logits)).

Heads by feature rank, each feature as the network produced it:
    [B, C]        vector features (e.g. the Gaussian-mixture teacher's [x_t, v]): all of them are
                  concatenated and go through one MLP -> [B, 1]
    [B, N, C]     token features (transformer blocks, e.g. SD3/FLUX/SANA teachers' `features`): read as
                  [B, C, N] by Conv1d(k=1) block -> residual Conv1d(k=9) block -> spectral-norm Conv1d(k=1)
                  -> one logit per token [B, N]
    [B, C, H, W]  feature maps (UNets): conv 3x3 -> GroupNorm -> SiLU -> conv 3x3 -> GroupNorm -> SiLU
                  -> conv 1x1 -> one logit per position [B, H W]
Every head also sees the noise level t (a sinusoidal embedding added after its first layer): the
features already depend on t, but one head then serves every noise level with an explicit cue.
Heads normalise per sample (GroupNorm, never BatchNorm), so splitting a batch across processes does
not change any logit.

The token layout is converted inside `FeatureDiscriminator` (construction and forward alike), so every
objective hands it features exactly as `Teacher.features` or `module_features` return them; a caller
that joins two features along channels (Lightning's conditional head) uses `concat_channels`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from onestep.student import sinusoidal_embedding


def _groups(channels: int, most: int = 32) -> int:
    return math.gcd(channels, most)


class VectorHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int, emb_dim: int):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.t_proj = nn.Linear(emb_dim, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feature: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        return self.body(self.inp(feature) + self.t_proj(t_emb))


class ConvHead(nn.Module):
    def __init__(self, channels: int, hidden: int, emb_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.t_proj = nn.Linear(emb_dim, hidden)
        self.norm_in = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm_mid = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_out = nn.Conv2d(hidden, 1, 1)

    def forward(self, feature: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(feature) + self.t_proj(t_emb)[:, :, None, None]
        h = F.silu(self.norm_in(h))
        h = F.silu(self.norm_mid(self.conv_mid(h)))
        return self.conv_out(h).flatten(1)


class TokenHead(nn.Module):
    """LADD's head on token features channels first, [B, C, N] (FeatureDiscriminator transposes)."""

    def __init__(self, channels: int, hidden: int, emb_dim: int):
        super().__init__()
        self.conv_in = nn.Conv1d(channels, hidden, 1)
        self.t_proj = nn.Linear(emb_dim, hidden)
        self.norm_in = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_res = nn.Conv1d(hidden, hidden, 9, padding=4)
        self.norm_res = nn.GroupNorm(_groups(hidden), hidden)
        self.conv_out = nn.utils.parametrizations.spectral_norm(nn.Conv1d(hidden, 1, 1))

    def forward(self, feature: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm_in(self.conv_in(feature) + self.t_proj(t_emb)[:, :, None]))
        h = h + F.silu(self.norm_res(self.conv_res(h)))
        return self.conv_out(h).flatten(1)


class FeatureDiscriminator(nn.Module):
    """Heads for a list of features shaped like `example_features`; forward(features, t) -> [B, K]."""

    def __init__(self, example_features: Sequence[torch.Tensor], hidden: int = 64, emb_dim: int = 32,
                 time_scale: float = 1000.0):
        super().__init__()
        self.emb_dim, self.time_scale = emb_dim, time_scale
        ranks = [f.dim() for f in example_features]
        if any(r not in (2, 3, 4) for r in ranks):
            raise ValueError(f"discriminator features must be [B, C], [B, C, N] or [B, C, H, W], got ranks {ranks}")
        self.vector_index = [i for i, r in enumerate(ranks) if r == 2]
        vector_dim = sum(example_features[i].shape[1] for i in self.vector_index)
        self.vector_head = VectorHead(vector_dim, hidden, emb_dim) if self.vector_index else None
        self.other_index = [i for i, r in enumerate(ranks) if r != 2]
        head = {3: TokenHead, 4: ConvHead}
        self.heads = nn.ModuleList(
            head[ranks[i]](channels_first(example_features[i]).shape[1], hidden, emb_dim) for i in self.other_index)

    def forward(self, features: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        t_emb = sinusoidal_embedding(t.reshape(-1).float() * self.time_scale, self.emb_dim)
        logits = []
        if self.vector_head is not None:
            vec = torch.cat([features[i].flatten(1) for i in self.vector_index], dim=1)
            logits.append(self.vector_head(vec, t_emb.to(vec.dtype)))
        for i, head in zip(self.other_index, self.heads):
            logits.append(head(channels_first(features[i]), t_emb.to(features[i].dtype)))
        out = torch.cat(logits, dim=1)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # logits in fp32 under autocast


def channels_first(feature: torch.Tensor) -> torch.Tensor:
    """A feature as the heads take it: transformer tokens [B, N, C] become [B, C, N]; others unchanged."""
    return feature.transpose(1, 2) if feature.dim() == 3 else feature


def concat_channels(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two features of one layout joined along their channels: the last axis of tokens [B, N, C], axis 1
    of vectors [B, C] and maps [B, C, H, W]."""
    return torch.cat([first, second.to(first.dtype)], dim=-1 if first.dim() == 3 else 1)


#: diffusers blocks that return (text_stream, image_stream): SD3's joint blocks (text None in the last one),
#: FLUX's double and single blocks. A discriminator reads the image tokens, as the teacher adapters'
#: `features` do (teachers/flow_transformer/teacher.py).
TWO_STREAM_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def block_feature(module: nn.Module, output) -> torch.Tensor:
    """The activation a hooked block's output carries: the image stream of a two-stream block, else the
    first element of a tuple (diffusers UNet down blocks return (hidden_states, skips)) or the output."""
    if not isinstance(output, (tuple, list)):
        return output
    return output[-1] if type(module).__name__ in TWO_STREAM_BLOCKS else output[0]


def module_features(module: nn.Module, layers: Sequence[str], run: Callable[[], object]) -> list[torch.Tensor]:
    """Outputs of `module`'s submodules named in `layers` while `run()` executes (forward hooks, always
    removed). For discriminators on a network that is not a teacher, e.g. SMT's score network."""
    modules = dict(module.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown or not layers:
        raise ValueError(f"feature layers {unknown or list(layers)} not in {type(module).__name__}")
    found: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, _args, output):
            found[name] = block_feature(module, output)
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [found[name] for name in layers]


def find_module(net: nn.Module, name: str) -> str | None:
    """The dotted path of the first submodule of `net` whose own name is `name` (e.g. a UNet's `mid_block`, also
    inside a preconditioning wrapper such as EDM's), or None."""
    return next((path for path, _ in net.named_modules() if path.rsplit(".", 1)[-1] == name), None)
