"""The device data path of training: K whole training steps per host round-trip, one compiled function.

`trainer.train_and_evaluate` calls `run(run, meta)` when `trainer.choose_pipeline` picks the device path. The
case store's training cases are placed on the devices once (`clips_jax.data.device.device_store_from`,
replicated), and one jitted, donated function advances the run by K steps with `lax.scan`; per step it

1. at a stage boundary (step % `curriculum.stage_steps` == 0): closes the previous stage
   (`curriculum.end_stage`, e.g. the Exp3.S round) and computes the stage's sampling weights
   (`curriculum.weights`), kept in the carry for the whole stage;
2. draws the global batch from those weights (`device.sample_batch`: case draw, crop centre, affine, flips,
   SUV intensity augmentations, the 5 channels), element b keyed by `fold_in(fold_in(key, step), b)`, so the
   batch does not depend on the number of devices; it is then laid out over the mesh's "data" axis;
3. takes the smoothing sigma (`curriculum.sigma`), runs the train step (forward/backward, optax update, the
   non-finite guard; `trainer.make_train_step`) and
4. updates the curriculum with the step's observation (the supervised loss of lesion-centred crops, the
   prediction gain when the curriculum declares `needs_gain`).

Nothing depends on the step on the host, so the same compiled function serves every stage and curriculum
state (one compilation per distinct chunk length). The whole state is (train state, curriculum state, the
stage's weights, the step; the PRNG key is `PRNGKey(config.seed)`): a run interrupted at any checkpoint
resumes with exactly the per-step losses of an uninterrupted one. Logging, validation and checkpoints happen
between chunks; a chunk ends at the next step where one of them is due (`_Run.next_stop`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clips_jax import curricula, trainer


def make_chunk_fn(run, n_steps: int):
    """The pure function `(state, cur_state, weights, key, dstore) -> (state, cur_state, weights, per-step metrics)`
    advancing a run by `n_steps` steps (see the module docstring). Not yet jitted."""
    from clips_jax.data import device

    c, cur = run.config, run.cur
    d = c.data
    stage_steps = int(c.curriculum.stage_steps)
    batch = int(d.batch_size)
    poison = jnp.asarray([int(s) for s in c.debug.poison_steps] or [-1], jnp.int32)
    sample_kw = dict(
        batch_size=batch,
        patch_shape=tuple(int(v) for v in d.patch_shape),
        p_foreground=float(d.p_foreground),
        p_hot_negative=float(d.get("p_hot_negative", 0.0)),
        augment=bool(d.augment),
    )
    spread = run.mesh.size > 1

    def begin_stage(cs, w, step):
        boundary = step % stage_steps == 0
        cs = jax.lax.cond(boundary & (step > 0), cur.end_stage, lambda s: s, cs)
        w = jax.lax.cond(boundary, lambda: cur.weights(cs, step).astype(jnp.float32), lambda: w)
        return cs, w

    def one_step(carry, _, key, ds):
        st, cs, w = carry
        step = st["step"]
        cs, w = begin_stage(cs, w, step)
        b = device.sample_batch(jax.random.fold_in(key, step), w, ds, **sample_kw)
        image = jnp.where(jnp.any(poison == step), jnp.nan, b["image"])
        xb = {"image": image, "label": b["label"], "labeled": b["labeled"]}
        if spread:
            xb = jax.lax.with_sharding_constraint(xb, run.dsh)
        sigma = cur.sigma(cs, step)
        st, m = run.step_fn(st, xb, sigma)
        obs = curricula.observation_from_step(
            b["case_index"], b["lesion_centred"], m["finite"], m["supervised"], m.get("gain"), step
        )
        cs = cur.update(cs, obs)
        reward = obs.reward
        out = {
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "finite": m["finite"],
            "sigma": sigma,
            "per_sample": m["per_sample"],
            "supervised": m["supervised"],
            "case_index": b["case_index"],
            "centred": b["lesion_centred"],
            "reward": reward,
            "weights": w,
            "nonfinite": st["nonfinite"],
        }
        return (st, cs, w), out

    def chunk(state, cur_state, weights, key, dstore):
        body = lambda carry, x: one_step(carry, x, key, dstore)  # noqa: E731 - the store is closed over, not carried
        if n_steps == 1:  # no loop at all (see `steps_per_call`: XLA:CPU runs loop bodies far slower)
            (state, cur_state, weights), out = body((state, cur_state, weights), None)
            return state, cur_state, weights, jax.tree.map(lambda a: a[None], out)
        (state, cur_state, weights), out = jax.lax.scan(body, (state, cur_state, weights), None, length=n_steps)
        return state, cur_state, weights, out

    return chunk


def steps_per_call(config) -> int:
    """Steps per compiled call: `config.steps_per_call`, or with 0 ("auto") 1 on CPU and 10 on accelerators.

    On XLA:CPU a training step inside `lax.scan` (a while loop) ran ~12x slower than the same step compiled on
    its own (narrow U-Net, 32^3, measured 2026-11-30: 1,683 ms vs 139 ms; BENCHMARKS.md), so the CPU calls one
    step at a time; everything else (sampling, augmentation, curriculum) stays inside the compiled step.
    """
    k = int(config.get("steps_per_call", 0))
    if k > 0:
        return k
    return 1 if jax.default_backend() == "cpu" else 10


def _chunk_rows(run, out: dict, first_step: int) -> list[dict]:
    """Metrics rows ("curriculum" at stage starts, "train" per step) of one chunk's per-step outputs."""
    stage_steps = int(run.config.curriculum.stage_steps)
    rows = []
    train_idx = run.train_idx
    for i in range(out["loss"].shape[0]):
        step = first_step + i
        if step % stage_steps == 0:
            rows.append(run.stage_row(step, np.asarray(out["weights"][i], np.float64), float(out["sigma"][i])))
        m = {k: out[k][i] for k in ("loss", "grad_norm", "finite", "sigma", "per_sample", "supervised")}
        case_index = train_idx[np.asarray(out["case_index"][i])]
        rows.append(run.train_row(step + 1, m, case_index, out["centred"][i], float(out["reward"][i])))
    return rows


def run(run, meta: dict | None) -> None:
    """Train `run` (a `trainer._Run`) to `config.steps` with the device data path."""
    from clips_jax.data import device

    c = run.config
    dstore = device.device_store_from(
        run.store, run.train_idx, hot_suv=float(c.data.get("hot_suv", 2.5)), extra_channels=trainer.extra_channels(c)
    )
    dstore = jax.device_put(dstore, run.repl)
    n = len(run.train_idx)
    weights = np.zeros(n, np.float32) if meta is None else np.asarray(meta["weights"], np.float32)
    weights = jax.device_put(jnp.asarray(weights), run.repl)
    key = jax.device_put(jax.random.PRNGKey(int(c.seed)), run.repl)
    k_max = steps_per_call(c)
    compiled: dict[int, Any] = {}

    def chunk_fn(length: int):
        if length not in compiled:
            compiled[length] = jax.jit(
                make_chunk_fn(run, length),
                donate_argnums=(0, 1, 2),
                out_shardings=(run.repl, run.repl, run.repl, run.repl),
            )
        return compiled[length]

    def save_meta():
        return {
            "pipeline": "device",
            "weights": np.asarray(jax.device_get(weights)).tolist(),
            "stage": (run.step - 1) // int(c.curriculum.stage_steps) if run.step else 0,
        }

    while run.running():
        first = run.step
        length = min(k_max, run.next_stop() - first)
        run.state, run.cur_state, weights, out = chunk_fn(length)(run.state, run.cur_state, weights, key, dstore)
        out = jax.device_get(out)
        run.step, run.steps_done = first + length, run.steps_done + length
        run.writer.write_many(_chunk_rows(run, out, first))
        hit = np.flatnonzero(np.asarray(out["nonfinite"]) >= int(c.max_nonfinite))
        if hit.size:  # the first step of the chunk at which the streak reached the limit
            run.check_diverged(int(out["nonfinite"][hit[0]]), first + int(hit[0]) + 1)
        run.after_steps(float(out["loss"][-1]), float(out["grad_norm"][-1]), float(out["sigma"][-1]), save_meta)
