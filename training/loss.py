"""EDM's three training losses (Karras et al. 2022, Table 1): VP, VE and EDM noise-level distributions and weights.

Every loss is called as ``loss_fn(net, images, labels, augment_pipe=None)`` and returns the per-element weighted
squared error ``lambda(sigma) * (D(y + n; sigma) - y)**2`` of shape [N, C, H, W]; the training loop sums it.
This module is pickled into network snapshots, so it imports only torch and torch_utils.
"""

import torch
from torch_utils import persistence


class _DenoisingLoss:
    """Shared body: draw sigma per sample, augment, add noise, weight the denoiser's squared error."""

    def sample_sigma(self, num: int, device: torch.device) -> torch.Tensor:
        """Noise levels, shape [num, 1, 1, 1]."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def __call__(self, net, images: torch.Tensor, labels=None, augment_pipe=None) -> torch.Tensor:
        sigma = self.sample_sigma(images.shape[0], images.device)   # drawn first: EDM's RNG order
        if augment_pipe is None:
            clean, augment_labels = images, None
        else:
            clean, augment_labels = augment_pipe(images)
        noisy = clean + torch.randn_like(clean) * sigma
        denoised = net(noisy, sigma, labels, augment_labels=augment_labels)
        return self.weight(sigma) * (denoised - clean).square()


@persistence.persistent_class
class VPLoss(_DenoisingLoss):
    """VP: t ~ U(epsilon_t, 1), sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), weight 1/sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t) -> torch.Tensor:
        """The VP noise level sigma(t)."""
        t = torch.as_tensor(t)
        return (0.5 * self.beta_d * t.square() + self.beta_min * t).exp().sub(1).sqrt()

    def sample_sigma(self, num: int, device: torch.device) -> torch.Tensor:
        u = torch.rand([num, 1, 1, 1], device=device)
        return self.sigma(1 - u * (1 - self.epsilon_t))         # t runs over (epsilon_t, 1]

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.square().reciprocal()


@persistence.persistent_class
class VELoss(_DenoisingLoss):
    """VE: sigma log-uniform on [sigma_min, sigma_max], weight 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def sample_sigma(self, num: int, device: torch.device) -> torch.Tensor:
        u = torch.rand([num, 1, 1, 1], device=device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.square().reciprocal()


@persistence.persistent_class
class EDMLoss(_DenoisingLoss):
    """EDM: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def sample_sigma(self, num: int, device: torch.device) -> torch.Tensor:
        z = torch.randn([num, 1, 1, 1], device=device)
        return (self.P_mean + self.P_std * z).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.square() + self.sigma_data ** 2) / (sigma * self.sigma_data).square()
