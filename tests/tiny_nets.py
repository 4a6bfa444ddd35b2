"""A tiny random EDM network for the sampler tests (test_multistep.py, test_stochastic.py)."""

import pytest
import torch

TINY = dict(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[])


def tiny_edm(label_dim: int = 0, seed: int = 0) -> torch.nn.Module:
    """EDMPrecond on TINY with its weights perturbed, so that the zero-initialised output layers matter."""
    networks = pytest.importorskip('training.networks')
    torch.manual_seed(seed)
    net = networks.EDMPrecond(label_dim=label_dim, **TINY).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net
