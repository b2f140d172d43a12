"""LatentDiffusion: a frozen diffusers AutoencoderKL (tiny, randomly
initialised from a config: no download) around a fastdiff UNet; encoding
with the scaling/shift factors, a save_pretrained/from_pretrained round trip,
training through the Trainer with cached latents, checkpoints that rebuild
the VAE, and `fastdiff train --vae`."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from fastdiff import NoiseSchedule  # noqa: E402
from fastdiff import nn as fnn  # noqa: E402
from fastdiff.data import InMemoryDataset  # noqa: E402
from fastdiff.diffusion import LatentDiffusion  # noqa: E402
from fastdiff.diffusion.latent import load_vae  # noqa: E402

VAE_CONFIG = dict(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                  up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[8, 16],
                  latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16)


def _vae(seed=0, **kw):
    torch.manual_seed(seed)
    return load_vae({**VAE_CONFIG, **kw})


def _unet(**kw):
    return fnn.UNet(in_ch=4, out_ch=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                    dropout=0.0, groups=8, **kw)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g) * 2 - 1


def test_encode_decode_scaling_and_shift():
    vae = _vae(shift_factor=0.25, scaling_factor=0.5)
    ld = LatentDiffusion(vae, _unet(), "linear", num_timesteps=50)
    assert ld.scaling_factor == 0.5 and ld.shift_factor == 0.25 and not ld.clip_sample
    x = _images(3)
    z = ld.encode(x)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mean - 0.25) * 0.5)
        torch.testing.assert_close(ld.decode(z), vae.decode(mean).sample)
    assert z.shape == (3, 4, 8, 8)
    # the VAE is frozen and stays in eval mode
    ld.train()
    assert not ld.vae.training and not any(p.requires_grad for p in ld.vae.parameters())
    loss = ld(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in ld.vae.parameters())
    assert ld.sample_shape == (4, 8, 8)
    # the default factors come from the VAE's config (no shift_factor there: 0)
    plain = LatentDiffusion(_vae(), _unet(), "linear", num_timesteps=50)
    assert plain.scaling_factor == pytest.approx(0.18215) and plain.shift_factor == 0.0


def test_save_pretrained_round_trip_and_sampling(tmp_path):
    vae = _vae(seed=3)
    vae.save_pretrained(tmp_path / "vae")
    ld = LatentDiffusion(str(tmp_path / "vae"), _unet(), "linear", num_timesteps=20, sample_shape=(4, 8, 8))
    for (k, a), (k2, b) in zip(vae.state_dict().items(), ld.vae.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert ld.config["vae"] == {"path": os.path.abspath(tmp_path / "vae")}
    x = _images(2)
    torch.testing.assert_close(ld.encode(x), (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).detach())
    imgs = ld.sample(2, steps=3, method="ddim", generator=torch.Generator().manual_seed(0))
    lat = ld.sample(2, steps=3, method="ddim", generator=torch.Generator().manual_seed(0), decode=False)
    assert imgs.shape == (2, 1, 16, 16) and lat.shape == (2, 4, 8, 8)
    torch.testing.assert_close(imgs, ld.decode(lat))
    # a pipeline directory with a vae/ subfolder works too; a missing one names the path
    assert isinstance(load_vae(str(tmp_path)), torch.nn.Module)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_vae(str(tmp_path / "nope"))


def test_trainer_caches_latents_resumes_exactly_and_rebuilds(tmp_path):
    from fastdiff.train import TrainConfig, Trainer, build_from_checkpoint

    data = InMemoryDataset(_images(12), labels=torch.arange(12) % 3)

    def make():
        torch.manual_seed(0)
        return LatentDiffusion(_vae(seed=1), _unet(num_classes=3), "linear", num_timesteps=50, cond_drop_prob=0.3)

    def cfg(steps, out):
        return TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, device="cpu", out_dir=str(out),
                           log_every=1, checkpoint_every=0, num_samples=2, sample_steps=2, sample_method="ddim",
                           progress=False)

    calls = []
    ld = make()
    enc = ld.encode
    ld.encode = lambda x: (calls.append(x.shape[0]), enc(x))[1]
    full = Trainer(ld, data, cfg(4, tmp_path / "full"))
    assert full.diffusion.latent_inputs and full.dataset.data.shape == (12, 4, 8, 8)
    assert torch.equal(full.dataset.labels, data.labels)
    n_enc = sum(calls)
    full.train()
    assert sum(calls) == n_enc  # training encoded nothing more: the latents were cached
    half = Trainer(make(), data, cfg(2, tmp_path / "half"))
    half.train()
    resumed = Trainer(make(), data, cfg(4, tmp_path / "half"), resume=True)
    resumed.train()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # the checkpoint rebuilds the latent diffusion, the VAE (built from a config) from vae.safetensors
    assert os.path.isfile(tmp_path / "full" / "checkpoint" / "vae.safetensors")
    back = build_from_checkpoint(str(tmp_path / "full"))
    assert isinstance(back, LatentDiffusion) and back.model.num_classes == 3 and back.cond_drop_prob == 0.3
    for a, b in zip(full.diffusion.vae.state_dict().values(), back.vae.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.model.state_dict().values(), back.model.state_dict().values()):
        assert torch.equal(a, b)
    x = back.sample(3, steps=2, method="ddim", class_labels=torch.tensor([0, 1, 2]))
    assert x.shape == (3, 1, 16, 16)
    # no caching: every batch is encoded in the step
    nc = make()
    t = Trainer(nc, data, TrainConfig(**{**cfg(1, tmp_path / "nc").__dict__, "cache_latents": False}))
    assert not nc.latent_inputs and t.dataset is data
    t.train()


def test_cli_train_with_vae(tmp_path):
    from fastdiff.cli import main

    _vae(seed=2).save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "digits", "--vae", str(tmp_path / "vae"), "--preset", "digits-16",
               "--class-conditional", "--steps", "2", "--batch", "4", "--timesteps", "20", "--log-every", "1",
               "--num-samples", "0", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    from fastdiff.train import read_checkpoint_meta

    meta = read_checkpoint_meta(str(out))
    assert meta["diffusion_config"]["vae"] == {"path": os.path.abspath(tmp_path / "vae")}
    assert meta["model_config"]["in_ch"] == 4 and meta["model_config"]["image_size"] == 8
    assert not os.path.exists(out / "checkpoint" / "vae.safetensors")  # the VAE is found by its path
    rc = main(["sample", "--checkpoint", str(out), "--n", "1", "--class", "3,5", "--method", "ddim", "--steps",
               "2", "--out", str(tmp_path / "s.npz"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    import numpy as np

    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (2, 16, 16, 1) and f["labels"].tolist() == [3, 5]
