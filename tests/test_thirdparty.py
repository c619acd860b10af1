"""convert() on real third-party model code, imported as published (the ``thirdparty`` extra:
``pip install -e '.[test,thirdparty]'``; run with ``python -m pytest -m thirdparty``).

* pythae (VAE library): its default MLP decoder converted in place; pythae's own ``VAE.forward``
  (loss), ``reconstruct``, ``NormalSampler.sample`` and ``BaseTrainer.train`` run on the user's
  object and route every decoder call.
* pytorch-gan-zoo (GAN library): its DCGAN generator (ConvTranspose2d only, ``bias=False``),
  refused by the default and converted with ``layer_types=``; its forward, a GAN step with its
  own discriminator, merge and EMA copies.

The libraries are imported inside the tests, so the default suite (which deselects the marker)
does not need them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qmm_plugin

pytestmark = pytest.mark.thirdparty

CONV_TYPES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def pythae_vae(num_biases: int = 3):  # -> (pythae VAE, its converted decoder's QuotientModel)
    from pythae.models import VAE, VAEConfig

    torch.manual_seed(0)
    model = VAE(VAEConfig(input_dim=(1, 8, 8), latent_dim=3))
    q = qmm_plugin.convert(model.decoder, num_biases=num_biases, init_std=0.5)
    return model, q


def test_pythae_forward_reconstruct_and_regularizer() -> None:
    from pythae.data.datasets import DatasetOutput

    model, q = pythae_vae()
    assert set(q.multi_bias_layers()) == {"layers.0.0", "layers.1.0"}
    x = torch.rand(6, 1, 8, 8)
    out = model(DatasetOutput(data=x))  # pythae's own forward calls self.decoder(z)["reconstruction"]
    loss = out.loss + 0.05 * model.decoder.ba_regularizer()
    loss.backward()
    assert model.decoder.layers[0][0].bias_bank.grad is not None and torch.isfinite(loss)
    assert model.reconstruct(x).shape == x.shape
    z = torch.randn(4, 3)
    for i in range(3):  # each manifold's decoder is the merged plain decoder
        torch.testing.assert_close(model.decoder(z, manifold=i)["reconstruction"],
                                   model.decoder.merge(i)(z)["reconstruction"])


def test_pythae_sampler_draws_from_a_pinned_manifold() -> None:
    from pythae.samplers import NormalSampler

    model, _ = pythae_vae()
    sampler = NormalSampler(model)
    assert sampler.sample(num_samples=5, return_gen=True).shape == (5, 1, 8, 8)
    merged = copy.deepcopy(model)
    merged.decoder = model.decoder.merge(2)
    torch.manual_seed(3)
    with qmm_plugin.use_manifold(model.decoder, 2):
        got = sampler.sample(num_samples=5, return_gen=True)
    torch.manual_seed(3)
    torch.testing.assert_close(got, NormalSampler(merged).sample(num_samples=5, return_gen=True))


def test_pythae_trainer_trains_the_bias_banks(tmp_path) -> None:
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    model, _ = pythae_vae()
    bank = model.decoder.layers[0][0].bias_bank
    before = bank.detach().clone()
    config = BaseTrainerConfig(output_dir=str(tmp_path), num_epochs=1, per_device_train_batch_size=8,
                               per_device_eval_batch_size=8, learning_rate=1e-2)
    trainer = BaseTrainer(model=model, train_dataset=BaseDataset(torch.rand(16, 1, 8, 8), torch.zeros(16)),
                          training_config=config)
    trainer.train()
    assert not torch.equal(bank.detach(), before)  # pythae's own loop sampled manifolds and updated them
    assert any(tmp_path.iterdir())


def test_ganzoo_dcgan_generator_conv_only() -> None:
    from ganzoo.nn_modules.dcgan_nets import DCGAN_Discriminator, DCGAN_Generator

    torch.manual_seed(0)
    g = DCGAN_Generator(num_z_units=8, num_conv_filters=4, output_image_dim=32, output_image_channels=1)
    with pytest.raises(ValueError, match=r"no nn.Linear layer.*layer_types="):
        qmm_plugin.convert(g, num_biases=3)
    q = qmm_plugin.convert(g, num_biases=3, layer_types=CONV_TYPES)
    assert len(q.multi_bias_layers()) == 4 and isinstance(g, DCGAN_Generator)
    d = DCGAN_Discriminator(image_dim=32, image_channels=1, num_conv_filters=4, activation="linear")
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-3)
    ema = copy.deepcopy(g)
    z = torch.randn(4, 8, 1, 1)
    for _ in range(2):  # a generator step with the library's own discriminator
        fake, r_ba = g(z, return_regularizer=True)
        loss = -d(fake).mean() + 0.05 * r_ba
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        with torch.no_grad():
            for pe, pg in zip(ema.parameters(), g.parameters()):
                pe.lerp_(pg, 0.1)
    g.eval()
    ema.eval()
    assert fake.shape == (4, 1, 32, 32)
    for i in range(3):
        torch.testing.assert_close(g.merge(i).eval()(z), g(z, manifold=i))
    assert ema(z, manifold=1).shape == (4, 1, 32, 32)
    assert all(v >= 0 for v in g.tangential_spread().values())
