"""Backbones (SongUNet = DDPM++/NCSN++, DhariwalUNet = ADM) and the VP/VE/iDDPM/EDM preconditioners.

Drop-in for EDM's ``training/networks.py`` (edm-interface.md §2.1-2.2): same constructor arguments, attribute,
parameter and buffer names, and numerics, so an EDM state dict loads with ``strict=True`` and gives the same outputs.

This file's text is embedded in every network pickle (torch_utils.persistence, edm-interface.md §4.1) and may be
exec'd by a stock EDM checkout, so besides the standard library it imports only numpy, torch and torch_utils.
"""

from typing import NamedTuple

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

# --------------------------------------------------------------------------------------------------------------------
# Initialisation (edm-interface.md §2.2 "Weight-init formula").


def weight_init(shape: list, mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Draw a tensor of `shape` with one of EDM's four init schemes (xavier/kaiming, uniform/normal)."""
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform '
                     f'or kaiming_normal')


def _init_pair(weight_shape: list, bias: bool, init_mode: str, init_weight: float, init_bias: float,
               fan_in: int, fan_out: int) -> tuple:
    """Weight and (optional) bias parameters; the bias is drawn with the weight's fans, then scaled by init_bias."""
    w = torch.nn.Parameter(weight_init(weight_shape, init_mode, fan_in, fan_out) * init_weight)
    b = torch.nn.Parameter(weight_init([weight_shape[0]], init_mode, fan_in, fan_out) * init_bias) if bias else None
    return w, b


# --------------------------------------------------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer y = x W^T + b; parameters are cast to the input dtype at call time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = 'kaiming_normal',
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight, self.bias = _init_pair([out_features, in_features], bias, init_mode, init_weight, init_bias,
                                            fan_in=in_features, fan_out=out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight.to(x.dtype).t())
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def _depthwise(f: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat a [1, 1, F, F] filter into a depthwise kernel [channels, 1, F, F]."""
    return f.expand(channels, 1, *f.shape[2:]).contiguous()


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """k x k convolution ('same' padding) with optional 2x up/down resampling by the filter outer(r, r) / (sum r)^2.

    kernel=0 gives a pure resampler (no weight, no bias). fused_resample merges the resampling with the conv
    (EDM's option; NCSN++'s aux_residual uses the fused down path).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: list = [1, 1], fused_resample: bool = False,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError('Conv2d: up and down cannot both be set')
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        if kernel:
            fan = kernel * kernel
            self.weight, self.bias = _init_pair([out_channels, in_channels, kernel, kernel], bias, init_mode,
                                                init_weight, init_bias, fan_in=in_channels * fan,
                                                fan_out=out_channels * fan)
        else:
            self.weight, self.bias = None, None
        r = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(r, r).reshape(1, 1, len(r), len(r)) / r.sum().square()
        self.register_buffer('resample_filter', f if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        conv, conv_t = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d

        if w is not None and self.fused_resample and self.up:
            x = conv_t(x, _depthwise(f * 4, self.in_channels), stride=2, groups=self.in_channels,
                       padding=max(f_pad - w_pad, 0))
            x = conv(x, w, padding=max(w_pad - f_pad, 0))
        elif w is not None and self.fused_resample and self.down:
            x = conv(x, w, padding=w_pad + f_pad)
            x = conv(x, _depthwise(f, self.out_channels), stride=2, groups=self.out_channels)
        else:
            if self.up:
                x = conv_t(x, _depthwise(f * 4, self.in_channels), stride=2, groups=self.in_channels, padding=f_pad)
            elif self.down:
                x = conv(x, _depthwise(f, self.in_channels), stride=2, groups=self.in_channels, padding=f_pad)
            if w is not None:
                x = conv(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups (EDM: 32 groups, >= 4 ch each)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                              self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q^T k / sqrt(C)) for q, k of shape [N, C, L], evaluated in fp32.

    Returns [N, Lq, Lk] in q's dtype; the backward pass is also evaluated in fp32 and saves only q, k and the weights.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = torch.bmm(q.to(torch.float32).transpose(1, 2), (k / np.sqrt(k.shape[1])).to(torch.float32))
        w = torch.softmax(logits, dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, w)
        return w

    @staticmethod
    def backward(ctx, dw: torch.Tensor) -> tuple:
        q, k, w = ctx.saved_tensors
        w32, dw32 = w.to(torch.float32), dw.to(torch.float32)
        dlogits = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))  # softmax Jacobian-vector product
        root_c = np.sqrt(k.shape[1])
        dq = torch.bmm(k.to(torch.float32), dlogits.transpose(1, 2)).to(q.dtype) / root_c
        dk = torch.bmm(q.to(torch.float32), dlogits).to(k.dtype) / root_c
        return dq, dk


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block with optional up/down resampling and self-attention, covering DDPM++, NCSN++ and ADM.

    adaptive_scale=True (ADM): h = SiLU(shift + norm1(h) * (scale + 1)); otherwise (Song): h = SiLU(norm1(h + e)).
    The residual sum and the attention output are both multiplied by skip_scale.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int = None, channels_per_head: int = 64, dropout: float = 0,
                 skip_scale: float = 1, eps: float = 1e-5, resample_filter: list = [1, 1],
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict = None,
                 init_zero: dict = None, init_attn: dict = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        init_attn = init if init_attn is None else init_attn
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        affine_out = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(in_features=emb_channels, out_features=affine_out, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if in_channels != out_channels or up or down:
            skip_kernel = 1 if (resample_proj or in_channels != out_channels) else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=skip_kernel, **resample,
                               **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(silu(self.norm0(x)))
        e = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = e.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h + e))
        h = self.conv1(torch.nn.functional.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self._attend(self.qkv(self.norm2(h)), h.shape)) + h) * self.skip_scale
        return h

    def _attend(self, qkv: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Multi-head attention over pixels; qkv channels are grouped (head, channel, {q,k,v})."""
        n, c, hgt, wid = shape
        q, k, v = qkv.reshape(n * self.num_heads, c // self.num_heads, 3, hgt * wid).unbind(2)
        w = AttentionOp.apply(q, k)                              # [N*heads, L_q, L_k]
        return torch.bmm(v, w.transpose(1, 2)).reshape(shape)    # out[c, q] = sum_k v[c, k] w[q, k]


# --------------------------------------------------------------------------------------------------------------------
# Noise-level embeddings.


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding cat(cos(x f), sin(x f)), f_i = (1/max_positions)^(i / (C/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(bool(self.endpoint)))
        freqs = (1 / self.max_positions) ** exponent
        arg = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features cat(cos(2 pi x f), sin(2 pi x f)) with a buffer f ~ N(0, scale^2) of length C/2."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def _swap_halves(emb: torch.Tensor) -> torch.Tensor:
    """(cos, sin) -> (sin, cos), as SongUNet expects."""
    half = emb.shape[1] // 2
    return torch.cat([emb[:, half:], emb[:, :half]], dim=1)


def _drop_labels(labels: torch.Tensor, p: float, batch: int) -> torch.Tensor:
    """Zero each sample's label vector with probability p (label dropout, training only)."""
    keep = torch.rand([batch, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# --------------------------------------------------------------------------------------------------------------------
# The U-Net trunk, shared by both backbones.
#
# Each backbone keeps its modules in two ModuleDicts, `enc` and `dec`, keyed '<res>x<res>_<part>'
# (edm-interface.md §2.2). `_trunk_plan` lists the trunk parts of every resolution level in registration order with
# their channel counts; registration order is also the order in which initial values are drawn, so it is written down
# once, here. The backbones turn the plan into modules (adding SongUNet's aux paths) and run it level by level.


class _Part(NamedTuple):
    """One trunk module: its key suffix ('conv', 'down', 'up', 'in0', 'in1', 'block<i>') and its channels."""
    name: str
    cin: int
    cout: int
    attention: bool = False


class _Level(NamedTuple):
    """One resolution level of the encoder or the decoder."""
    tag: str        # '<res>x<res>'
    index: int      # 0 = full resolution
    parts: list     # [_Part, ...] in registration order


def _trunk_plan(img_resolution: int, in_channels: int, stem_channels: int, widths: list, num_blocks: int,
                attn_resolutions: list, decoder_attention_last_only: bool) -> tuple:
    """(encoder levels, decoder levels) of the U-Net trunk.

    Encoder level l works at img_resolution / 2^l: a 3x3 'conv' (in_channels -> stem_channels) at l = 0, a 'down'
    block elsewhere, then num_blocks blocks 'block<i>' ending at widths[l] channels. The decoder goes from the lowest
    level up: 'in0' (with attention) and 'in1' at the lowest level, an 'up' block elsewhere, then num_blocks + 1
    blocks, each fed its input concatenated with the newest encoder output not used yet. Blocks at a resolution in
    attn_resolutions get attention; in the decoder, with decoder_attention_last_only, only the level's last block.
    """
    encoder, decoder = [], []
    ch = in_channels
    for index, width in enumerate(widths):
        res = img_resolution >> index
        opening = _Part('conv', ch, stem_channels) if index == 0 else _Part('down', ch, ch)
        parts, ch = [opening], opening.cout
        for i in range(num_blocks):
            parts.append(_Part(f'block{i}', ch, width, res in attn_resolutions))
            ch = width
        encoder.append(_Level(f'{res}x{res}', index, parts))

    unused = [part.cout for level in encoder for part in level.parts]   # every encoder output feeds one decoder block
    for index in range(len(widths) - 1, -1, -1):
        res, width = img_resolution >> index, widths[index]
        if index == len(widths) - 1:
            parts = [_Part('in0', ch, ch, attention=True), _Part('in1', ch, ch)]
        else:
            parts = [_Part('up', ch, ch)]
        for i in range(num_blocks + 1):
            attend = res in attn_resolutions and (i == num_blocks or not decoder_attention_last_only)
            parts.append(_Part(f'block{i}', ch + unused.pop(), width, attend))
            ch = width
        decoder.append(_Level(f'{res}x{res}', index, parts))
    return encoder, decoder


def _trunk_module(part: _Part, block_kwargs: dict, stem_init: dict) -> torch.nn.Module:
    """The module for one planned part: the stem conv, or a UNetBlock (resampling for 'up' / 'down')."""
    if part.name == 'conv':
        return Conv2d(in_channels=part.cin, out_channels=part.cout, kernel=3, **stem_init)
    resampling = {part.name: True} if part.name in ('up', 'down') else {}
    return UNetBlock(in_channels=part.cin, out_channels=part.cout, attention=part.attention, **resampling,
                     **block_kwargs)


def _build_trunk(levels: list, block_kwargs: dict, stem_init: dict, extras=None) -> torch.nn.ModuleDict:
    """Instantiate planned levels in order. `extras(level, part)` may return {part name: module} to register right
    after `part` (part=None: at the end of the level)."""
    modules = torch.nn.ModuleDict()
    for level in levels:
        for part in level.parts + [None]:
            if part is not None:
                modules[f'{level.tag}_{part.name}'] = _trunk_module(part, block_kwargs, stem_init)
            for name, module in (extras(level, part) if extras else {}).items():
                modules[f'{level.tag}_{name}'] = module
    return modules


def _by_level(modules: torch.nn.ModuleDict) -> list:
    """The entries of `enc` or `dec` grouped by resolution, in order: [{part name: module}, ...]."""
    levels: dict = {}
    for key, module in modules.items():
        tag, name = key.split('_', 1)
        levels.setdefault(tag, {})[name] = module
    return list(levels.values())


def _open_level(parts: dict, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """An encoder level's first step: the stem conv (level 0) or the down block."""
    return parts['conv'](x) if 'conv' in parts else parts['down'](x, emb)


def _encoder_blocks(parts: dict, x: torch.Tensor, emb: torch.Tensor, skips: list) -> torch.Tensor:
    """An encoder level's blocks, each output kept in `skips` for the decoder."""
    for name, module in parts.items():
        if name.startswith('block'):
            x = module(x, emb)
            skips.append(x)
    return x


def _decoder_trunk(parts: dict, x: torch.Tensor, emb: torch.Tensor, skips: list) -> torch.Tensor:
    """A decoder level's trunk: in0/in1 or up on x, then every block on cat(x, newest skip); aux parts are skipped."""
    for name, module in parts.items():
        if name.startswith('block'):
            x = module(torch.cat([x, skips.pop()], dim=1), emb)
        elif not name.startswith('aux'):
            x = module(x, emb)
    return x


# --------------------------------------------------------------------------------------------------------------------
# Backbones.


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (edm-interface.md §2.2); train.py's ddpmpp and ncsnpp presets."""

    def __init__(self,
        img_resolution: int,                # Image resolution at input and output.
        in_channels: int,                   # Input colour channels.
        out_channels: int,                  # Output colour channels.
        label_dim: int = 0,                 # Number of class labels; 0 = unconditional.
        augment_dim: int = 0,               # Augmentation label size; 0 = no augmentation labels.
        model_channels: int = 128,          # Base channel count.
        channel_mult: list = [1, 2, 2, 2],  # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,          # Embedding size = model_channels * channel_mult_emb.
        num_blocks: int = 4,                # Residual blocks per level.
        attn_resolutions: list = [16],      # Resolutions that get self-attention.
        dropout: float = 0.10,              # Dropout inside the residual blocks.
        label_dropout: float = 0,           # Probability of dropping the class label (training only).
        embedding_type: str = 'positional', # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int = 1,        # Noise embedding size = model_channels * channel_mult_noise.
        encoder_type: str = 'standard',     # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type: str = 'standard',     # 'standard' or 'skip'.
        resample_filter: list = [1, 1],     # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        for name, value, allowed in (('embedding_type', embedding_type, ('positional', 'fourier')),
                                     ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                     ('decoder_type', decoder_type, ('standard', 'skip'))):
            if value not in allowed:
                raise ValueError(f'SongUNet: {name}={value!r} is not one of {", ".join(allowed)}')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        xavier = dict(init_mode='xavier_uniform')
        xavier_tiny = dict(xavier, init_weight=1e-5)           # output convs start near zero
        xavier_qkv = dict(xavier, init_weight=np.sqrt(0.2))     # attention projections
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=xavier,
                     init_zero=xavier_tiny, init_attn=xavier_qkv)

        # Mapping network (registration order = EDM's draw order: noise, label, augment, layer0, layer1).
        if embedding_type == 'fourier':
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        else:
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **xavier) if label_dim else None
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **xavier)
                            if augment_dim else None)
        self.map_layer0, self.map_layer1 = (Linear(in_features=fan_in, out_features=emb_channels, **xavier)
                                            for fan_in in (noise_channels, emb_channels))

        encoder, decoder = _trunk_plan(img_resolution, in_channels, stem_channels=model_channels,
                                       widths=[model_channels * m for m in channel_mult], num_blocks=num_blocks,
                                       attn_resolutions=attn_resolutions, decoder_attention_last_only=True)

        # Encoder aux path ('skip': downsampled input added after each down block; 'residual': a strided conv of the
        # running aux signal, averaged in with sqrt(1/2)), registered right after the level's down block.
        aux_channels = [in_channels]

        def encoder_aux(level: _Level, part) -> dict:
            if part is None or part.name != 'down' or encoder_type == 'standard':
                return {}
            if encoder_type == 'skip':
                cin = aux_channels[0]
                return dict(aux_down=Conv2d(in_channels=cin, out_channels=cin, kernel=0, down=True,
                                            resample_filter=resample_filter),
                            aux_skip=Conv2d(in_channels=cin, out_channels=part.cout, kernel=1, **xavier))
            conv = Conv2d(in_channels=aux_channels[0], out_channels=part.cout, kernel=3, down=True,
                          resample_filter=resample_filter, fused_resample=True, **xavier)
            aux_channels[0] = part.cout
            return dict(aux_residual=conv)

        # Output heads (norm + conv to out_channels) at the end of a decoder level: every level with the 'skip'
        # decoder, else only the last; a head above another first upsamples the running output.
        heads = []

        def decoder_heads(level: _Level, part) -> dict:
            if part is not None or not (decoder_type == 'skip' or level.index == 0):
                return {}
            width = level.parts[-1].cout
            head = {}
            if heads:
                head['aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True,
                                        resample_filter=resample_filter)
            head['aux_norm'] = GroupNorm(num_channels=width, eps=1e-6)
            head['aux_conv'] = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **xavier_tiny)
            heads.append(level.tag)
            return head

        self.enc = _build_trunk(encoder, block, xavier, extras=encoder_aux)
        self.dec = _build_trunk(decoder, block, xavier, extras=decoder_heads)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor = None,
                augment_labels: torch.Tensor = None) -> torch.Tensor:
        """F(x; c_noise, labels): noise_labels [N] or [1], class_labels [N or 1, label_dim] or None."""
        emb = _swap_halves(self.map_noise(noise_labels))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, self.label_dropout, x.shape[0])
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for parts in _by_level(self.enc):
            x = _open_level(parts, x, emb)
            if 'aux_skip' in parts:
                aux = parts['aux_down'](aux)
                x = x + parts['aux_skip'](aux)
            elif 'aux_residual' in parts:
                aux = (x + parts['aux_residual'](aux)) / np.sqrt(2)
                x = aux
            skips.append(x)
            x = _encoder_blocks(parts, x, emb, skips)

        out = None
        for parts in _by_level(self.dec):
            x = _decoder_trunk(parts, x, emb, skips)
            if 'aux_conv' in parts:
                head = parts['aux_conv'](silu(parts['aux_norm'](x)))
                out = head if out is None else parts['aux_up'](out) + head
        return out


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol (edm-interface.md §2.2); train.py's adm preset."""

    def __init__(self,
        img_resolution: int,                 # Image resolution at input and output.
        in_channels: int,                    # Input colour channels.
        out_channels: int,                   # Output colour channels.
        label_dim: int = 0,                  # Number of class labels; 0 = unconditional.
        augment_dim: int = 0,                # Augmentation label size; 0 = no augmentation labels.
        model_channels: int = 192,           # Base channel count.
        channel_mult: list = [1, 2, 3, 4],   # Channel multiplier per resolution level.
        channel_mult_emb: int = 4,           # Embedding size = model_channels * channel_mult_emb.
        num_blocks: int = 3,                 # Residual blocks per level.
        attn_resolutions: list = [32, 16, 8],  # Resolutions that get self-attention.
        dropout: float = 0.10,               # Dropout inside the residual blocks.
        label_dropout: float = 0,            # Probability of dropping the class label (training only).
    ):
        uniform = dict(init_mode='kaiming_uniform')
        init = dict(uniform, init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(uniform, init_weight=0, init_bias=0)
        emb_channels = model_channels * channel_mult_emb
        widths = [model_channels * m for m in channel_mult]
        super().__init__()
        self.label_dropout = label_dropout

        # Mapping network (registration order = EDM's draw order: noise, augment, layer0, layer1, label).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0, self.map_layer1 = (Linear(in_features=fan_in, out_features=emb_channels, **init)
                                            for fan_in in (model_channels, emb_channels))
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                 init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None)

        encoder, decoder = _trunk_plan(img_resolution, in_channels, stem_channels=widths[0], widths=widths,
                                       num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                                       decoder_attention_last_only=False)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)
        self.enc = _build_trunk(encoder, block, init)
        self.dec = _build_trunk(decoder, block, init)
        self.out_norm = GroupNorm(num_channels=widths[0])
        self.out_conv = Conv2d(in_channels=widths[0], out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor = None,
                augment_labels: torch.Tensor = None) -> torch.Tensor:
        """F(x; c_noise, labels): noise_labels [N] or [1], class_labels [N or 1, label_dim] or None."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = _drop_labels(labels, self.label_dropout, x.shape[0])
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        skips = []
        for parts in _by_level(self.enc):
            x = _open_level(parts, x, emb)
            skips.append(x)
            x = _encoder_blocks(parts, x, emb, skips)
        for parts in _by_level(self.dec):
            x = _decoder_trunk(parts, x, emb, skips)
        return self.out_conv(silu(self.out_norm(x)))


# --------------------------------------------------------------------------------------------------------------------
# Preconditioners (edm-interface.md §2.1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).


def _build_backbone(model_type: str, **kwargs) -> torch.nn.Module:
    """Instantiate the backbone class named `model_type` from this module."""
    cls = globals().get(model_type)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or model_type.endswith('Precond'):
        raise ValueError(f'unknown model_type {model_type!r}; expected SongUNet or DhariwalUNet')
    return cls(**kwargs)


class _PrecondBase(torch.nn.Module):
    """Shared input handling of the four preconditioners (edm-interface.md §2.1, forward steps 1-6)."""

    def _common_init(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def _prepare(self, x: torch.Tensor, sigma, class_labels: torch.Tensor, force_fp32: bool) -> tuple:
        """fp32 x, sigma as [-1, 1, 1, 1], labels (None / zeros [1, label_dim] / [-1, label_dim]), working dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif class_labels is None:
            labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.is_cuda
        return x, sigma, labels, (torch.float16 if use_half else torch.float32)

    def _run_model(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype,
                   model_kwargs: dict) -> torch.Tensor:
        F_x = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise RuntimeError(f'backbone returned {F_x.dtype}, expected {dtype}')
        return F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Identity: every noise level is supported."""
        return torch.as_tensor(sigma)


@persistence.persistent_class
class VPPrecond(_PrecondBase):
    """Variance-preserving preconditioning: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1),
    c_noise = (M-1) sigma_VP^-1(sigma), sigma_VP(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(self,
        img_resolution: int,            # Image resolution.
        img_channels: int,              # Colour channels.
        label_dim: int = 0,             # Number of class labels; 0 = unconditional.
        use_fp16: bool = False,         # Run the backbone in fp16 (CUDA only).
        beta_d: float = 19.9,           # Extent of the noise schedule.
        beta_min: float = 0.1,          # Initial slope of the noise schedule.
        M: int = 1000,                  # Number of DDPM time steps.
        epsilon_t: float = 1e-5,        # Smallest t used in training.
        model_type: str = 'SongUNet',   # Backbone class name.
        **model_kwargs,                 # Backbone keyword arguments.
    ):
        super().__init__()
        self._common_init(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device='cpu')))
        self.model = _build_backbone(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor = None, force_fp32: bool = False,
                **model_kwargs) -> torch.Tensor:
        x, sigma, labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self._run_model(c_in * x, c_noise, labels, dtype, model_kwargs)
        return x - sigma * F_x

    def sigma(self, t):
        """sigma_VP(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        log_growth = 0.5 * self.beta_d * (t ** 2) + self.beta_min * t
        return (log_growth.exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d, the inverse of sigma(t)."""
        sigma = torch.as_tensor(sigma)
        discriminant = self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()
        return (discriminant.sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(_PrecondBase):
    """Variance-exploding preconditioning: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def __init__(self,
        img_resolution: int,            # Image resolution.
        img_channels: int,              # Colour channels.
        label_dim: int = 0,             # Number of class labels; 0 = unconditional.
        use_fp16: bool = False,         # Run the backbone in fp16 (CUDA only).
        sigma_min: float = 0.02,        # Smallest supported noise level.
        sigma_max: float = 100,         # Largest supported noise level.
        model_type: str = 'SongUNet',   # Backbone class name.
        **model_kwargs,                 # Backbone keyword arguments.
    ):
        super().__init__()
        self._common_init(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_backbone(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor = None, force_fp32: bool = False,
                **model_kwargs) -> torch.Tensor:
        x, sigma, labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_noise = (0.5 * sigma).log()
        F_x = self._run_model(x, c_noise, labels, dtype, model_kwargs)
        return x + sigma * F_x


@persistence.persistent_class
class iDDPMPrecond(_PrecondBase):
    """Improved-DDPM preconditioning: c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) - j
    where u_j is the tabulated level nearest to sigma; the backbone has 2x channels and only the first half is used."""

    def __init__(self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Colour channels.
        label_dim: int = 0,                 # Number of class labels; 0 = unconditional.
        use_fp16: bool = False,             # Run the backbone in fp16 (CUDA only).
        C_1: float = 0.001,                 # Clamp of alpha_bar ratios (low noise levels).
        C_2: float = 0.008,                 # Offset of the cosine schedule (high noise levels).
        M: int = 1000,                      # Number of DDPM time steps.
        model_type: str = 'DhariwalUNet',   # Backbone class name.
        **model_kwargs,                     # Backbone keyword arguments.
    ):
        super().__init__()
        self._common_init(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = _build_backbone(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)
        u = self._u_table()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def _u_table(self) -> torch.Tensor:
        """u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1), in fp32 on the CPU."""
        u = torch.zeros(self.M + 1, device='cpu')
        for j in range(self.M, 0, -1):
            ratio = self.alpha_bar(torch.tensor(j - 1, device='cpu')) / self.alpha_bar(torch.tensor(j, device='cpu'))
            u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=self.C_1) - 1).sqrt()
        return u

    def alpha_bar(self, j):
        """alpha_bar(j) = sin^2(pi/2 * j / (M (C_2 + 1)))."""
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor = None, force_fp32: bool = False,
                **model_kwargs) -> torch.Tensor:
        x, sigma, labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = self._run_model(c_in * x, c_noise, labels, dtype, model_kwargs)
        return x - sigma * F_x[:, :self.img_channels]

    def round_sigma(self, sigma, return_index: bool = False):
        """Nearest tabulated level u_j (or its index j), with the input's shape, device and dtype."""
        sigma = torch.as_tensor(sigma)
        flat = sigma.reshape(-1, 1).to(device=self.u.device, dtype=torch.float32)
        index = (flat - self.u.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@persistence.persistent_class
class EDMPrecond(_PrecondBase):
    """EDM preconditioning: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
    c_in = 1/sqrt(sd^2+sigma^2), c_noise = ln(sigma)/4 (sd = sigma_data)."""

    def __init__(self,
        img_resolution: int,                # Image resolution.
        img_channels: int,                  # Colour channels.
        label_dim: int = 0,                 # Number of class labels; 0 = unconditional.
        use_fp16: bool = False,             # Run the backbone in fp16 (CUDA only).
        sigma_min: float = 0,               # Smallest supported noise level.
        sigma_max: float = float('inf'),    # Largest supported noise level.
        sigma_data: float = 0.5,            # Expected standard deviation of the data.
        model_type: str = 'DhariwalUNet',   # Backbone class name.
        **model_kwargs,                     # Backbone keyword arguments.
    ):
        super().__init__()
        self._common_init(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_backbone(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                     out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor = None, force_fp32: bool = False,
                **model_kwargs) -> torch.Tensor:
        x, sigma, labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self._run_model(c_in * x, c_noise, labels, dtype, model_kwargs)
        return c_skip * x + c_out * F_x
