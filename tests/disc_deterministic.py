"""Helper for tests/test_disc_loss.py: ``--objective=energy+disc`` (stage 2) with per-sample draws fixed by (image,
step), so that a one-process and a two-process run of the same total batch compute the same per-sample losses (as
tests/aniso_deterministic.py does for the energy loss, whose script runs the training)."""

from __future__ import annotations

from typing import Any, Optional

import torch

import aniso_deterministic
from edm_aniso.disc_loss import EnergyDiscLoss
from edm_aniso.loss import spread
from torch_utils import persistence

CALLS = {'disc': 0}


@persistence.persistent_class
class DeterministicDiscLoss(EnergyDiscLoss):
    """Energy = ``aniso_deterministic.DeterministicStage2Loss``; the disc term's K, j and eps from the same kind of
    per-sample seed (offset so they differ from the energy term's draws)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(energy=dict(class_name='aniso_deterministic.DeterministicStage2Loss'), **kwargs)

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        loss = self.energy(net, images, labels, augment_pipe)
        ks, js, epss = [], [], []
        for image in images:
            gen = torch.Generator().manual_seed(aniso_deterministic.sample_seed(image, self.energy.step_index) ^ 1)
            k, j = self.disc.draw(1, generator=gen)
            ks.append(k)
            js.append(j)
            epss.append(torch.randn(image.shape, generator=gen))
        CALLS['disc'] += 1
        per_sample = self.disc.compute(net, images, labels, torch.cat(ks), torch.cat(js), torch.stack(epss))
        return loss + spread(per_sample, loss)
