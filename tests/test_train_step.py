"""TrainConfig.step_mode (fastdiff/train/step.py): the compiled step matches
the eager one over 20 steps, compiles as one graph with no break (so no host
sync), resumes exactly (and across modes); the device LR / EMA formulas;
the fallbacks; device-resident data and random flips. GPU-marked tests: the
CUDA-graph step against eager, sync-debug mode around the steps between log
intervals, exact resume in graph mode (also run by the GPU check)."""
import math
import os
import warnings

import pytest
import torch

from fastdiff.data import InMemoryDataset, load_dataset
from fastdiff.diffusion.gaussian import GaussianDiffusion
from fastdiff.nn import MLPDenoiser, UNet
from fastdiff.train import EMA, TrainConfig, Trainer
from fastdiff.train.device_data import DeviceData, apply_flips, flip_mask
from fastdiff.train.step import StepRunner, ema_weight, lr_factor

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
HAS_CUDA = torch.cuda.is_available()


def cfg(tmp_path, name="run", **kw):
    base = dict(steps=20, batch_size=8, lr=1e-3, warmup_steps=5, lr_schedule="cosine", log_every=1,
                checkpoint_every=0, num_samples=0, progress=False, out_dir=str(tmp_path / name), device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def mlp_diffusion(seed=0):
    torch.manual_seed(seed)
    return GaussianDiffusion(MLPDenoiser(hidden=32, layers=2), num_timesteps=50, clip_sample=False)


def unet_diffusion(seed=0, dropout=0.1, device="cpu", levels=(1, 2)):
    torch.manual_seed(seed)
    unet = UNet(in_ch=1, out_ch=1, ch=8, ch_mult=levels, num_res_blocks=1, attn_resolutions=(8 // 2 ** (len(levels) - 1),), image_size=8,
                dropout=dropout, groups=4)
    return GaussianDiffusion(unet, num_timesteps=20).to(device)


def col(h, k):
    return [r[k] for r in h]


def assert_runs_close(a: Trainer, b: Trainer, ha, hb, rtol=1e-4, atol=1e-5):
    assert col(ha, "step") == col(hb, "step")
    torch.testing.assert_close(torch.tensor(col(ha, "loss")), torch.tensor(col(hb, "loss")), rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.tensor(col(ha, "grad_norm")), torch.tensor(col(hb, "grad_norm")),
                               rtol=rtol, atol=atol)
    assert col(ha, "lr") == pytest.approx(col(hb, "lr"), rel=1e-12)
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for x, y in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ---------------------------------------------------------- the formulas --
@pytest.mark.parametrize("warmup,schedule", [(0, "constant"), (7, "constant"), (5, "cosine"), (0, "cosine")])
def test_lr_factor_is_the_host_schedule(tmp_path, roll, warmup, schedule):
    tr = Trainer(mlp_diffusion(), roll, cfg(tmp_path, steps=30, warmup_steps=warmup, lr_schedule=schedule))
    lam = tr._lr_lambda()
    k = torch.arange(0, 40)
    dev = torch.stack([lr_factor(i, warmup, 30, schedule == "cosine") for i in k])
    assert dev.dtype == torch.float64
    assert dev.tolist() == pytest.approx([lam(int(i)) for i in k], rel=1e-14, abs=1e-15)


def test_ema_weight_and_tensor_update():
    k = torch.arange(0, 50)
    w = torch.stack([ema_weight(i, 0.99, True) for i in k])
    assert w.tolist() == [1.0 - min(0.99, (1 + i) / (10 + i)) for i in range(50)]  # bitwise: same float64 ops
    assert float(ema_weight(torch.tensor(3), 0.9, False)) == pytest.approx(0.1)
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3).double())
    a, b, c = EMA(src, 0.9), EMA(src, 0.9), EMA(src, 0.9)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    a.update()  # host float weight, _foreach_lerp_
    b.update_with(torch.tensor(1.0 - min(0.9, 1 / 10)))  # a device tensor: sub, mul, add
    for x, y in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    c.update_with(1.0 - min(0.9, 1 / 10))  # a number: the lerp path
    for x, y in zip(a.model.parameters(), c.model.parameters()):
        torch.testing.assert_close(x, y)


# ----------------------------------------------------- compile vs eager --
@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_compile_matches_eager_over_20_steps(tmp_path, roll, digits8, model):
    """aot_eager: dynamo + AOT autograd tracing of the whole step (the fused ops' fakes and
    autograd included) without inductor's code generation wait; inductor: the next test."""
    # the U-Net: one level (GroupNorm+SiLU, time embedding, attention, dropout) keeps the trace short
    make, data = (mlp_diffusion, roll) if model == "mlp" else (lambda: unet_diffusion(levels=(1,)), digits8)
    e = Trainer(make(), data, cfg(tmp_path, "e"))
    he = e.train()["history"]
    c = Trainer(make(), data, cfg(tmp_path, "c", step_mode="compile", compile="aot_eager"))
    assert isinstance(c._step_runner, StepRunner) and c._step_runner.mode == "compile"
    hc = c.train()["history"]
    assert len(he) == 20
    assert_runs_close(e, c, he, hc)


def test_compiled_step_is_one_graph_with_inductor(tmp_path, roll):
    """The whole step (forward, backward, clip, AdamW, EMA, accumulators) under
    inductor with fullgraph=True: one graph, compiled once for 12 steps; a graph
    break or a recompilation would fail here. Matches eager to float tolerance."""
    import time

    import torch._dynamo
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    c = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "c", steps=12, step_mode="compile"))
    c._step_runner._backend = backend
    t0 = time.perf_counter()
    hc = c.train()["history"]
    print(f"inductor whole-step compile + 12 steps: {time.perf_counter() - t0:.1f} s")
    assert len(graphs) == 1
    e = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "e", steps=12))
    assert_runs_close(e, c, e.train()["history"], hc)


def test_compile_resume_is_exact_and_checkpoints_cross_modes(tmp_path, roll):
    import shutil

    kw = dict(step_mode="compile", compile="aot_eager", steps=6, checkpoint_every=3, warmup_steps=2,
              lr_schedule="constant")
    straight = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "a", **kw))
    ha = straight.train()["history"]
    first = Trainer(mlp_diffusion(), roll, cfg(tmp_path, "b", **dict(kw, steps=3)))
    first.train()
    shutil.copytree(tmp_path / "b", tmp_path / "x")
    resumed = Trainer(mlp_diffusion(seed=5), roll, cfg(tmp_path, "b", **kw), resume=True)
    assert resumed.step == 3
    hb = resumed.train()["history"]
    assert col(ha, "loss") == col(hb, "loss") and col(ha, "grad_norm") == col(hb, "grad_norm")  # bitwise
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.model.state_dict().values(), resumed.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    # the checkpoint is the eager step's: lr a float, not capturable, step on the host
    st = torch.load(os.path.join(tmp_path, "b", "checkpoint", "state.pt"), weights_only=True)
    g = st["optimizer"]["param_groups"][0]
    assert isinstance(g["lr"], float) and not g["capturable"] and st["scheduler"]["last_epoch"] == 6
    assert st["optimizer"]["state"][0]["step"].device.type == "cpu" and st["ema_updates"] == 6
    # the eager step resumes the compiled run's step-3 checkpoint and continues as the compiled run did
    e = Trainer(mlp_diffusion(seed=7), roll, cfg(tmp_path, "x", **dict(kw, step_mode="eager", compile=False)),
                resume=True)
    he = e.train()["history"]
    assert_runs_close(straight, e, ha, he)


# ------------------------------------------------------------ fallbacks --
def test_graph_falls_back_to_compile_on_cpu_with_one_warning(tmp_path, roll):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr = Trainer(mlp_diffusion(), roll, cfg(tmp_path, step_mode="graph", compile="aot_eager", steps=3))
        tr.train()
    msgs = [str(x.message) for x in w if "step_mode" in str(x.message)]
    assert len(msgs) == 1 and "'compile'" in msgs[0]
    assert tr._step_runner.mode == "compile"


def test_fp16_falls_back_to_eager(tmp_path, roll):
    with pytest.warns(UserWarning, match="fp16"):
        tr = Trainer(mlp_diffusion(), roll, cfg(tmp_path, step_mode="compile", precision="fp16", steps=2))
    assert tr._step_runner is None
    assert tr.train()["steps"] == 2


@pytest.mark.parametrize("mode,world,device,precision,want,warn", [
    ("eager", 1, "cpu", "fp32", "eager", None), ("compile", 1, "cpu", "bf16", "compile", None),
    ("graph", 1, "cpu", "fp32", "compile", "needs a CUDA device"), ("graph", 1, "cuda", "bf16", "graph", None),
    ("graph", 2, "cuda", "bf16", "eager", "under DDP"), ("compile", 4, "cpu", "fp32", "eager", "under DDP"),
    ("graph", 1, "cuda", "fp16", "eager", "GradScaler")])
def test_resolve_mode(mode, world, device, precision, want, warn):
    from types import SimpleNamespace

    from fastdiff.train.step import resolve_mode

    tr = SimpleNamespace(config=TrainConfig(step_mode=mode, precision=precision), world_size=world,
                         device=torch.device(device), diffusion=mlp_diffusion(), _labels=None)
    got, why = resolve_mode(tr)
    assert got == want and (why is None if warn is None else warn in why)
    if mode != "eager" and precision != "fp16":
        tr._labels = torch.zeros(3, dtype=torch.int64)  # class-conditional: the eager step
        got, why = resolve_mode(tr)
        assert got == "eager" and "conditional" in why


@pytest.mark.parametrize("field,value", [("step_mode", "fast"), ("device_data", True), ("random_flip", 1)])
def test_config_validation(tmp_path, roll, field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        Trainer(mlp_diffusion(), roll, cfg(tmp_path, **{field: value}))


# ---------------------------------------------------- device data, flips --
def test_device_data_uint8_is_bitwise_the_float_path():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (10, 3, 4, 5), generator=g, dtype=torch.uint8)
    x = q.to(torch.float32).div_(127.5).sub_(1.0)  # as the loaders convert
    dd = DeviceData(x, "cpu")
    assert dd.uint8 and dd.nbytes == q.numel() and torch.equal(dd.data, q)
    idx = torch.tensor([3, 0, 9, 3])
    assert torch.equal(dd.batch(idx), x[idx])
    smooth = load_dataset("digits", image_size=8, n=10).data  # bilinear-resized: not 8-bit
    assert not DeviceData(smooth, "cpu").uint8
    cl = DeviceData(x, "cpu", channels_last=True)
    b = cl.batch(idx)
    assert torch.equal(b, x[idx]) and b.is_contiguous(memory_format=torch.channels_last)


def test_flips_are_a_function_of_the_step():
    m = flip_mask(0, 5, 0, 1000)
    assert torch.equal(m, flip_mask(0, 5, 0, 1000)) and not torch.equal(m, flip_mask(0, 6, 0, 1000))
    assert not torch.equal(m, flip_mask(0, 5, 1, 1000)) and 400 < int(m.sum()) < 600
    x = torch.randn(4, 2, 3, 5)
    y = apply_flips(x, torch.tensor([True, False, False, True]))
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1]) and torch.equal(y[3], x[3].flip(-1))
    with pytest.raises(ValueError, match="image batches"):
        apply_flips(torch.randn(4, 2), torch.ones(4, dtype=torch.bool))


def test_random_flip_training_same_on_every_data_path_and_resumes(tmp_path):
    q = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    data = InMemoryDataset(q.to(torch.float32).div_(127.5).sub_(1.0))
    runs = {}
    for dd in ("on", "off"):
        tr = Trainer(unet_diffusion(dropout=0.0), data, cfg(tmp_path, dd, steps=6, random_flip=True, device_data=dd,
                                                          checkpoint_every=3))
        assert (tr._device_data is not None) == (dd == "on")
        runs[dd] = tr.train()["history"]
    assert col(runs["on"], "loss") == col(runs["off"], "loss")
    noflip = Trainer(unet_diffusion(dropout=0.0), data, cfg(tmp_path, "n", steps=6)).train()["history"]
    assert col(noflip, "loss") != col(runs["on"], "loss")
    part = Trainer(unet_diffusion(dropout=0.0), data, cfg(tmp_path, "p", steps=3, random_flip=True))
    part.train()
    more = Trainer(unet_diffusion(dropout=0.0), data, cfg(tmp_path, "p", steps=6, random_flip=True), resume=True)
    assert col(more.train()["history"], "loss") == col(runs["on"], "loss")
    with pytest.raises(ValueError, match="random_flip needs image data"):
        Trainer(mlp_diffusion(), load_dataset("swissroll", n=64), cfg(tmp_path, "r", random_flip=True))


# ------------------------------------------------------------------- GPU --
def _gpu_run(tmp_path, name, mode, steps=20, **kw):
    data = load_dataset("digits", image_size=8, n=64)
    c = cfg(tmp_path, name, device="cuda", step_mode=mode, steps=steps, batch_size=16, precision="bf16",
            channels_last=True, log_every=10, **kw)
    tr = Trainer(unet_diffusion(dropout=0.0), data, c)
    return tr, tr.train()["history"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_gpu_step_modes_match_eager_over_20_steps(tmp_path, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback allowed here
        g, hg = _gpu_run(tmp_path, mode, mode)
    assert g._step_runner is not None and g._step_runner.mode == mode
    if mode == "graph":
        assert isinstance(g._step_runner._graph, torch.cuda.CUDAGraph)  # captured, no fallback
    e, he = _gpu_run(tmp_path, "eager", "eager")
    # bf16 autocast: the modes round alike up to the order of the reductions
    assert_runs_close(e, g, he, hg, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_graph_step_does_not_sync_between_log_intervals(tmp_path):
    data = load_dataset("digits", image_size=8, n=64)
    c = cfg(tmp_path, "s", device="cuda", step_mode="graph", steps=40, batch_size=16, precision="bf16",
            log_every=1000)
    tr = Trainer(unet_diffusion(dropout=0.0), data, c)
    batches = tr._batches(0)
    tr._loss_sum = torch.zeros((), device="cuda")
    tr._gn_sum = torch.zeros((), device="cuda")
    tr._count = 0
    tr._bad = torch.full((), 2**62, dtype=torch.int64, device="cuda")
    tr._no_bad = tr._bad.clone()
    tr._dev_step = torch.zeros((), dtype=torch.int64, device="cuda")
    for _ in range(6):  # warm-up + capture
        tr._train_step(next(batches))
        tr.step += 1
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            tr._train_step(next(batches))
            tr.step += 1
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert tr._first_bad_step() is None and math.isfinite(float(tr._loss_sum))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_graph_resume_is_exact(tmp_path):
    # a constant lr after warm-up: the 6-step first half follows the same schedule as the 12-step run
    a, ha = _gpu_run(tmp_path, "a", "graph", steps=12, checkpoint_every=6, lr_schedule="constant")
    _gpu_run(tmp_path, "b", "graph", steps=6, lr_schedule="constant")
    data = load_dataset("digits", image_size=8, n=64)
    c = cfg(tmp_path, "b", device="cuda", step_mode="graph", steps=12, batch_size=16, precision="bf16",
            channels_last=True, log_every=10, lr_schedule="constant")
    r = Trainer(unet_diffusion(seed=3, dropout=0.0), data, c, resume=True)
    hr = r.train()["history"]
    # the same draws (the generator's state is checkpointed); kernels may differ in reduction order
    torch.testing.assert_close(torch.tensor(col(ha, "loss")[-1:]), torch.tensor(col(hr, "loss")[-1:]),
                               rtol=1e-3, atol=1e-4)
    for x, y in zip(a.model.parameters(), r.model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)
