"""Helpers for tests/test_aniso_distributed.py: a stage-2 loss whose random draws do not depend on the process layout.

The training loop seeds every rank differently, so the draws of ``AnisoStage2Loss`` (t, eps, Hutchinson probes)
differ between a one-process and a two-process run of the same total batch. ``DeterministicStage2Loss`` instead
derives each sample's t, eps and probes from a generator seeded by a hash of that sample's image and the loop's step
index (``begin_step``). Every global batch holds the same samples whatever the number of ranks, so both layouts then
compute the same per-sample losses and, after the loop's gradient average, take the same optimizer steps.

Run as a script (under torchrun) it trains with the keyword arguments in a JSON file and saves this rank's live
network parameters, at the first loss call and after training, as ``<run_dir>/params-rank<r>.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Optional

import torch

from edm_aniso.loss import AnisoStage2Loss
from torch_utils import persistence

# The live network the loss last saw and its parameters at the first call (a module global, not an attribute of the
# loss, so that snapshots do not pickle the network a second time inside loss_fn).
LIVE: dict[str, Any] = {}


def sample_seed(image: torch.Tensor, step: int) -> int:
    """A 63-bit seed from one image's bytes and the step index."""
    digest = hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes() + int(step).to_bytes(8, 'little'))
    return int.from_bytes(digest.digest()[:8], 'little') >> 1


@persistence.persistent_class
class DeterministicStage2Loss(AnisoStage2Loss):
    """``AnisoStage2Loss`` with the estimator always on and per-sample draws fixed by (image, step)."""

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        if augment_pipe is not None:
            raise ValueError('DeterministicStage2Loss draws no augmentation: pass augment_pipe=None')
        if 'init' not in LIVE:
            LIVE['init'] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        LIVE['net'] = net
        T = float(net.schedule_g.T)
        ts, epss, probes = [], [], []
        for image in images:
            gen = torch.Generator().manual_seed(sample_seed(image, self.step_index))
            u = torch.rand([1], generator=gen, dtype=torch.float64)
            ts.append((self.t_min + (T - self.t_min) * u).to(torch.float32))
            epss.append(torch.randn(image.shape, generator=gen))
            probes.append(torch.randn([self.probes, *image.shape], generator=gen))
        t = torch.cat(ts).to(images.device)
        eps = torch.stack(epss).to(images.device)
        probe_noise = torch.stack(probes, dim=1).to(images.device)      # [probes, B, C, H, W]
        return self.compute(net, images, labels, t, eps, aug=None, probe_noise=probe_noise, estimator=True)


def assert_updates_agree(one: dict, two: dict, init: dict) -> None:
    """A two-rank run's state dict equals the one-process run's up to float32 rounding (batch-4 vs batch-8 kernels,
    summation order of the per-sample terms and of the cross-rank mean, which SGD carries into the weights
    unamplified), and not vacuously: phi and theta both moved far beyond the tolerance, and the runs' updates agree to
    1e-4 of the largest update (a skipped or doubled gradient average, or different draws, would be off by O(1))."""
    moved = {'network': 0.0, 'schedule': 0.0}   # largest |final - init| per group
    apart = {'network': 0.0, 'schedule': 0.0}   # largest |two ranks - one process| per group
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
        if one[key].is_floating_point():
            group = 'schedule' if key.startswith('schedule_') else 'network'
            moved[group] = max(moved[group], (one[key] - init[key]).abs().max().item())
            apart[group] = max(apart[group], (two[key] - one[key]).abs().max().item())
    for group in moved:
        assert moved[group] > 1e-3, (group, moved[group])
        assert apart[group] < 1e-4 * moved[group], (group, apart[group], moved[group])


def main() -> None:
    """``python aniso_deterministic.py KWARGS.json`` (under torchrun): train, then save this rank's parameters."""
    import aniso_deterministic as me   # the module the loop's class_name imports (this file runs as __main__)
    from torch_utils import distributed as dist
    from training.training_loop import training_loop

    with open(sys.argv[1]) as f:
        kwargs = json.load(f)
    dist.init(kwargs.get('device', 'cpu'))
    training_loop(**kwargs)
    net = me.LIVE['net']
    data = dict(init=me.LIVE['init'], final={k: v.detach().clone() for k, v in net.state_dict().items()})
    torch.save(data, os.path.join(kwargs['run_dir'], f'params-rank{dist.get_rank()}.pt'))
    dist.barrier()


if __name__ == '__main__':
    main()
