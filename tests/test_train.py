"""train.py on tiny, CPU: quick start, learning, bitwise resume, DDP, masking in the real loop, bad input."""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import adapters
import data
import diffusion
import encoders
import model as dit
import parallel
import train
import vae

ROOT = Path(__file__).resolve().parent.parent
SUBJECT, MOTION = ROOT / "examples" / "dog6", ROOT / "examples" / "motion.mp4"
SMALL = ["--model", "tiny", "--height", "32", "--width", "48", "--frames", "9", "--val-every", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # shared: the tiny encoders run once per input set


def run(out, cache_dir, *extra):
    train.main([*SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--output-dir", str(out),
                "--cache-dir", cache_dir, *extra])  # fmt: skip


def test_readme_quick_start_writes_adapters(tmp_path):
    """The README's quick-start command, as a user runs it (subprocess, the default tiny size 49×64×96)."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "python train.py --model tiny" in line)
    args = shlex.split(line[line.index("python train.py") :])[2:]
    out = tmp_path / "quick"
    args[args.index("--output-dir") + 1] = str(out)
    env = dict(os.environ, HOME=str(tmp_path))  # the default cache dir lands in the temp folder
    done = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("adapters.safetensors", "config.json", "log.jsonl"):
        assert (out / name).is_file(), f"{name} missing"
    cfg, base = adapters.read_metadata(str(out / "adapters.safetensors"))
    assert base["name"] == "tiny" and cfg.groups == 7
    config = json.loads((out / "config.json").read_text())
    assert {"torch", "transformers", "git"} <= set(config["versions"]) and config["args"]["model"] == "tiny"


def test_loss_falls_on_a_fixed_batch():
    """The adapters learn: 40 AdamW steps on one fixed batch (the real velocity target at t = 300 and 700)
    cut the loss by at least 20% (measured: 1.38 -> 1.00). tiny's adapters need lr 1e-2 to move this fast."""
    import diffusion
    import model as dit

    torch.manual_seed(0)
    m = dit.load_transformer("tiny")
    ext = adapters.attach(m, adapters.AdapterConfig(cond_dim=32))
    opt = torch.optim.AdamW(ext.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-4)
    schedule, z, t = diffusion.Schedule(), torch.randn(2, 3, 4, 8, 12), torch.tensor([300, 700])
    noise, text, e = torch.randn_like(z), torch.randn(2, 16, 32), torch.randn(2, 32)
    x_t, v = schedule.add_noise(z, noise, t), schedule.velocity(z, noise, t)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(m(x_t, text, t, cond=e), v)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.8 * losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("schedule", ["joint", "isolated"])
def test_resume_is_bitwise(tmp_path, cache_dir, monkeypatch, schedule):
    """8 steps straight == 4 steps, a kill, --resume, 4 more: the same adapter tensors and logged loss
    averages, bit for bit. isolated: the step-4 checkpoint holds no AdamW state for the motion adapters (they
    start training at step 4), and the resumed run must not have any either."""
    args = ("--steps", "8", "--save-every", "4", "--schedule", schedule)
    run(tmp_path / "straight", cache_dir, *args)
    save = train.save_checkpoint

    def save_then_die(out, step, *rest):
        save(out, step, *rest)
        if step == 4:
            raise KeyboardInterrupt  # the run is killed right after its step-4 checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", cache_dir, *args)
    monkeypatch.setattr(train, "save_checkpoint", save)
    run(tmp_path / "killed", cache_dir, *args, "--resume")
    a = load_file(str(tmp_path / "straight" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), f"max abs diff {worst:.3g}"
    assert [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()] == ["step_0000008.pt"]
    logs = [(tmp_path / name / "log.jsonl").read_text().splitlines() for name in ("straight", "killed")]
    last = [json.loads(log[-1]) for log in logs]
    assert last[0]["ema"] == last[1]["ema"], "the logged loss averages restarted on resume"


def test_each_phase_gets_its_own_data_prompt_and_e():
    """batch_for: identity steps take subject images with the subject prompt and no e; motion steps take the
    clip with the motion prompt and an e of its frames; latents are posterior draws times the VAE's scale."""
    gen, (n, c, h, w) = torch.Generator().manual_seed(0), (3, 4, 2, 3)
    subjects, clip = torch.randn(n, 1, c, h, w), torch.randn(1, 5, c, h, w)  # (N, F, C, h, w) posterior means
    text = torch.arange(4.0)[:, None, None].expand(4, 8, 16)  # row k: prompt k (subject, motion, val, "")
    # logvar -30: std 3e-7, so a posterior draw equals its mean
    low = dict(subject_logvar=torch.full_like(subjects, -30.0), clip_logvar=torch.full_like(clip, -30.0))
    cache = dict(subject_mean=subjects, clip_mean=clip, **low, text=text, e_clip=torch.arange(8.0).view(4, 2),
                 scale=torch.tensor(0.7))  # fmt: skip
    args = argparse.Namespace(subject_batch=2, motion_batch=3)
    z, txt, e = train.batch_for("identity", cache, args, gen)
    assert z.shape == (2, 1, c, h, w) and e is None and bool((txt == 0).all())
    assert all(any(torch.allclose(zi, s * 0.7, atol=1e-5) for s in subjects) for zi in z)
    z, txt, e = train.batch_for("motion", cache, args, gen)
    assert z.shape == (3, 5, c, h, w) and bool((txt == 1).all()) and torch.allclose(z, clip * 0.7, atol=1e-5)
    assert e.shape == (3, 2) and all(any(torch.equal(ei, row) for row in cache["e_clip"]) for ei in e)


def test_latents_from_a_bf16_cache_are_noised_in_fp32(tmp_path, cache_dir, monkeypatch):
    """On CUDA the VAE runs in bf16, so the cached posteriors are bf16. In bf16 the schedule's sqrt(1 - a_t)
    rounds to 0 at t = 0 and 1 (it is 0.029 and 0.042), so x_t would hold no noise and the velocity target
    (then the noise itself) could not be learned; batch_for's latents are fp32, so add_noise works in fp32."""
    gen, schedule = torch.Generator().manual_seed(0), diffusion.load_schedule(None)
    shape = (2, 1, 4, 4, 6)  # two subject images' posteriors (N, F, C, h, w), as precompute caches them
    mean, logvar = torch.randn(shape).bfloat16(), torch.full(shape, -4.0).bfloat16()  # scale 1: any works
    cache = dict(subject_mean=mean, subject_logvar=logvar, text=torch.randn(4, 8, 16), scale=torch.ones(()))
    z, _, _ = train.batch_for("identity", cache, argparse.Namespace(subject_batch=2), gen)
    noise, t = torch.randn(z.shape, generator=gen), torch.tensor([0, 1])
    noisy, clean = schedule.add_noise(z, noise, t), schedule.add_noise(z, torch.zeros_like(noise), t)
    assert (noisy.bfloat16().float() - clean.bfloat16().float()).abs().mean() > 0.02  # the model sees noise
    assert z.dtype == torch.float32, z.dtype
    seen, add_noise = [], diffusion.Schedule.add_noise  # and so it is in the loop, with a bf16 base and cache

    def spy(self, x0, noise, t):
        seen.append(x0.dtype)
        return add_noise(self, x0, noise, t)

    monkeypatch.setattr(diffusion.Schedule, "add_noise", spy)
    run(tmp_path / "run", cache_dir, "--steps", "2", "--dtype", "bf16")  # CUDA's default dtype, on the CPU
    assert seen and set(seen) == {torch.float32}, seen


def test_checkpoint_state_round_trips_and_refuses_a_misfit():
    """parallel.trainable_state -> load_trainable_state restores the weights and AdamW state exactly, leaves a
    parameter without state when the checkpoint has none for it, and refuses weights that do not fit."""
    torch.manual_seed(0)
    model = dit.load_transformer("tiny")
    ext = adapters.attach(model)
    opt = torch.optim.AdamW(ext.parameters())
    model(torch.randn(1, 2, 4, 8, 12), torch.randn(1, 16, 32), torch.tensor([500])).square().mean().backward()
    adapters.mask_gradients(ext, "identity")  # the motion adapters get no state
    opt.step()
    weights, optim = parallel.trainable_state(model, opt)
    fresh = dit.load_transformer("tiny")
    fresh_opt = torch.optim.AdamW(adapters.attach(fresh).parameters())
    parallel.load_trainable_state(fresh, fresh_opt, dict(weights), optim)  # a copy: torch adds to it
    assert all(torch.equal(a, b) for a, b in zip(ext.parameters(), fresh.ext.parameters()))
    states = [fresh_opt.state.get(p) for p in fresh.ext.parameters()]
    want = [opt.state.get(p) for p in ext.parameters()]
    assert [s is None for s in states] == [s is None for s in want] and any(s is None for s in want)
    pairs = [(a, b) for a, b in zip(states, want) if a is not None]
    assert all(torch.equal(a[k], b[k]) for a, b in pairs for k in ("step", "exp_avg", "exp_avg_sq")) and pairs
    weights.pop("ext.motion.0.attn.up.weight")
    with pytest.raises(ValueError, match="do not fit this model.*ext.motion.0.attn.up.weight"):
        parallel.load_trainable_state(fresh, fresh_opt, weights, optim)


def test_log_holds_each_step_once_after_resume_and_overwrite(tmp_path, cache_dir, monkeypatch):
    """A run killed after logging steps 5-6 but before checkpointing them resumes from step 4: the log keeps
    steps 1-4 and logs 5-6 again, once. --overwrite starts a new log."""
    out, save = tmp_path / "run", train.save_checkpoint
    steps = lambda: [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()]
    monkeypatch.setattr(train, "save_checkpoint", lambda o, step, *rest: step == 4 and save(o, step, *rest))
    run(out, cache_dir, "--steps", "6", "--log-every", "1")  # the step-6 checkpoint is "lost"
    monkeypatch.setattr(train, "save_checkpoint", save)
    run(out, cache_dir, "--steps", "6", "--log-every", "1", "--resume")
    assert steps() == [1, 2, 3, 4, 5, 6]
    run(out, cache_dir, "--steps", "2", "--log-every", "1", "--overwrite")
    assert steps() == [1, 2]


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, cache_dir, monkeypatch):
    """An --overwrite run killed before its first save holds no adapters, checkpoint or video of the old run
    beside its own config.json."""
    out = tmp_path / "run"
    run(out, cache_dir, "--steps", "1", "--val-every", "1", "--val-steps", "1")
    assert (out / "adapters.safetensors").is_file() and list(out.glob("samples/*.mp4"))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        run(out, cache_dir, "--steps", "1", "--overwrite", "--seed", "7")
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["config.json", "log.jsonl"], left


def test_validation_video_is_decoded_in_tiles(tmp_path, cache_dir, monkeypatch):
    """Validation writes samples/step_N.mp4, decoding in spatial tiles: a whole 480x720 decode (about 10 GiB
    in bf16, extrapolated) would not fit beside the training state on a 24 GB GPU."""
    seen, decode = [], vae.CogVideoXVAE.decode

    def spy(self, latents):
        seen.append(self.tiling)
        return decode(self, latents)

    monkeypatch.setattr(vae.CogVideoXVAE, "decode", spy)
    run(tmp_path, cache_dir, "--steps", "2", "--val-every", "2", "--val-steps", "2")
    assert len(seen) == 1 and isinstance(seen[0], vae.Tiling), seen
    with av.open(str(tmp_path / "samples" / "step_0000002.mp4")) as video:
        assert video.streams.video[0].frames == 9


def test_masking_in_the_real_loop(tmp_path, cache_dir, monkeypatch):
    """In a joint run, every identity step leaves the motion adapters bitwise unchanged, and vice versa."""
    steps, mask = [], adapters.mask_gradients

    def spy(ext, phase, enabled=True):
        before = {f: [p.detach().clone() for p in ext.family_params(f)] for f in ("identity", "motion")}
        mask(ext, phase, enabled)
        steps.append((phase, ext, before))

    monkeypatch.setattr(adapters, "mask_gradients", spy)
    run(tmp_path / "run", cache_dir, "--steps", "12", "--lr", "1e-2", "--warmup", "0")
    assert {phase for phase, *_ in steps} == {"identity", "motion"}, "the run must mix both phases"
    for (phase, _, before), (_, _, after) in zip(steps, steps[1:]):  # `after` = weights after this step
        frozen = "motion" if phase == "identity" else "identity"
        assert all(torch.equal(a, b) for a, b in zip(before[frozen], after[frozen])), f"{frozen} moved"
        assert not all(torch.equal(a, b) for a, b in zip(before[phase], after[phase])), f"{phase} stuck"


def test_ablation_flags_reach_the_loop(tmp_path, cache_dir, monkeypatch):
    """The paper's ablations as train.py flags (test_adapters tests the adapters library on its own)."""
    moved, mask = [], adapters.mask_gradients

    def spy(ext, phase, enabled=True):  # --no-grad-mask: an identity step moves the motion family too
        mask(ext, phase, enabled)
        moved.append(any(p.grad is not None for p in ext.family_params("motion")))

    monkeypatch.setattr(adapters, "mask_gradients", spy)
    run(tmp_path / "leak", cache_dir, "--steps", "2", "--motion-ratio", "0", "--no-grad-mask")
    assert moved == [True, True], moved
    runs = dict(base=[], fixed=["--no-controller"], two=["--groups", "2"], l2=["--l2", "10"])
    for name, flags in runs.items():
        run(tmp_path / name, cache_dir, "--steps", "1", "--log-every", "1", *flags)
    log = {name: json.loads((tmp_path / name / "log.jsonl").read_text()) for name in runs}  # one record each
    keys = {name: load_file(tmp_path / name / "adapters.safetensors").keys() for name in runs}
    assert any(k.startswith("controller.") for k in keys["base"])
    assert not any(k.startswith("controller.") for k in keys["fixed"]), "--no-controller: no StageBlender"
    assert len(log["two"]["omega"]) == 2 and len(log["base"]["omega"]) == 7  # n weight groups
    assert log["l2"]["loss"] > log["base"]["loss"] + 1e-3, "--l2 adds λ‖θ_active‖² to the loss"


def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path, cache_dir, monkeypatch, capsys):
    """--micro-batch 1 runs each motion batch of 3 as 3 forward/backward slices. The accumulated gradient is
    the whole batch's up to summation order: on the first motion step (identical weights before it) the
    gradients agree to 1e-5 of their scale; the identity steps before it, one slice either way, bitwise."""
    mask, mse = adapters.mask_gradients, torch.nn.functional.mse_loss

    def record(grads, forwards):
        def spy(ext, phase, enabled=True):
            mask(ext, phase, enabled)
            grads.append((phase, [p.grad.clone() for p in ext.parameters() if p.grad is not None]))

        def counted(*a, **k):
            forwards.append(len(a[0]))
            return mse(*a, **k)

        monkeypatch.setattr(adapters, "mask_gradients", spy)
        monkeypatch.setattr(train.F, "mse_loss", counted)

    runs = {}
    for name, extra in (("whole", []), ("micro", ["--micro-batch", "1"])):
        runs[name] = [], []
        record(*runs[name])
        run(tmp_path / name, cache_dir, "--steps", "6", "--lr", "1e-2", "--warmup", "0", *extra)
        clips = 1 if extra else 3  # the startup memory estimate is for what one forward holds
        assert f"motion step, {clips} clip(s) per forward" in capsys.readouterr().out
    (whole, whole_fwd), (micro, micro_fwd) = runs["whole"], runs["micro"]
    phases = [p for p, _ in whole]
    assert phases == [p for p, _ in micro] and "motion" in phases
    assert whole_fwd == [3 if p == "motion" else 1 for p in phases] and set(micro_fwd) == {1}
    assert len(micro_fwd) == sum(whole_fwd), "each motion step must run 3 slices of 1"
    first = phases.index("motion")
    for (_, a), (_, b) in zip(whole[:first], micro[:first]):
        assert all(torch.equal(ga, gb) for ga, gb in zip(a, b))
    (_, a), (_, b) = whole[first], micro[first]
    assert len(a) == len(b) > 0
    for ga, gb in zip(a, b):
        assert (ga - gb).abs().max().item() <= 1e-5 * ga.abs().max().item(), "accumulated != whole batch"


def test_isolated_schedule_trains_identity_then_motion_alone(tmp_path, cache_dir, monkeypatch):
    """--schedule isolated (w/o dual-aware adaptation): a block of identity steps with the motion family
    switched off (ω = 0), then motion steps with the identity family off (ω = 1); no controller. Validation
    samples as inference does, with both families at ω = 0.5."""
    seen, validated, mask, sample = [], [], adapters.mask_gradients, diffusion.sample

    def spy(ext, phase, enabled=True):
        mask(ext, phase, enabled)
        seen.append((phase, ext.controller, ext.last_omega.clone()))

    def sample_spy(model, *args, **kw):
        validated.append(model.ext.fixed_omega)
        return sample(model, *args, **kw)

    monkeypatch.setattr(adapters, "mask_gradients", spy)
    monkeypatch.setattr(diffusion, "sample", sample_spy)
    run(tmp_path / "run", cache_dir, "--steps", "6", "--schedule", "isolated", "--warmup", "0", "--val-every",
        "3", "--val-steps", "1")  # fmt: skip
    assert [phase for phase, *_ in seen] == ["identity"] * 3 + ["motion"] * 3
    assert all(controller is None for _, controller, _ in seen)
    for phase, _, omega in seen:
        assert torch.equal(omega, torch.full_like(omega, 1.0 if phase == "motion" else 0.0)), phase
    assert validated == [0.5, 0.5]


def test_ddp_two_processes_share_phases_and_weights(tmp_path):
    """torchrun, 2 gloo processes: the same phase sequence and identical adapter weights on both ranks.
    --micro-batch 1: motion steps run 3 slices, the first two under no_sync(), so a motion step all-reduces
    its gradient buckets as often as a 1-slice identity step does (counted with a DDP communication hook)."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import hashlib, json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, adapters, parallel, train
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
log, reduced, mask, step, wrap = [], [], adapters.mask_gradients, torch.optim.AdamW.step, parallel.wrap
def spy(ext, phase, enabled=True):
    mask(ext, phase, enabled)
    log.append(phase)
def stepped(self, *a, **k):
    out = step(self, *a, **k)
    log.append(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for g in self.param_groups
                                       for p in g["params"])).hexdigest())
    log.append(len(reduced))  # bucket all-reduces so far
    return out
def counting(state, bucket):
    reduced.append(1)
    return allreduce_hook(state, bucket)
def wrapped(model, fsdp):
    net = wrap(model, fsdp)
    net.register_comm_hook(None, counting)
    return net
adapters.mask_gradients, torch.optim.AdamW.step, parallel.wrap = spy, stepped, wrapped
train.main(sys.argv[1:])
json.dump(log, open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".json"), "w"))
""")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, str(probe), *SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--output-dir",
           str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "6", "--lr", "1e-2",
           "--warmup", "0", "--micro-batch", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == 18 and rank0 == rank1, "phases or weights differ between ranks"
    assert len(set(rank0[1::3])) == 6, "the weights must change at every step"
    phases, counts = rank0[0::3], [b - a for a, b in zip([0, *rank0[2::3]], rank0[2::3])]
    assert {"identity", "motion"} <= set(phases) and len(set(counts)) == 1 and counts[0] > 0, (phases, counts)


# for probe scripts: a train.phase_at that exits every rank before step $KILL_AT (its checkpoint is on disk)
KILLED = """def killed(step, rng, args):
    if step == int(os.environ.get("KILL_AT", -1)):
        sys.exit(3)
    return phase_at(step, rng, args)
"""


def test_ddp_resume_continues_each_ranks_own_draws(tmp_path):
    """torchrun, 2 gloo processes, killed after the step-2 checkpoint and resumed: each rank's data, posterior
    and noise draws at steps 2-3 are those of a straight run, and the two ranks never draw alike."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
batch_for, phase_at, rank = train.batch_for, train.phase_at, os.environ["RANK"]
def recorded(phase, cache, args, gen):
    z, text, e = batch_for(phase, cache, args, gen)
    with open(os.path.join(os.environ["DRAWS"], "rank" + rank + ".jsonl"), "a") as f:
        f.write(json.dumps(z.flatten()[:4].tolist()) + "\\n")
    return z, text, e
{KILLED}train.batch_for, train.phase_at = recorded, killed
train.main(sys.argv[1:])
""")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = [str(probe), *SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--steps", "4",
              "--save-every", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    draws, runs = {}, (("straight", [], {}), ("killed", [], {"KILL_AT": "2"}), ("killed", ["--resume"], {}))
    for name, extra, env in runs:
        (tmp_path / name).mkdir(exist_ok=True)
        env = dict(os.environ, DRAWS=str(tmp_path / name), **env)
        cmd = [*torchrun, *common, "--output-dir", str(tmp_path / f"{name}-run"), *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == (1 if "KILL_AT" in env else 0), done.stderr[-3000:]
    for name in ("straight", "killed"):
        draws[name] = [(tmp_path / name / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert draws["killed"] == draws["straight"] and all(len(d) == 4 for d in draws["straight"])
    assert not set(draws["straight"][0]) & set(draws["straight"][1]), "both ranks drew the same data"


def test_fsdp_trains_as_ddp_does_and_resumes_bitwise(tmp_path):
    """torchrun, 2 gloo processes with --fsdp (FSDP2: base and adapters sharded; micro-batches of 1): block
    0's group is freed before block 1 runs; every step's gathered adapter gradients equal DDP's (measured:
    bitwise on step 1, then within 2e-5 as float sums are ordered differently; a sum-instead-of-mean bug
    would double the norm). Killed after the step-2 checkpoint and resumed, it ends bitwise where the
    straight run does; validation (every rank samples, rank 0 writes) works."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, adapters, train
from torch.distributed.tensor import DTensor
mask, phase_at, hook = adapters.mask_gradients, train.phase_at, adapters.DualAdapters.hook
grads, sharded = [], []
def in_block_1(self, i, ctx):  # just before block 1 runs, block 0's group (its adapters too) is freed
    if i == 1:
        sharded.append(isinstance(self.identity[0]["attn"].down.weight, DTensor))
    return hook(self, i, ctx)
def spy(ext, phase, enabled=True):  # after backward: the whole gradients (FSDP2 gathers its shards)
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
    grads.append({{k: full(p.grad).clone() for k, p in ext.named_parameters() if p.grad is not None}})
    mask(ext, phase, enabled)
{KILLED}adapters.mask_gradients, train.phase_at, adapters.DualAdapters.hook = spy, killed, in_block_1
train.main(sys.argv[1:])
out = os.path.join(sys.argv[sys.argv.index("--output-dir") + 1], "probe" + os.environ["RANK"])
torch.save(dict(grads=grads, sharded=sharded), out)
""")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = [str(probe), *SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--steps", "4", "--lr",
              "1e-2", "--warmup", "0", "--save-every", "2", "--micro-batch", "1", "--cache-dir",
              str(tmp_path / "cache")]  # fmt: skip
    runs = (("ddp", [], {}), ("fsdp", ["--fsdp", "--val-every", "4", "--val-steps", "2"], {}),
            ("killed", ["--fsdp"], {"KILL_AT": "2"}), ("killed", ["--fsdp", "--resume"], {}))  # fmt: skip
    for name, extra, env in runs:
        cmd = [*torchrun, *common, "--output-dir", str(tmp_path / name), *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == (1 if env else 0), done.stderr[-3000:]
    (ddp, _), (fsdp, sharded) = (torch.load(tmp_path / n / "probe0").values() for n in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 4
    assert len(sharded) >= 4 and all(sharded), "a block's weights stayed gathered while the next block ran"
    for step, (want, got) in enumerate(zip(ddp, fsdp)):
        assert want.keys() == got.keys(), f"step {step}: different parameters have gradients"
        gap = max(((got[k] - w).abs().max() / w.abs().max().clamp(min=1e-30)).item() for k, w in want.items())
        norms = [torch.stack([g.norm() for g in grads.values()]).norm() for grads in (want, got)]
        assert gap < 1e-4 and abs(norms[1] / norms[0] - 1) < 1e-5, (step, gap, norms)
    straight, resumed = (load_file(str(tmp_path / n / "adapters.safetensors")) for n in ("fsdp", "killed"))
    assert all(torch.equal(resumed[k], v) for k, v in straight.items()), "resumed FSDP run differs"
    with av.open(str(tmp_path / "fsdp" / "samples" / "step_0000004.mp4")) as video:
        assert video.streams.video[0].frames == 9


def test_fsdp_with_compile_stays_compiled(tmp_path):
    """torchrun, 2 gloo processes, --fsdp --compile, 3 steps and a validation video: FSDP2's hooks split each
    compiled block at its adapter calls, and the adapters' shared frames need ~10 variants; past dynamo's
    default limit of 8 they ran eager, with a warning (train.py raises the limit)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, "train.py", *SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--output-dir",
           str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--steps", "3", "--micro-batch",
           "1", "--fsdp", "--compile", "--val-every", "3", "--val-steps", "2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recompile_limit" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step_0000003.mp4").is_file()


def test_compiled_blocks_stay_compiled_in_one_process(tmp_path, cache_dir, monkeypatch):
    """All blocks share their compiled graphs: one per first block or not, phase shape, micro-batch slice size
    and grad mode (validation). With 3 + 3 clips in slices of 2 and a validation video that is 10, past
    dynamo's default limit of 8, after which the rest ran eager (a GPU-only default, so CI forces --compile;
    dynamo's eager backend: the graphs are the same, Inductor's code generation is not needed)."""
    from torch._dynamo.utils import counters

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    batches = ["--subject-batch", "3", "--motion-batch", "3", "--micro-batch", "2", "--val-every", "3"]
    try:  # config.patch, not monkeypatch: pytest 9.2's undo deletes a config entry it did not see in __dict__
        with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; restored on exit
            run(tmp_path / "run", cache_dir, "--steps", "6", "--compile", *batches, "--val-steps", "2")
        frames = dict(counters["frames"])
    finally:
        torch._dynamo.reset()
    assert frames["total"] == frames["ok"] >= 9, frames  # every variant compiled, none left to run eager


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cache_dir, monkeypatch):
    calls, mse = [], torch.nn.functional.mse_loss

    def poisoned(*a, **k):
        calls.append(1)
        return mse(*a, **k) * (float("nan") if len(calls) == 6 else 1.0)

    monkeypatch.setattr(train.F, "mse_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "run", cache_dir, "--steps", "8", "--save-every", "4")
    assert stop.value.code == 1
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000004.pt"]


# ----------------------------------------------------------------------------- bad input


def write_clip(path, n_frames, container="mp4"):
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.codec_context.time_base = Fraction(1, 8)
        c.start_encoding()
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 9 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 8)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def bad_inputs(tmp: Path) -> dict:
    """name -> (extra arguments, expected message)."""
    (tmp / "empty").mkdir()
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp / "text.mp4").write_text("not a video\n" * 20)
    good = write_clip(tmp / "good.mp4", 12)
    (tmp / "cut.mp4").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    write_clip(tmp / "none.avi", 0, "avi")
    (tmp / "cog15" / "transformer").mkdir(parents=True)  # a CogVideoX 1.5 config (setup reads no weights)
    encoders.CLIPVisionConfig(**encoders.TINY_CLIP).save_pretrained(tmp / "clip-config-only")  # no weights
    (tmp / "cog15" / "transformer" / "config.json").write_text(json.dumps(dict(patch_size_t=2, num_layers=2)))
    return {
        "missing subject dir": (["--subject", str(tmp / "nowhere")], "subject folder not found"),
        "empty subject dir": (["--subject", str(tmp / "empty")], "no .jpg/.jpeg/.png/.webp images"),
        "no decodable image": (["--subject", str(tmp / "broken")], "no decodable image .*tried: a.jpg"),
        "missing motion": (["--motion", str(tmp / "nowhere.mp4")], "motion clip not found"),
        "motion not a video": (["--motion", str(tmp / "text.mp4")], "not a video"),
        "motion with zero frames": (["--motion", str(tmp / "none.avi")], "0 distinct frames"),
        "motion a still image": (["--motion", str(SUBJECT / "00.jpg")], "1 distinct frames decoded"),
        "motion cannot be decoded": (["--motion", str(tmp / "cut.mp4")], "cannot|0 distinct|not a video"),
        "motion ratio": (["--motion-ratio", "1.5"], r"--motion-ratio must be in \[0, 1\]"),
        "steps": (["--steps", "0"], "--steps must be >= 1"),
        "steps not a number": (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        "micro batch": (["--micro-batch", "0"], "--micro-batch must be >= 1"),
        "save every": (["--save-every", "0"], "--save-every must be >= 1"),
        "val steps": (["--val-steps", "0"], "--val-steps must be >= 1"),
        "learning rate": (["--lr", "-1"], "--lr must be >= 0"),
        "warmup": (["--warmup", "-5"], "--warmup must be >= 0"),
        "missing clip model": (["--clip-model", str(tmp / "noclip")], "noclip: no such folder"),
        "clip model without weights": (["--clip-model", str(tmp / "clip-config-only")], "no file named"),
        "a newline in a path": (["--subject", str(tmp / "two\nlines")], "not found: .*two lines"),
        "negative height": (["--height", "-16"], "--width in 16, 32"),
        "negative width": (["--width", "-32"], "--width in 16, 32"),
        "negative frames": (["--frames", "-7"], "--frames must be >= 1"),
        "fsdp without torchrun": (["--fsdp"], "--fsdp shards the model over torchrun's processes"),
        "frames": (["--frames", "13"], "8k\\+1"),  # 4 latent frames would decode to 16
        "CogVideoX 1.5": (["--model", str(tmp / "cog15")], "is a CogVideoX 1.5 model"),
    }


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, cache_dir, capsys):
    cases = bad_inputs(tmp_path)
    for name, (extra, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        args = [*SMALL, "--subject", str(SUBJECT), "--motion", str(MOTION), "--output-dir", str(out),
                "--cache-dir", cache_dir, "--steps", "2", *extra]  # fmt: skip
        with pytest.warns(UserWarning) if name == "no decodable image" else _nothing():
            with pytest.raises(SystemExit) as stop:
                train.main(args)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("error: "), f"{name}: {err!r}"
        assert __import__("re").search(message, err), f"{name}: {err!r}"
        assert not out.exists(), f"{name}: wrote into the output dir"


def test_tf32_on_cuda_as_the_official_recipe(tmp_path, cache_dir, monkeypatch, capsys):
    """The official recipe passes --allow_tf32: on CUDA the fp32 adapter matmuls run on TF32 tensor cores. A
    CUDA device is faked up to setup, which stops at a bad flag before any CUDA call; the CPU stays fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(parallel, "init", lambda: (0, 1, torch.device("cuda")))
    try:
        with pytest.raises(SystemExit):
            run(tmp_path / "run", cache_dir, "--steps", "0")
        assert torch.backends.cuda.matmul.allow_tf32 is True
        monkeypatch.setattr(parallel, "init", lambda: (0, 1, torch.device("cpu")))
        with pytest.raises(SystemExit):
            run(tmp_path / "run", cache_dir, "--steps", "0")
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_output_dir_of_another_run(tmp_path, cache_dir, capsys, monkeypatch):
    out = tmp_path / "run"
    run(out, cache_dir, "--steps", "1")
    before = hashlib.sha256((out / "config.json").read_bytes()).hexdigest()
    init = parallel.init
    for extra, message, world in [
        ((), "already holds a run", 1),
        (("--resume", "--seed", "7"), "holds a different run (seed 42 -> 7)", 1),
        (("--resume",), "holds a different run (world_size 1 -> 2)", 2),  # other ranks, other draws
    ]:
        monkeypatch.setattr(parallel, "init", lambda w=world: (0, w, init()[2]))
        with pytest.raises(SystemExit) as stop:
            run(out, cache_dir, "--steps", "1", *extra)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(parallel, "init", init)
    assert hashlib.sha256((out / "config.json").read_bytes()).hexdigest() == before
    run(out, cache_dir, "--steps", "1", "--seed", "7", "--overwrite")  # --overwrite starts over
    assert json.loads((out / "config.json").read_text())["args"]["seed"] == 7


def test_every_file_of_a_run_but_the_log_is_written_atomically(tmp_path, cache_dir, monkeypatch):
    """config.json, the checkpoint, adapters.safetensors and the validation video go through data.atomic_write
    (temp file, fsync, rename), so a crash leaves each whole or absent; log.jsonl is appended line by line."""
    written, real = set(), data.atomic_write
    monkeypatch.setattr(data, "atomic_write", lambda path, write: written.add(path) or real(path, write))
    out = tmp_path / "run"
    run(out, cache_dir, "--steps", "1", "--val-every", "1", "--val-steps", "1")
    files = {p for p in out.rglob("*") if p.is_file()} - {out / "log.jsonl"}
    names = {"config.json", "adapters.safetensors", "step_0000001.pt", "step_0000001.mp4"}
    assert {p.name for p in files} == names and files <= written, (files, written)


def test_subject_folder_may_hold_a_folder_named_like_an_image(tmp_path, cache_dir):
    subject, out = tmp_path / "subject", tmp_path / "out"
    shutil.copytree(SUBJECT, subject)
    (subject / "old.jpg").mkdir()  # skipped by the loader, and by the cache key that hashes the images
    train.main([*SMALL, "--subject", str(subject), "--motion", str(MOTION), "--output-dir", str(out),
                "--cache-dir", cache_dir, "--steps", "1"])  # fmt: skip
    assert (out / "adapters.safetensors").is_file()


def test_rank_0_writes_into_the_output_dir_only_after_every_rank_checked_it(tmp_path, cache_dir, monkeypatch):
    """Under torchrun every rank's setup refuses an --output-dir that holds a run. Rank 0 wrote config.json
    before the ranks met, so a slower rank found it and stopped: "already holds a run"."""
    out, met = tmp_path / "run", []
    monkeypatch.setattr(parallel, "barrier", lambda: met.append(out.exists()))
    run(out, cache_dir, "--steps", "1")
    assert met[0] is False and (out / "config.json").is_file()


def test_runs_without_git_on_the_path(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # slim containers: no git; config.json records none
    run(tmp_path / "run", cache_dir, "--steps", "1")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["versions"]["git"] is None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
