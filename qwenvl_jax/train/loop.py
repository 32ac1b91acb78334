"""The training loop: restore or initialise, step, log, checkpoint, stop on SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from qwenvl_jax import checkpoint as ckpt_lib
from qwenvl_jax import compiler, fileio
from qwenvl_jax import flops as flops_lib
from qwenvl_jax.data.batch import real_work
from qwenvl_jax.metrics import MetricsWriter
from qwenvl_jax.train import inputs
from qwenvl_jax.train import remat as remat_lib
from qwenvl_jax.train.inputs import make_data_iterator, make_eval_iterator
from qwenvl_jax.train.nonfinite import NonFiniteGuard
from qwenvl_jax.train.sources import initial_params
from qwenvl_jax.train.state import check_setup, describe, log, step_model_flops
from qwenvl_jax.train.step import aot_compile, make_eval_step, make_train_step, to_step_batch
from qwenvl_jax.train.validate import validate


class _Preemption:
    """Stops every process at the same step after a SIGTERM (preemption notice), without a
    collective in the step loop.

    One process: a Python SIGTERM handler sets a flag, read after every step.

    Several processes (all must checkpoint the same step): with JAX's preemption service (on by
    default with `jax.distributed`), its notifier catches SIGTERM on whichever host gets it, the
    coordination service spreads the notice in the background, and
    `multihost_utils.reached_preemption_sync_point(step)` turns True on every host at the same
    step (one past the largest step any host had reached): a local flag read per step, no
    device or network round trip. Without the service (`jax_enable_preemption_service=False`)
    the hosts' flags are all-gathered every `check_every` steps: a blocking collective, but one
    in `check_every` steps; a notice then waits at most `check_every` steps.
    """

    def __init__(self, check_every: int = 10):
        if check_every < 1:
            raise ValueError(f"config.checkpoint.preemption_check_every={check_every}; use >= 1")
        self.check_every = int(check_every)
        self.flag = False
        self._old = None
        self.mode = "local"
        if jax.process_count() > 1:
            from jax._src import distributed

            has_service = distributed.global_state.preemption_sync_manager is not None
            self.mode = "service" if has_service else "allgather"

    def install(self):
        if self.mode == "service":
            return  # the service's notifier owns SIGTERM; a Python handler would replace it

        def handler(signum, frame):
            logging.warning("SIGTERM received: will checkpoint after the current step and exit")
            self.flag = True

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None

    def uninstall(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step (the service counts the calls)."""
        if self.mode == "local":
            return self.flag
        from jax.experimental import multihost_utils

        if self.mode == "service":
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop:
                logging.warning("SIGTERM on some host: every host checkpoints step %d", step)
            return stop
        if step % self.check_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.array([self.flag]))))


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    """`x` summed over the processes (every process logs at the same steps, so all call it)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    # float32 (JAX's default width): the sums are rates' numerators, 1e-7 relative is plenty.
    return np.asarray(multihost_utils.process_allgather(x.astype(np.float32))).sum(0)


def evaluate(cfg, s, params, eval_step) -> dict[str, float]:
    """Held-out loss and token accuracy on the first `eval.batches` batches of `eval.data` (a fresh
    iterator in file order each time, so every evaluation sees the same batches)."""
    per_host = int(cfg.batch_size) // jax.process_count()
    total = {"loss_sum": 0.0, "tokens": 0.0, "correct": 0.0}
    it = make_eval_iterator(cfg, s.mcfg, per_host)
    try:
        for _ in range(int(cfg.eval.batches)):
            m = jax.device_get(eval_step(params, to_step_batch(next(it), s)))
            total = {k: v + float(m[k]) for k, v in total.items()}
    finally:
        it.close()
    n = max(total["tokens"], 1.0)
    return {
        "eval/loss": total["loss_sum"] / n,
        "eval/accuracy": total["correct"] / n,
        "eval/tokens": total["tokens"],
    }


_FIRST_STEP_BARRIERS = 0


def _start_together(s, step_fn, compiled):
    """Several processes: each compiles the step ahead, then all meet before the first step.

    A host that compiled its step or read its first batch later than the others would make
    them wait at the step's first collective, and a CPU (Gloo) clique waits only 30 s for its
    peers when it is first used, which kills the run. The coordination service's barrier has no
    such limit, so the first collective finds every process there.

    Returns:
      (the step to call, its compiled executable).
    """
    global _FIRST_STEP_BARRIERS
    from jax._src import distributed

    if compiled is None:
        t = time.time()
        compiled = aot_compile(s)
        log(f"train step compiled ahead in {time.time() - t:.1f}s")
        step_fn = make_train_step(s, compiled)
    client = distributed.global_state.client
    if client is not None:
        _FIRST_STEP_BARRIERS += 1
        t = time.time()
        client.wait_at_barrier(f"qwenvl_jax_first_step_{_FIRST_STEP_BARRIERS}", 3_600_000)
        log(f"all {jax.process_count()} processes ready after {time.time() - t:.1f}s")
    return step_fn, compiled


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after: int | None = None,
    devices=None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Runs (or resumes) training in `workdir`. Returns the logged metrics of this invocation.

    Args:
        cfg: a resolved stage config (configs/*.py).
        workdir: output directory (checkpoints, TensorBoard, metrics.jsonl, config.json).
        stop_after: testing aid: return after this many optimizer steps of this invocation.
        devices: devices for the mesh (default all).
        on_step: called with (step, total steps) after each optimizer step is dispatched (a
            progress display; it must be cheap: the step runs on while it does).
    """
    # A config the run cannot use stops here in one line, before anything is read or allocated.
    validate(cfg, workdir=workdir, devices=jax.devices() if devices is None else devices)
    guard = NonFiniteGuard(cfg)  # checks config.optim.nonfinite and max_nonfinite_steps
    # What the run trains on comes first, and a run with no data stops here, before the model.
    log(inputs.describe(cfg))
    fileio.makedirs(workdir)
    s, compiled = remat_lib.resolve(cfg, devices)  # "auto" remat: compiles to choose
    cfg = s.cfg
    check_setup(s)
    if jax.process_index() == 0:
        s.mcfg.save_hf_json(fileio.join(workdir, "config.json"))
        train_json = cfg.to_json_best_effort(indent=2)
        fileio.write_text(fileio.join(workdir, "train_config.json"), train_json)
    log(f"config:\n{cfg}")
    log(describe(s))

    total = int(cfg.steps)
    ckpt = ckpt_lib.Checkpointer(workdir, int(cfg.checkpoint.keep), bool(cfg.checkpoint.async_save))
    restored = ckpt.restore_latest(s.abstract_params, s.abstract_opt)
    data = make_data_iterator(cfg, s.mcfg, int(cfg.batch_size) // jax.process_count())
    if restored is not None:
        start, params, opt_state, meta = restored
        states = meta.get("data_state")
        if states and len(states) == jax.process_count():
            data.set_state(json.loads(states[jax.process_index()]))
        elif states:
            logging.warning(
                "checkpoint holds data states of %d processes, this run has %d: the data iterator"
                " restarts from its seed (samples may repeat)",
                len(states),
                jax.process_count(),
            )
        log(f"resumed from {ckpt.directory} step {start}")
    else:
        start = 0
        params, desc = initial_params(s)
        opt_state = jax.jit(s.tx.init, out_shardings=s.opt_sharding)(params)
        log(f"initialised params from {desc}")
    guard.start(opt_state)
    last_saved = start if restored is not None else None  # the newest checkpoint, for messages

    cache = compiler.enable_cache(str(cfg.compilation_cache_dir))
    hits0 = cache.hits if cache else 0
    step_fn = make_train_step(s, compiled)
    eval_step = make_eval_step(s) if inputs.eval_spec(cfg) is not None else None
    writer = MetricsWriter(workdir, total)
    flops_step = step_model_flops(s)
    dev = s.mesh.devices.flat[0]
    peak = flops_lib.chip_peak(cfg.chip or None, dev.device_kind)
    n_chips = s.mesh.devices.size
    preempt = _Preemption(int(cfg.checkpoint.preemption_check_every))
    preempt.install()
    meta = {"seed": int(cfg.seed), "scan_layers": bool(cfg.model.scan_layers), "stage": cfg.stage}
    meta["config"] = json.loads(cfg.to_json_best_effort())
    history = []
    metrics_log = fileio.JsonLines(fileio.join(workdir, "metrics.jsonl"))
    t_last, steps_since, wait_since, imgs_since = time.time(), 0, 0.0, 0.0
    work_since = np.zeros(3)  # this process's real tokens, attended square, images since the log
    step = start
    try:
        while step < total:
            t0 = time.time()
            local = next(data)
            wait = time.time() - t0
            wait_since += wait
            batch = to_step_batch(local, s)
            if step == start and jax.process_count() > 1:
                step_fn, compiled = _start_together(s, step_fn, compiled)
            t_step = time.time()
            params, opt_state, m = step_fn(params, opt_state, batch)
            guard.record(step + 1, m)  # unread until the next log or checkpoint step
            if step == start and compiled is None:  # the call compiled (or loaded) the step
                compile_s = time.time() - t_step
                hit = "" if cache is None else f", persistent cache hits {cache.hits - hits0}"
                log(f"train step compiled in {compile_s:.1f}s{hit}")
            step += 1
            steps_since += 1
            if on_step is not None:
                on_step(step, total)
            if "image_valid" in local:
                imgs_since += float(np.sum(local["image_valid"]))
            w = real_work(local)  # on the host rows, while the device runs the step
            work_since += (w["tokens"], w["attended"], w["images"])
            ev = None
            if eval_step is not None and (step % int(cfg.eval.every_steps) == 0 or step == total):
                # The steps dispatched so far finish first: their time is training time, not
                # evaluation time (subtracted below).
                jax.block_until_ready(params)
                t_eval = time.time()
                ev = evaluate(cfg, s, params, eval_step)
                t_last += time.time() - t_eval  # step_s and tokens/s time the training alone
                log(f"eval step {step}: loss {ev['eval/loss']:.4f}, token accuracy"
                    f" {ev['eval/accuracy']:.4f} ({ev['eval/tokens']:.0f} tokens)")  # fmt: skip
            logged = step % int(cfg.log_every) == 0 or step == total or ev is not None
            if logged:
                m = jax.device_get(m)
                now = time.time()
                dt = (now - t_last) / steps_since
                rec = {k: float(v) for k, v in m.items()}
                rec.update(
                    step=step,
                    step_s=dt,
                    data_wait_s=wait_since / steps_since,
                    tokens_per_s=cfg.batch_size * cfg.data.seq_len / dt,
                    images_per_s=imgs_since * jax.process_count() / (dt * steps_since),
                    model_tflops_per_s=flops_step / dt / 1e12,
                )
                if cfg.optim.vit_lr_decay and cfg.optim.vit_lr_decay != 1.0:
                    nl = s.mcfg.visual.layers
                    rec["lr_vit_first_block"] = rec["lr"] * cfg.optim.vit_lr_decay**nl
                # MFU two ways: counting the images the step encodes (every slot, or the budget)
                # and counting only the real images of these batches.
                real = imgs_since * jax.process_count() / steps_since
                flops_real = step_model_flops(s, images=real)
                rec["model_tflops_per_s_real_images"] = flops_real / dt / 1e12
                # Goodput: only the real work of these batches (non-padding tokens, attention
                # within each packed sample, valid images), summed over the processes.
                tok, attended, img = map(float, _sum_over_processes(work_since) / steps_since)
                work = dict(tokens=tok, attended=attended, images=img)
                flops_work = step_model_flops(s, work=work)
                rec["real_tokens_per_s"] = tok / dt
                rec["real_token_fraction"] = tok / (cfg.batch_size * cfg.data.seq_len)
                rec["real_images_per_s"] = img / dt
                rec["model_tflops_per_s_real"] = flops_work / dt / 1e12
                if peak:
                    rec["mfu"] = flops_lib.mfu(flops_step, dt, n_chips, peak)
                    rec["mfu_real_images"] = flops_lib.mfu(flops_real, dt, n_chips, peak)
                    rec["mfu_real"] = flops_lib.mfu(flops_work, dt, n_chips, peak)
                if hasattr(data, "metrics"):  # the pipeline's packing efficiency and skips
                    rec.update({k: float(v) for k, v in data.metrics().items()})
                rec.update(ev or {})
                writer.write(step, rec)
                history.append(rec)
                if jax.process_index() == 0:
                    metrics_log.append(json.dumps(rec))
                t_last, steps_since, wait_since, imgs_since = time.time(), 0, 0.0, 0.0
                work_since = np.zeros(3)
            if step == int(cfg.pause_after_step):
                # Held before this step's checkpoint: a SIGTERM now (seen through the local
                # handler's flag) checkpoints this very step; deleting the file goes on.
                hold = fileio.join(workdir, f"paused_at_step_{step}.process_{jax.process_index()}")
                log(f"paused after step {step}: delete {hold} to go on, or SIGTERM to stop here")
                fileio.hold(hold, f"{step}\n", stop=lambda: preempt.flag)
            stop = preempt.should_stop(step)
            save = step % int(cfg.checkpoint.every_steps) == 0 or step == total or stop
            if logged or save:
                # Before any save: a step the policy stops at is never followed by a checkpoint.
                guard.check(last_saved)
            if save:
                ckpt.save(step, params, opt_state, meta, json.dumps(data.get_state()), wait=stop)
                last_saved = step
            if stop:
                logging.warning("checkpointed step %d after SIGTERM; exiting", step)
                break
            if stop_after is not None and step - start >= stop_after:
                break
        n_compiled = 1 if compiled is not None else step_fn._cache_size()
        if n_compiled > 1:
            logging.warning("the train step was compiled %d times (expected once)", n_compiled)
    finally:
        ckpt.close()
        writer.close()
        preempt.uninstall()
        if hasattr(data, "close"):  # stops Grain worker processes and prefetch threads
            data.close()
    return history
