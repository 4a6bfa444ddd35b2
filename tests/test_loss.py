"""training/loss.py: sigma distributions, weights, noise and augmentation wiring of VPLoss, VELoss, EDMLoss."""

import math
import pickle

import numpy as np
import pytest
import scipy.stats
import torch

from training.loss import EDMLoss, VELoss, VPLoss


class RecordingNet:
    """Stands in for a preconditioner: remembers its inputs and returns a fixed denoised image."""

    def __init__(self, output: float = 0.0):
        self.output = output

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        self.x, self.sigma, self.labels, self.augment_labels = x, sigma, labels, augment_labels
        return torch.full_like(x, self.output)


def run_loss(loss_fn, n=20000, images=None, seed=0):
    torch.manual_seed(seed)
    images = torch.ones([n, 1, 1, 1]) if images is None else images
    net = RecordingNet()
    loss = loss_fn(net, images, torch.zeros([images.shape[0], 0]))
    return net, loss


def test_edm_sigma_is_lognormal_and_weight_matches():
    fn = EDMLoss()
    net, loss = run_loss(fn)
    sigma = net.sigma.flatten().double()
    assert net.sigma.shape == (20000, 1, 1, 1)
    log_sigma = sigma.log().numpy()
    assert scipy.stats.kstest(log_sigma, 'norm', args=(-1.2, 1.2)).pvalue > 1e-3
    # D = 0 and y = 1, so the per-element loss is the weight itself.
    expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss.flatten().double(), expected, rtol=1e-5, atol=0)


def test_edm_custom_parameters():
    net, _ = run_loss(EDMLoss(P_mean=0.5, P_std=0.3, sigma_data=1.0))
    log_sigma = net.sigma.flatten().double().log().numpy()
    assert abs(log_sigma.mean() - 0.5) < 0.01
    assert abs(log_sigma.std() - 0.3) < 0.01


def test_ve_sigma_is_log_uniform_and_weight_is_inverse_variance():
    net, loss = run_loss(VELoss())
    sigma = net.sigma.flatten().double()
    assert sigma.min() >= 0.02 * (1 - 1e-6) and sigma.max() <= 100 * (1 + 1e-6)
    u = ((sigma.log() - math.log(0.02)) / (math.log(100) - math.log(0.02))).numpy()
    assert scipy.stats.kstest(u, 'uniform').pvalue > 1e-3
    torch.testing.assert_close(loss.flatten().double(), sigma ** -2, rtol=1e-5, atol=0)


def test_vp_time_is_uniform_and_weight_is_inverse_variance():
    fn = VPLoss()
    net, loss = run_loss(fn)
    sigma = net.sigma.flatten().double()
    # Invert sigma^2 + 1 = exp(beta_d t^2 / 2 + beta_min t) for t (quadratic in t).
    beta_d, beta_min = 19.9, 0.1
    t = (-beta_min + torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2))) / beta_d
    assert t.min() >= 1e-5 * 0.99 and t.max() <= 1 + 1e-6
    assert scipy.stats.kstest(((t - 1e-5) / (1 - 1e-5)).numpy(), 'uniform').pvalue > 1e-3
    torch.testing.assert_close(loss.flatten().double(), sigma ** -2, rtol=1e-4, atol=0)


def test_vp_sigma_function_endpoints():
    fn = VPLoss()
    # sigma(1) = sqrt(exp(19.9/2 + 0.1) - 1), about 152.17 (edm-interface.md 2.1).
    assert float(fn.sigma(1.0)) == pytest.approx(math.sqrt(math.exp(19.9 / 2 + 0.1) - 1), rel=1e-6)
    assert float(fn.sigma(1.0)) == pytest.approx(152.17, abs=0.01)
    assert float(fn.sigma(0.0)) == 0.0


@pytest.mark.parametrize('cls', [VPLoss, VELoss, EDMLoss])
def test_noise_is_gaussian_scaled_by_sigma(cls):
    images = torch.zeros([4000, 3, 2, 2])
    net, _ = run_loss(cls(), images=images)
    ratio = (net.x / net.sigma).flatten().numpy()
    assert abs(ratio.mean()) < 0.03
    assert abs(ratio.std() - 1) < 0.03
    assert net.labels.shape == (4000, 0)
    assert net.augment_labels is None


def test_rng_order_sigma_then_noise():
    """EDM draws sigma before the noise, so a seeded run is reproducible draw for draw."""
    images = torch.zeros([5, 3, 4, 4])
    net, _ = run_loss(EDMLoss(), images=images, seed=123)
    torch.manual_seed(123)
    z = torch.randn([5, 1, 1, 1])
    noise = torch.randn_like(images)
    sigma = (z * 1.2 - 1.2).exp()
    torch.testing.assert_close(net.sigma, sigma)
    torch.testing.assert_close(net.x, noise * sigma)


def test_augment_pipe_output_is_the_target():
    class Pipe:
        def __call__(self, images):
            return images.flip(3), torch.ones([images.shape[0], 9])

    images = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)
    net = RecordingNet(output=0.0)
    loss = EDMLoss()(net, images, None, augment_pipe=Pipe())
    assert net.augment_labels.shape == (2, 9)
    weight = EDMLoss().weight(net.sigma)
    torch.testing.assert_close(loss, weight * images.flip(3).square())


def test_gradient_flows_to_network():
    lin = torch.nn.Conv2d(1, 1, 1)
    net = lambda x, sigma, labels, augment_labels=None: lin(x)  # noqa: E731
    loss = VELoss()(net, torch.randn([3, 1, 4, 4]), None)
    loss.sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize('cls', [VPLoss, VELoss, EDMLoss])
def test_losses_pickle_with_their_source(cls):
    fn = cls()
    data = pickle.dumps(fn)
    assert b'_reconstruct_persistent_obj' in data
    copy = pickle.loads(data)
    assert type(copy).__name__ == cls.__name__
    assert copy.init_kwargs == fn.init_kwargs
    np.testing.assert_equal(vars(copy), vars(fn))
