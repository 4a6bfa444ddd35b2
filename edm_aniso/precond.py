"""Anisotropic preconditioning around an EDM backbone (method.md §4).

``AnisoPrecond`` holds the raw U-Net of an EDM checkpoint (``self.model``, same parameter names as ``EDMPrecond``), the
learned schedules g and h (``KnotSchedule``, one row or one per class/group), the subspace P and the label maps. Every
coefficient is one scalar on P and one on P_perp, applied through ``subspace.apply``:

    c_in = (M + sd^2)^(-1/2),  c_skip = sd^2 (M + sd^2)^(-1),  c_out = sd M^(1/2) (M + sd^2)^(-1/2),
    c_noise = (ln g + ln h) / 16,  D = c_skip x + c_out F(c_in x, c_noise, y),  f = M^(-1/2) (D - x).

With g = h = sigma^2 every coefficient is EDMPrecond's, so EDM's samplers and tools work unchanged.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch

from torch_utils import persistence
from edm_aniso import schedule as sched
from edm_aniso import subspace as subs

# ----------------------------------------------------------------------------------------------------------------------


def _label_map(label_dim: int, groups: Optional[Sequence[int]], what: str) -> torch.Tensor:
    """class -> row map [max(label_dim, 1)] long; identity when groups is None."""
    n = max(int(label_dim), 1)
    if groups is None:
        return torch.arange(n, dtype=torch.long)
    groups = torch.as_tensor(list(groups), dtype=torch.long).flatten()
    if groups.numel() != label_dim:
        raise ValueError(f'{what}: the class->group map has {groups.numel()} entries, expected label_dim={label_dim}')
    if bool((groups < 0).any()):
        raise ValueError(f'{what}: group ids must be >= 0')
    return groups


@persistence.persistent_class
class AnisoPrecond(torch.nn.Module):
    """Preconditioner D(x; M_t, y) with M_t = g P + h P_perp (method.md §4); EDM-compatible call net(x, sigma, y)."""

    ema_raw_prefixes = ('schedule_g.', 'schedule_h.')   # EMA carries the raw schedules (method.md §5).

    def __init__(self,
        img_resolution: int,                    # Image resolution.
        img_channels:   int,                    # Number of colour channels.
        label_dim:      int     = 0,            # Number of class labels, 0 = unconditional.
        use_fp16:       bool    = False,        # Run the backbone in fp16 (CUDA only; stage 2 should stay fp32).
        sigma_min:      float   = 0.002,        # Lowest noise level the sampler uses.
        sigma_max:      float   = 80.0,         # Highest noise level; T = sigma_max^2.
        sigma_data:     float   = 0.5,          # Expected standard deviation of the data.
        model_type:     str     = 'SongUNet',   # Backbone class in training.networks.
        stage:          int     = 1,            # 1: learned isotropic g (h is g); 2: independent g and h.
        subspace:       str     = 'iso',        # 'iso' | 'dct' | 'pca' (method.md §3).
        dct_cutoff:     Optional[int] = None,   # DCT low block size m, None = resolution // 2.
        pca_rank:       Optional[int] = None,   # PCA rank k, None = the rank stored in the bases file.
        pca_bases:      Optional[str] = None,   # Path of a bases file from edm_aniso.pca (required for 'pca').
        per_class:      bool    = False,        # One schedule row per class (or group): a class bank.
        class_groups:   Optional[Sequence[int]] = None,  # class -> group map for the bank, None = one row per class.
        num_knots:      int     = 32,           # Knots K of each schedule.
        **model_kwargs: Any,                    # Backbone keyword arguments.
    ) -> None:
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f'stage must be 1 or 2, got {stage!r}')
        if per_class and label_dim == 0:
            raise ValueError('per_class schedules need a class-conditional network (label_dim > 0)')
        if class_groups is not None and not per_class:
            raise ValueError('class_groups applies only with per_class=True')
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.stage = int(stage)
        self.T = self.sigma_max ** 2

        # Backbone: imported lazily so that unpickling this module's source does not need training.networks.
        networks = importlib.import_module('training.networks')
        self.model = getattr(networks, model_type)(img_resolution=img_resolution, in_channels=img_channels,
                                                   out_channels=img_channels, label_dim=label_dim, **model_kwargs)

        # Schedules: a bank row per class or group when per_class; stage 1 aliases h to g (M = g I).
        row_map = _label_map(label_dim, class_groups, 'class_groups') if per_class \
            else torch.zeros(max(label_dim, 1), dtype=torch.long)
        num_rows = int(row_map.max()) + 1
        self.schedule_g = sched.KnotSchedule(num_rows=num_rows, num_knots=num_knots, T=self.T)
        self.schedule_h = self.schedule_g if stage == 1 else \
            sched.KnotSchedule(num_rows=num_rows, num_knots=num_knots, T=self.T)
        self.register_buffer('schedule_rows', row_map)

        # Subspace P and the class -> basis map.
        bases, basis_map = None, torch.zeros(max(label_dim, 1), dtype=torch.long)
        if subspace == 'pca':
            if pca_bases is None:
                raise ValueError("subspace='pca' needs pca_bases (a file from python -m edm_aniso.pca)")
            from edm_aniso import pca   # lazily: only building a PCA network reads a bases file
            data = pca.load_pca_file(pca_bases)
            bases = torch.as_tensor(data['bases'])
            if bases.ndim == 2:
                bases = bases.unsqueeze(0)
            if bases.ndim != 3 or bases.shape[1] != img_resolution ** 2:
                raise ValueError(f'{pca_bases!r}: bases of shape {tuple(bases.shape)} do not fit resolution '
                                 f'{img_resolution} (expected [num_bases, {img_resolution ** 2}, rank])')
            if pca_rank is not None:
                if pca_rank > bases.shape[2]:
                    raise ValueError(f'pca_rank={pca_rank} exceeds the rank {bases.shape[2]} stored in {pca_bases!r}')
                bases = bases[:, :, :pca_rank]
            if bases.shape[0] > 1:
                groups = data.get('groups')
                if groups is None and bases.shape[0] != label_dim:
                    raise ValueError(f'{pca_bases!r} holds {bases.shape[0]} bases but no class->group map, and the '
                                     f'network has label_dim={label_dim}')
                basis_map = _label_map(label_dim, None if groups is None else torch.as_tensor(groups).tolist(),
                                       'pca groups')
                if int(basis_map.max()) >= bases.shape[0]:
                    raise ValueError(f'{pca_bases!r}: a group id exceeds the number of bases {bases.shape[0]}')
            pca_rank = bases.shape[2]
        self.subspace = subs.make_subspace(subspace, img_resolution, cutoff=dct_cutoff, rank=pca_rank,
                                           num_bases=1 if bases is None else bases.shape[0], bases=bases)
        self.register_buffer('basis_rows', basis_map)

    # ------------------------------------------------------------------------------------------------------------------
    # Parameter groups and label maps.

    def network_parameters(self) -> list[torch.nn.Parameter]:
        """phi: the backbone's parameters."""
        return list(self.model.parameters())

    def schedule_parameters(self) -> list[torch.nn.Parameter]:
        """theta: the schedules' parameters (g only in stage 1, where h is g)."""
        params = list(self.schedule_g.parameters())
        if self.schedule_h is not self.schedule_g:
            params += list(self.schedule_h.parameters())
        return params

    def rows_for(self, class_labels: Optional[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(schedule row [B], basis id [B]) of each sample from one-hot labels (argmax; method.md §8.2-8.3).

        Unconditional networks map every sample to row 0. A conditional network given no labels is refused when it
        has a class bank or several bases (no default class), and so is an all-zero label row (EDM's "unconditional"
        input). A [1, label_dim] label row is broadcast to the batch.
        """
        device = self.schedule_rows.device
        banked = self.schedule_g.num_rows > 1 or self.subspace.num_bases > 1
        if self.label_dim == 0 or (class_labels is None and not banked):
            zeros = torch.zeros(batch, dtype=torch.long, device=device)
            return zeros, zeros
        if class_labels is None:
            raise ValueError('a class bank needs per-sample rows: pass class_labels')
        labels = torch.as_tensor(class_labels).reshape(-1, self.label_dim)
        if labels.shape[0] == 1 and batch > 1:
            labels = labels.expand(batch, -1)
        if labels.shape[0] != batch:
            raise ValueError(f'got {labels.shape[0]} label rows for a batch of {batch}')
        if banked and not bool((labels != 0).any(dim=1).all()):
            raise ValueError('a class bank needs a class per sample: got an all-zero label row (no default class)')
        cls = labels.argmax(dim=1).to(device)
        return self.schedule_rows[cls], self.basis_rows[cls]

    def schedules(self, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g, g_dot, h, h_dot) at per-sample times t [B] from each sample's own row (stage 1: h = g)."""
        t = torch.as_tensor(t).flatten()
        rows, _ = self.rows_for(class_labels, t.shape[0])
        g, g_dot = self.schedule_g(t, rows)
        if self.stage == 1:
            return g, g_dot, g, g_dot
        h, h_dot = self.schedule_h(t, rows)
        return g, g_dot, h, h_dot

    # ------------------------------------------------------------------------------------------------------------------
    # Coefficients, denoiser and flow.

    def coefficients(self, g: torch.Tensor, h: torch.Tensor) -> dict[str, Any]:
        """Per-sample scalars of method.md §4: c_in, c_skip, c_out as (on P, on P_perp) pairs, and c_noise."""
        sd2 = self.sigma_data ** 2
        c_in = ((g + sd2).rsqrt(), (h + sd2).rsqrt())
        c_skip = (sd2 / (g + sd2), sd2 / (h + sd2))
        c_out = (self.sigma_data * (g / (g + sd2)).sqrt(), self.sigma_data * (h / (h + sd2)).sqrt())
        c_noise = (g.log() + h.log()) / 16
        return dict(c_in=c_in, c_skip=c_skip, c_out=c_out, c_noise=c_noise)

    def _variances(self, x: torch.Tensor, sigma: Any, g: Any, h: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample fp32 (g, h) [B] from either sigma (g = h = sigma^2) or explicit g, h."""
        batch = x.shape[0]
        if g is None and h is None:
            if sigma is None:
                raise ValueError('AnisoPrecond needs sigma or (g, h)')
            s = torch.as_tensor(sigma, device=x.device).to(torch.float32).flatten()
            g = h = s.square()
        elif g is None or h is None:
            raise ValueError('pass both g and h (or sigma)')
        elif sigma is not None:
            raise ValueError('pass either sigma or (g, h), not both')
        g = torch.as_tensor(g, device=x.device).to(torch.float32).flatten()
        h = torch.as_tensor(h, device=x.device).to(torch.float32).flatten()
        if g.numel() == 1:
            g = g.expand(batch)
        if h.numel() == 1:
            h = h.expand(batch)
        if g.shape[0] != batch or h.shape[0] != batch:
            raise ValueError(f'g, h must be scalars or have one value per sample ({batch}), got {g.shape[0]}, '
                             f'{h.shape[0]}')
        if self.stage == 2:   # method.md §4: theta does not reach the conditioning in stage 2.
            g, h = g.detach(), h.detach()
        return g, h

    def forward(self, x: torch.Tensor, sigma: Any = None, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, *, g: Any = None, h: Any = None, basis_id: Optional[torch.Tensor] = None,
                **model_kwargs: Any) -> torch.Tensor:
        """Denoiser D(x; M, y) in fp32 (method.md §4); net(x, sigma, y) is EDMPrecond's call with g = h = sigma^2."""
        x = x.to(torch.float32)
        g, h = self._variances(x, sigma, g, h)
        if basis_id is None:
            _, basis_id = self.rows_for(class_labels, x.shape[0])
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c = self.coefficients(g, h)
        x_in = self.subspace.apply(x, *c['c_in'], basis_id=basis_id)
        F_x = self.model(x_in.to(dtype), c['c_noise'].flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise ValueError(f'the backbone returned {F_x.dtype}, expected {dtype}')
        skip = self.subspace.apply(x, *c['c_skip'], basis_id=basis_id)
        out = self.subspace.apply(F_x.to(torch.float32), *c['c_out'], basis_id=basis_id)
        return skip + out

    def flow(self, x: torch.Tensor, g: Any, h: Any, class_labels: Optional[torch.Tensor] = None,
             basis_id: Optional[torch.Tensor] = None, **model_kwargs: Any) -> torch.Tensor:
        """Flow head f = M^(-1/2) (D - x) (method.md §1, §4), fp32."""
        x = x.to(torch.float32)
        D = self(x, None, class_labels, g=g, h=h, basis_id=basis_id, **model_kwargs)
        g, h = self._variances(x, None, g, h)
        if basis_id is None:
            _, basis_id = self.rows_for(class_labels, x.shape[0])
        return self.subspace.apply(D - x, g.rsqrt(), h.rsqrt(), basis_id=basis_id)

    def round_sigma(self, sigma: Any) -> torch.Tensor:
        """Identity, as EDMPrecond."""
        return torch.as_tensor(sigma)

    # ------------------------------------------------------------------------------------------------------------------
    # Sampler levels and transfer.

    @torch.no_grad()
    def levels(self, sigmas: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
               batch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample clocks (a, b) [B, N+1] fp64 for EDM levels sigmas [N] (method.md §6 step 2).

        t_i = F_y^(-1)(sigma_i^2) with F = sqrt(g h); a_i = sqrt(g_y(t_i)), b_i = sqrt(h_y(t_i)); a_N = b_N = 0.
        Computed once per row present, then gathered per sample.
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if batch is None:
            batch = 1 if class_labels is None else torch.as_tensor(class_labels).reshape(-1, max(self.label_dim, 1)
                                                                                        ).shape[0]
        rows, _ = self.rows_for(class_labels, batch)
        lg = self.schedule_g.log_knots().to(torch.float64)
        lh = self.schedule_h.log_knots().to(torch.float64)
        tau = self.schedule_g.tau.to(torch.float64)
        present = torch.unique(rows)
        n = sigmas.shape[0]
        row_idx = present.repeat_interleave(n)
        v = sigmas.to(lg.device).repeat(present.shape[0])
        _, a_p, b_p = sched.split_at_levels(lg, lh, tau, v, row_idx)
        a_p, b_p = a_p.reshape(-1, n), b_p.reshape(-1, n)
        pos = torch.searchsorted(present, rows)
        zero = torch.zeros(batch, 1, dtype=torch.float64, device=a_p.device)
        return torch.cat([a_p[pos], zero], dim=1), torch.cat([b_p[pos], zero], dim=1)

    @staticmethod
    def transfer_note(network_kwargs: dict, src: Optional[torch.nn.Module]) -> Optional[str]:
        """train.py's preflight hook (docs/architecture.md): one warning line when a stage-2 run would not start from a
        stage-1 network, else None. `src` is the --transfer pickle's network, None without --transfer."""
        if network_kwargs.get('stage', 1) != 2:
            return None
        if src is None:
            return ('--stage=2 without --transfer trains the U-Net and both schedules from random initialisation; '
                    'the method starts stage 2 from a stage-1 pickle (--transfer=STAGE1.pkl)')
        if getattr(src, 'stage', None) is None:
            return (f'--stage=2 from a {type(src).__name__} pickle skips stage 1 (g and h start from the Karras '
                    f'schedule); the method runs --stage=1 --transfer=EDM.pkl first')
        return None

    @torch.no_grad()
    def transfer_from(self, src: torch.nn.Module) -> None:
        """Initialise from a network pickle's module (train.py --transfer).

        EDMPrecond (or any net with ``model``): copy the backbone by name. Stage-1 AnisoPrecond: copy the backbone and
        g, and in stage 2 set h <- g (method.md §2). Stage-2 AnisoPrecond into stage 2: copy the backbone and both
        schedules. Anything else is refused with a ValueError naming the mismatch.
        """
        if not hasattr(src, 'model'):
            raise ValueError(f'--transfer: {type(src).__name__} has no backbone (.model)')
        for attr in ('img_resolution', 'img_channels', 'label_dim'):
            if getattr(src, attr, getattr(self, attr)) != getattr(self, attr):
                raise ValueError(f'--transfer: {attr} differs ({getattr(src, attr)} in the pickle, '
                                 f'{getattr(self, attr)} here)')
        if abs(float(getattr(src, 'sigma_data', self.sigma_data)) - self.sigma_data) > 1e-12:
            raise ValueError(f'--transfer: sigma_data differs ({src.sigma_data} vs {self.sigma_data})')
        src_tensors = dict(src.model.named_parameters())
        src_tensors.update(dict(src.model.named_buffers()))
        dst_tensors = dict(self.model.named_parameters())
        dst_tensors.update((k, v) for k, v in self.model.named_buffers() if v is not None)
        missing = [k for k in dst_tensors if k not in src_tensors]
        wrong = [k for k in dst_tensors if k in src_tensors and src_tensors[k].shape != dst_tensors[k].shape]
        if missing or wrong:
            raise ValueError(f'--transfer: backbone mismatch (missing: {missing[:3]}, shape differs: {wrong[:3]}); '
                             'use the same --arch/--cbase/--cres/--augment as the pickle')
        for k, v in dst_tensors.items():
            v.copy_(src_tensors[k].detach())

        src_stage = getattr(src, 'stage', None)
        if not hasattr(src, 'schedule_g') or src_stage is None:
            return                                     # An EDM network: schedules keep their Karras init.
        if src_stage == 2 and self.stage == 1:
            raise ValueError('--transfer: cannot start stage 1 from a stage-2 AnisoPrecond')
        if src.schedule_g.num_rows not in (1, self.schedule_g.num_rows):
            raise ValueError(f'--transfer: the pickle has {src.schedule_g.num_rows} schedule rows, this network '
                             f'{self.schedule_g.num_rows} (check --per-class/--class-groups)')
        if src.schedule_g.num_rows > 1 and not torch.equal(src.schedule_rows.cpu(), self.schedule_rows.cpu()):
            raise ValueError('--transfer: the pickle maps classes to schedule rows differently (check --class-groups)')
        if src_stage == 2:   # h belongs to the pickle's P_perp: the split must be the same
            ours, theirs = self.subspace, src.subspace
            if (theirs.kind, theirs.rank, theirs.num_bases) != (ours.kind, ours.rank, ours.num_bases):
                raise ValueError(f'--transfer: the stage-2 pickle uses subspace {theirs.kind} (rank {theirs.rank}, '
                                 f'{theirs.num_bases} bases), this run {ours.kind} (rank {ours.rank}, '
                                 f'{ours.num_bases} bases)')
        self.schedule_g.load_rows_from(src.schedule_g)
        if self.stage == 2:
            self.schedule_h.load_rows_from(src.schedule_h if src_stage == 2 else src.schedule_g)

    def extra_repr(self) -> str:
        return (f'stage={self.stage}, subspace={self.subspace.kind}, rank={self.subspace.rank}, '
                f'rows={self.schedule_g.num_rows}, sigma_data={self.sigma_data:g}')
