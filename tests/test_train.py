"""fastdiff.train: the Trainer end to end on tiny models, exact resume,
atomic checkpoints, divergence, bad input, and DDP on gloo (2 CPU processes)."""
import csv
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

import fastdiff.train.checkpoint as TC
import fastdiff.train.trainer as T
from fastdiff.data import load_dataset
from fastdiff.diffusion.gaussian import GaussianDiffusion
from fastdiff.nn import MLPDenoiser, UNet
from fastdiff.train import (EMA, TrainConfig, Trainer, TrainingDiverged, build_from_checkpoint, find_checkpoint,
                            load_checkpoint, read_checkpoint_meta, save_image_grid)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def cfg(tmp_path, name="run", **kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, log_every=1, checkpoint_every=0, num_samples=0,
                progress=False, out_dir=str(tmp_path / name), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def mlp_diffusion(seed=0, **kw):
    torch.manual_seed(seed)
    return GaussianDiffusion(MLPDenoiser(hidden=32, layers=2), num_timesteps=50, clip_sample=False, **kw)


def small_unet_diffusion(seed=0, dropout=0.1):
    # 8x8 grayscale, one downsampling, attention at 4x4; dropout exercises the global RNG
    torch.manual_seed(seed)
    unet = UNet(in_ch=1, out_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                dropout=dropout, groups=4)
    return GaussianDiffusion(unet, num_timesteps=20)


def losses(history):
    return [h["loss"] for h in history]


def read_state(ckpt):
    return torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)


# ------------------------------------------------------------- pieces ----
def test_index_stream():
    s = T._IndexStream(10, seed=3)
    # every epoch is a permutation, and the stream is reproducible from (seed, step)
    assert sorted(torch.cat([s.indices(k, 5) for k in range(2)]).tolist()) == list(range(10))
    assert torch.equal(T._IndexStream(10, seed=3).indices(7, 4), s.indices(7, 4))
    assert not torch.equal(T._IndexStream(10, seed=4).indices(0, 10), s.indices(0, 10))
    # a batch that spans an epoch boundary: positions 8..13
    assert s.indices(2, 6 - 2, 0, 1).tolist() == torch.cat([s._perm(0)[8:10], s._perm(1)[0:2]]).tolist()
    # two ranks split the global batch exactly: rank r takes the r-th half
    for step in range(5):
        both = torch.cat([s.indices(step, 3, r, 2) for r in range(2)])
        assert torch.equal(both, s.indices(step, 6, 0, 1))
    # batch larger than the dataset
    assert s.indices(0, 25).shape == (25,)


def test_ema_update_matches_formula():
    src = torch.nn.Linear(3, 2)
    ema = EMA(src, decay=0.9, warmup=True)
    shadow0 = ema.model.weight.detach().clone()
    with torch.no_grad():
        src.weight.add_(1.0)
    ema.update()  # k = 0: decay = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, 0.1 * shadow0 + 0.9 * src.weight)
    for _ in range(100):
        ema.update()
    assert ema.current_decay() == 0.9  # (1 + k) / (10 + k) >= 0.9 from k = 80 on
    assert not ema.model.weight.requires_grad and not ema.model.training
    plain = EMA(src, decay=0.5, warmup=False)
    assert plain.current_decay() == 0.5


def test_save_image_grid(tmp_path):
    imgs = torch.stack([torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 1.0)])
    path = save_image_grid(imgs, str(tmp_path / "g.png"), pad=1, min_side=0)
    a = torch.tensor(__import__("numpy").array(Image.open(path)))
    assert a.shape == (2 * 5 + 1, 2 * 6 + 1, 3)  # 2x2 grid of 4x5 images, 1-px padding
    assert a[1, 1].tolist() == [0, 0, 0] and a[1, 7].tolist() == [128, 128, 128] and a[6, 1].tolist() == [255] * 3
    # by default the grid is upscaled nearest-neighbour by the smallest integer factor that gives >= 512 px
    big = torch.tensor(__import__("numpy").array(Image.open(save_image_grid(imgs, str(tmp_path / "b.png"), pad=1))))
    k = -(-512 // 13)  # ceil(512 / 13) = 40
    assert big.shape == (11 * k, 13 * k, 3)
    assert torch.equal(big, a.repeat_interleave(k, 0).repeat_interleave(k, 1))
    # large grids are left alone
    assert Image.open(save_image_grid(torch.zeros(1, 1, 600, 300), str(tmp_path / "l.png"), pad=0)).size == (300, 600)
    with pytest.raises(ValueError, match="images must have shape"):
        save_image_grid(torch.zeros(2, 2, 4, 4), str(tmp_path / "x.png"))


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("lr", float("nan")),
                                         ("weight_decay", -1.0), ("warmup_steps", 1.5), ("grad_clip", -0.1),
                                         ("ema_decay", 1.0), ("precision", "fp8"), ("log_every", 0),
                                         ("checkpoint_every", -1), ("sample_steps", 0), ("sample_method", "plms"),
                                         ("lr_schedule", "linear"), ("adam_betas", (0.9,)), ("num_workers", -2),
                                         ("out_dir", ""), ("device", "gpu7"), ("compile", 3)])
def test_config_validation_names_the_field(field, value, tmp_path, roll):
    c = cfg(tmp_path)
    setattr(c, field, value)
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
        Trainer(mlp_diffusion(), roll, c)


# ---------------------------------------------------------- end to end ----
def test_swissroll_end_to_end(tmp_path, roll):
    c = cfg(tmp_path, steps=6, log_every=2, checkpoint_every=3, sample_every=3, num_samples=50, sample_steps=10)
    tr = Trainer(mlp_diffusion(), roll, c)
    s = tr.train()
    out = c.out_dir
    assert s["steps"] == 6 and tr.step == 6 and s["checkpoint"] == os.path.join(out, "checkpoint")
    assert math.isfinite(s["final_loss"]) and s["final_loss"] == s["history"][-1]["loss"]
    assert s["time_s"] > 0 and s["steps_per_s"] > 0
    assert sorted(os.listdir(out)) == ["checkpoint", "log.csv", "log.json", "loss.png", "samples_step000003.png",
                                       "samples_step000006.png"]
    assert s["samples"] == os.path.join(out, "samples_step000006.png") and s["loss_plot"].endswith("loss.png")
    with open(s["log_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "time"}
    log = json.load(open(s["log_json"]))
    assert log["history"] == s["history"] and log["config"]["steps"] == 6
    assert Image.open(s["loss_plot"]).size[0] > 100
    # the rebuilt EMA model is the trainer's EMA model
    d = build_from_checkpoint(out)
    assert isinstance(d, GaussianDiffusion) and not d.training and d.sample_shape == (2,)
    for (k, a), b in zip(tr.ema.model.state_dict().items(), d.model.state_dict().values()):
        assert torch.equal(a, b), k
    raw = build_from_checkpoint(out, ema=False)
    assert all(torch.equal(a, b) for a, b in zip(tr.model.state_dict().values(), raw.model.state_dict().values()))
    meta = read_checkpoint_meta(out)
    assert meta["model_class"] == "MLPDenoiser" and meta["step"] == 6 and meta["model_config"]["hidden"] == 32
    # load into an existing diffusion
    other = load_checkpoint(out, mlp_diffusion(seed=9))
    assert torch.equal(other.model.out.weight, tr.ema.model.out.weight)
    # sampling and checkpointing consume no training randomness
    quiet = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "quiet", steps=6, log_every=2)).train()
    assert losses(quiet["history"]) == losses(s["history"])


def test_tiny_unet_preset_end_to_end(tmp_path):
    ds = load_dataset("digits", image_size=16, n=32)
    torch.manual_seed(0)
    diff = GaussianDiffusion(UNet.from_preset("tiny", in_ch=1, out_ch=1), num_timesteps=20)
    c = cfg(tmp_path, steps=3, batch_size=4, channels_last=True, num_samples=4, sample_steps=3,
            sample_method="ddim", checkpoint_every=2)
    s = Trainer(diff, ds, c).train()
    grid = Image.open(s["samples"])
    # 2x2 grid of 16x16 with 2-px padding (38 px), upscaled 14x to >= 512 px
    assert grid.mode == "L" and grid.size == (14 * 38, 14 * 38)
    d = build_from_checkpoint(c.out_dir)
    assert d.model.config["in_ch"] == 1 and d.model.config["ch"] == 16
    x = d.sample(2, steps=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


def test_training_learns_the_swiss_roll(tmp_path):
    data = load_dataset("swissroll", n=2000)
    c = cfg(tmp_path, steps=400, batch_size=128, lr=3e-3, warmup_steps=20, log_every=50, ema_decay=0.99)
    torch.manual_seed(0)
    diff = GaussianDiffusion(MLPDenoiser(hidden=64, layers=3), num_timesteps=100, clip_sample=False,
                             sample_shape=(2,))
    g = torch.Generator().manual_seed(1)

    def dist_to_roll(d):
        x = d.sample(400, generator=g)
        return torch.cdist(x, data.data).min(1).values.median().item()

    before = dist_to_roll(diff)
    tr = Trainer(diff, data, c)
    s = tr.train()
    h = losses(s["history"])
    assert h[-1] < 0.8 * h[0], h
    after = dist_to_roll(tr.ema_diffusion)
    assert after < 0.5 * before, (before, after)


def test_lr_schedule(tmp_path, roll):
    s = Trainer(mlp_diffusion(), roll, cfg(tmp_path, steps=8, warmup_steps=4, lr=1e-2, lr_schedule="cosine")).train()
    lrs = [h["lr"] for h in s["history"]]  # the lr each step used
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4:] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


# ------------------------------------------------------ exact resume ----
class _Items(torch.utils.data.Dataset):
    """A plain dataset of (image, label) pairs: exercises the collate path."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], i


@pytest.mark.parametrize("kind", ["memory", "items", "workers"])
def test_resume_is_exact(tmp_path, digits8, kind):
    ds = digits8 if kind == "memory" else _Items(digits8.data)
    extra = dict(num_workers=1) if kind == "workers" else {}
    # 40 samples, batch 8: 6 steps cross an epoch boundary
    straight = Trainer(small_unet_diffusion(), ds, cfg(tmp_path, "a", steps=6, checkpoint_every=3, **extra))
    ha = straight.train()["history"]

    first = Trainer(small_unet_diffusion(), ds, cfg(tmp_path, "b", steps=3, **extra))
    first.train()
    # a different initialisation proves everything comes from the checkpoint
    resumed = Trainer(small_unet_diffusion(seed=5), ds, cfg(tmp_path, "b", steps=6, **extra), resume=True)
    assert resumed.step == 3
    hb = resumed.train()["history"]
    assert [h["step"] for h in hb] == list(range(1, 7))
    assert losses(ha) == losses(hb)  # bitwise
    assert [h["grad_norm"] for h in ha] == [h["grad_norm"] for h in hb]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    assert straight.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]


def test_resume_from_explicit_path_and_finished_run(tmp_path, roll):
    Trainer(mlp_diffusion(), roll, cfg(tmp_path, "a", steps=4)).train()
    tr = Trainer(mlp_diffusion(seed=3), roll, cfg(tmp_path, "b", steps=4),
                 resume=str(tmp_path / "a" / "checkpoint"))
    assert tr.step == 4
    s = tr.train()  # nothing left to do: no steps, the history is the checkpoint's
    assert s["steps"] == 4 and len(s["history"]) == 4


# ------------------------------------------------ checkpoint safety ----
def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path, roll, monkeypatch):
    c = cfg(tmp_path, steps=4, checkpoint_every=2)
    ref = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "ref", steps=4)).train()["history"]

    real_write = TC._write_file
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 5:  # the second file of the second checkpoint
            real_write(path, data[: len(data) // 2])  # half written, then the "crash"
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(TC, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        Trainer(mlp_diffusion(), roll, c).train()
    monkeypatch.undo()
    out = c.out_dir
    assert "checkpoint.tmp" not in os.listdir(out)
    assert read_state(os.path.join(out, "checkpoint"))["step"] == 2
    d = build_from_checkpoint(out)  # still loads
    assert all(torch.isfinite(p).all() for p in d.parameters())
    tr = Trainer(mlp_diffusion(seed=1), roll, c, resume=True)
    assert tr.step == 2
    assert losses(tr.train()["history"]) == losses(ref)


def test_crash_between_renames_falls_back_to_old(tmp_path, roll):
    c = cfg(tmp_path, steps=3)
    Trainer(mlp_diffusion(), roll, c).train()
    out = c.out_dir
    # state after a crash between "checkpoint -> checkpoint.old" and "checkpoint.tmp -> checkpoint"
    os.replace(os.path.join(out, "checkpoint"), os.path.join(out, "checkpoint.old"))
    os.makedirs(os.path.join(out, "checkpoint.tmp"))
    with open(os.path.join(out, "checkpoint.tmp", "model.safetensors"), "wb") as f:
        f.write(b"partial")
    assert find_checkpoint(out) == os.path.join(out, "checkpoint.old")
    tr = Trainer(mlp_diffusion(), roll, cfg(tmp_path, steps=5), resume=True)
    assert tr.step == 3
    tr.train()
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint"]
    assert read_state(os.path.join(out, "checkpoint"))["step"] == 5


def test_missing_and_corrupt_checkpoints(tmp_path, roll):
    with pytest.raises(FileNotFoundError, match="no checkpoint found at .*run"):
        Trainer(mlp_diffusion(), roll, cfg(tmp_path), resume=True)
    c = cfg(tmp_path, steps=2)
    Trainer(mlp_diffusion(), roll, c).train()
    ckpt = os.path.join(c.out_dir, "checkpoint")
    with open(os.path.join(ckpt, "state.pt"), "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt checkpoint file .*state.pt"):
        Trainer(mlp_diffusion(), roll, c, resume=True)
    with open(os.path.join(ckpt, "ema.safetensors"), "wb") as f:
        f.write(b"\x00" * 3)
    with pytest.raises(ValueError, match="corrupt checkpoint file .*ema.safetensors"):
        build_from_checkpoint(c.out_dir)
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="incomplete.*model.safetensors"):
        find_checkpoint(ckpt)
    # a checkpoint of another model
    Trainer(mlp_diffusion(), roll, cfg(tmp_path, "m", steps=1)).train()
    big = GaussianDiffusion(MLPDenoiser(hidden=48, layers=2), num_timesteps=50, clip_sample=False)
    with pytest.raises(ValueError, match="do not fit this model"):
        Trainer(big, roll, cfg(tmp_path, "m", steps=2), resume=True)


# ------------------------------------------------------------ NaN loss ----
def _poison_after(diffusion, k):
    """Make the k-th training forward (1-based; grad-enabled calls only) and later return NaN."""
    count = [0]

    def hook(module, args, out):
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] >= k:
                return out * float("nan")
        return out

    diffusion.model.register_forward_hook(hook)
    return diffusion


@pytest.mark.parametrize("bad_step,log_every,expect_ckpt", [(5, 5, 4), (3, 10, 2)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, roll, bad_step, log_every, expect_ckpt):
    c = cfg(tmp_path, steps=10, checkpoint_every=2, log_every=log_every, num_samples=8)
    tr = Trainer(_poison_after(mlp_diffusion(), bad_step), roll, c)
    with pytest.raises(TrainingDiverged, match=f"loss at step {bad_step} is NaN or inf") as e:
        tr.train()
    assert e.value.step == bad_step and isinstance(e.value, RuntimeError)
    ckpt = os.path.join(c.out_dir, "checkpoint")
    assert e.value.checkpoint == ckpt and str(ckpt) in str(e.value)
    assert read_state(ckpt)["step"] == expect_ckpt
    d = build_from_checkpoint(c.out_dir, ema=False)
    assert all(torch.isfinite(p).all() for p in d.parameters())
    assert not any(f.startswith("samples_") for f in os.listdir(c.out_dir))
    with open(os.path.join(c.out_dir, "log.csv")) as f:
        assert all(math.isfinite(float(r["loss"])) for r in csv.DictReader(f))


# ---------------------------------------------------------- bad input ----
def test_wrong_image_size_for_the_preset(tmp_path):
    ds = load_dataset("digits", image_size=10, n=16)
    with pytest.raises(ValueError, match=r"shape \(1, 10, 10\).*multiples of 4.*image_size=16"):
        Trainer(GaussianDiffusion(UNet.from_preset("digits-16")), ds, cfg(tmp_path))
    # a 3-channel preset on grayscale digits
    with pytest.raises(ValueError, match=r"shape \(1, 16, 16\).*3-channel"):
        Trainer(GaussianDiffusion(UNet.from_preset("tiny")), load_dataset("digits", n=16), cfg(tmp_path))
    with pytest.raises(ValueError, match=r"MLPDenoiser takes vectors of shape \(2,\)"):
        Trainer(mlp_diffusion(), load_dataset("digits", n=16), cfg(tmp_path))
    # divisible but not what the preset was built for: a warning
    with pytest.warns(UserWarning, match="built for image_size=16"):
        Trainer(GaussianDiffusion(UNet.from_preset("digits-16"), num_timesteps=10),
                load_dataset("digits", image_size=8, n=16), cfg(tmp_path))


def test_other_bad_input(tmp_path, roll):
    with pytest.raises(ValueError, match=r"sample_shape is \(3,\)"):
        Trainer(GaussianDiffusion(MLPDenoiser(dim=3), sample_shape=(3,)), roll, cfg(tmp_path))
    with pytest.raises(ValueError, match="is empty"):
        Trainer(mlp_diffusion(), torch.zeros(0, 2), cfg(tmp_path))
    with pytest.warns(UserWarning, match="clip_sample=False"):
        Trainer(GaussianDiffusion(MLPDenoiser(), num_timesteps=10), roll, cfg(tmp_path))
    nan_data = torch.zeros(16, 2)
    nan_data[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Trainer(mlp_diffusion(), nan_data, cfg(tmp_path, steps=4, batch_size=16)).train()


# ---------------------------------------------------- precision, compile ----
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, roll, precision):
    c = cfg(tmp_path, steps=4, precision=precision)
    tr = Trainer(mlp_diffusion(), roll, c)
    s = tr.train()
    assert all(math.isfinite(h["loss"]) for h in s["history"])
    scaler = read_state(os.path.join(c.out_dir, "checkpoint"))["scaler"]
    assert bool(scaler) == (precision == "fp16")  # a GradScaler state only for fp16
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    # resume works with the scaler state
    more = Trainer(mlp_diffusion(), roll, cfg(tmp_path, steps=5, precision=precision), resume=True)
    assert more.train()["steps"] == 5


def test_compile(tmp_path, roll):
    eager = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "e", steps=3)).train()["history"]
    compiled = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "c", steps=3, compile="aot_eager")).train()["history"]
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)


# ------------------------------------------------------------------ DDP ----
_WORKER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from fastdiff.data import load_dataset
    from fastdiff.diffusion.gaussian import GaussianDiffusion
    from fastdiff.nn import MLPDenoiser
    from fastdiff.train import Trainer, TrainConfig

    root = sys.argv[1]
    rank = int(os.environ["RANK"])
    data = load_dataset("swissroll", n=64)

    def run(name, steps, resume=False, seed=100):
        torch.manual_seed(seed + rank)  # different initial weights per rank: DDP must broadcast rank 0's
        diff = GaussianDiffusion(MLPDenoiser(hidden=32, layers=2), num_timesteps=50, clip_sample=False)
        init = [p.detach().clone() for p in diff.model.parameters()]
        cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=0, log_every=1, checkpoint_every=2,
                          out_dir=os.path.join(root, name), num_samples=0, progress=False, device="cpu")
        tr = Trainer(diff, data, cfg, resume=resume)
        start = tr.step
        summary = tr.train()
        res = {"init": init, "params": [p.detach() for p in diff.model.parameters()],
               "ema": [p.detach() for p in tr.ema.model.parameters()], "history": summary["history"],
               "start": start, "step": tr.step, "world_size": tr.world_size}
        return tr, res

    tr, a = run("run", 4)                        # creates the process group (gloo)
    _, b = run("run", 6, resume=True, seed=200)  # every rank loads the checkpoint
    _, c = run("straight", 6)
    torch.save({"a": a, "b": b, "c": c}, os.path.join(root, f"rank{rank}.pt"))
    tr.close()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in range(2)]

    a0, a1 = r0["a"], r1["a"]
    assert a0["world_size"] == a1["world_size"] == 2
    assert not all(torch.equal(x, y) for x, y in zip(a0["init"], a1["init"]))
    assert a0["step"] == a1["step"] == 4
    for x, y in zip(a0["params"] + a0["ema"], a1["params"] + a1["ema"]):
        assert torch.equal(x, y)  # identical across ranks after the steps
    assert not all(torch.equal(x, y) for x, y in zip(a0["init"], a0["params"]))  # and they trained
    assert losses(a0["history"]) == losses(a1["history"]) and len(a0["history"]) == 4  # averaged over ranks
    # rank 0 wrote exactly one checkpoint and the logs
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint", "log.csv", "log.json", "loss.png"]
    st = read_state(out / "checkpoint")
    assert st["step"] == 6 and st["world_size"] == 2 and len(st["rng"]) == 2

    # every rank resumed from step 4 and continued exactly like 6 uninterrupted steps
    b0, b1, c0 = r0["b"], r1["b"], r0["c"]
    assert b0["start"] == b1["start"] == 4 and b0["step"] == 6
    assert losses(b0["history"]) == losses(c0["history"])
    for x, y, z in zip(b0["params"], b1["params"], c0["params"]):
        assert torch.equal(x, y) and torch.equal(x, z)
