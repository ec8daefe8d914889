"""The training loop: plans from rank 0, micro-batches from the loader, one StepRunner step, bookkeeping.

Nothing here depends on how the model is parallelised: megakv/parallel/wrap.py builds the runner, and
the loop only reads what the runner reports. Loss sums are reduced over the data-parallel group (every
pipeline stage and tensor rank of a replica reports the same figures); the stop flag over the world.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from megakv.config import MegaKVConfig, to_yaml
from megakv.config.errors import ConfigError
from megakv.data.boundaries import mask_documents
from megakv.data.errors import DataError
from megakv.data.tokenizer import refresh_copy
from megakv.optim.schedule import resume_schedule_notice
from megakv.parallel import ParallelContext
from megakv.parallel.materialize import SafetensorsWeights
from megakv.parallel.runners import StepRunner
from megakv.parallel.wrap import build_runner
from megakv.routing import deployment_plan
from megakv.train import EXIT_DIVERGED, EXIT_OK
from megakv.train.checkpoint import CheckpointManager, load_checkpoint
from megakv.train.metrics import MetricsWriter, format_duration, routing_scalars
from megakv.train.plans import broadcast_step_plans, check_plans_agree, plans_per_step
from megakv.train.preflight import Launch
from megakv.train.run_dir import LOGS, METRICS, TENSORBOARD, TOKENIZER, checkpoints_dir, write_status
from megakv.train.signals import StopRequest
from megakv.train.state import TrainState
from megakv.train.throughput import EtaClock, StepMeter
from megakv.train.validation import validation_batches, validation_losses

log = logging.getLogger("megakv.train")



def _init_weights(cfg: MegaKVConfig, model_dir: str) -> Mapping[str, torch.Tensor]:
    from megakv.model_dir import WEIGHTS_FILE, load_model, load_model_config

    def check_same_model(source_cfg) -> None:
        if source_cfg != cfg.model:
            raise ConfigError("checkpoint.init_from", model_dir, "the model directory's config differs from model:",
                              "use the same model settings as the directory's config.yaml")

    # ZeRO-3 and TP build partitioned (megakv/parallel/materialize.py) and a pipeline stage loads its own
    # layers, each reading one tensor at a time: no dense copy per rank (a stage read the whole model).
    if cfg.parallel.zero_stage == 3 or cfg.parallel.tensor > 1 or cfg.parallel.pipeline > 1:
        check_same_model(load_model_config(model_dir))
        return SafetensorsWeights(Path(model_dir) / WEIGHTS_FILE, cfg.model)
    source = load_model(model_dir)
    check_same_model(source.cfg)
    return source.state_dict()


class Trainer:
    def __init__(self, cfg: MegaKVConfig, launch: Launch, ctx: ParallelContext, stop: StopRequest | None = None):
        """`stop`: a request caught since the process started (StopRequest.catch_early), kept."""
        self.cfg, self.launch, self.ctx = cfg, launch, ctx
        self.layout = ctx.layout
        self.run_dir = launch.run_dir
        self.seq_len = cfg.seq_len  # data.seq_len, else the model's context
        self.stop = (stop or StopRequest()).install()
        self.metrics: MetricsWriter | None = None
        self.plan_trace = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from megakv.data.loader import build_data

        cfg, ctx = self.cfg, self.ctx
        self.data = build_data(cfg.data, self.seq_len, is_builder=ctx.is_global_zero, barrier=ctx.barrier,
                               train_samples=cfg.train.steps * cfg.train.global_batch)
        self.data.check_validation(cfg.validation.every)
        resume = self.launch.resume
        try:  # the checks are the data layer's; the error names the config field to change
            self.data.check_model_vocab(cfg.model.vocab_size)
        except DataError as e:
            raise ConfigError("model.vocab_size", cfg.model.vocab_size, e.problem, e.fix) from None
        if resume is not None:
            saved = resume.state
            try:
                self.data.check_resume({"consumed_samples": saved.consumed_samples,
                                        "data_fingerprint": saved.data_fingerprint,
                                        "loss_mask_fingerprint": saved.loss_mask_fingerprint},
                                       resume.path, cfg.train.run_dir)
            except DataError as e:
                raise ConfigError("data.datasets", cfg.data.datasets, e.problem, e.fix) from None
        init_state = None
        if cfg.checkpoint.init_from and resume is None:
            init_state = _init_weights(cfg, cfg.checkpoint.init_from)
        self.runner: StepRunner = build_runner(cfg, ctx, self.launch.ds_config, init_state)
        if init_state is not None and ctx.is_global_zero:
            log.info("weights loaded from checkpoint.init_from=%s", cfg.checkpoint.init_from)
        mask_documents(self.runner.engine.module, self.data.eos_id, cfg.data.reset_attention_mask,
                       cfg.data.reset_position_ids)
        self.meter = StepMeter(cfg.model, self.seq_len, cfg.train.global_batch * self.seq_len,
                               dist.get_world_size(), ctx.device, cfg.logging.peak_flops_per_device)
        if ctx.is_global_zero:
            log.info(self.meter.startup_line())
        self.state = TrainState(**self.data.resume_state(0), routing_seed=cfg.routing.seed,
                                layout={**self.layout.describe(), "zero_stage": cfg.parallel.zero_stage},
                                config_yaml=to_yaml(cfg))
        if resume is not None:
            load_checkpoint(self.runner.engine, resume, self.layout.rank)
            saved = resume.state
            self.state.step, self.state.consumed_samples, self.state.tokens = (
                saved.step, saved.consumed_samples, saved.tokens)
            self.state.skipped_steps, self.state.nonfinite_in_a_row = saved.skipped_steps, saved.nonfinite_in_a_row
            log.info("resumed from %s at step %d (%d samples consumed)", resume.path, saved.step,
                     saved.consumed_samples)
            # The optimizer's saved param groups carry the checkpoint's rate: the current schedule decides it.
            self.runner.engine.lr_scheduler.reapply()
            notice = resume_schedule_notice(saved.config_yaml, cfg, saved.step - saved.skipped_steps)
            if notice is not None and ctx.is_global_zero:
                log.warning(notice)
        self.checkpoints = CheckpointManager(checkpoints_dir(self.run_dir), self.layout.rank,
                                             cfg.checkpoint.keep_last, cfg.train.debug.sigkill_while_saving_step,
                                             run_id=self.launch.run_id)
        if resume is not None and not resume.universal:
            self.checkpoints.last_saved_step = resume.state.step
        self.valid_batches, self.valid_weights = validation_batches(
            self.data.valid, cfg.validation.samples, cfg.train.micro_batch, self.layout.data_rank,
            self.layout.data_parallel)
        self.valid_plans = {spec: deployment_plan(spec, cfg.model.n_layers) for spec in cfg.validation.plans}
        if self.layout.holds_loss:
            tb_dir = self.run_dir / TENSORBOARD if cfg.logging.tensorboard else None
            self.metrics = MetricsWriter(self.run_dir / METRICS, tb_dir, first_step=self.state.step + 1)
        if ctx.is_global_zero:
            if self.data.tokenizer_dir is not None:  # what the export ships: this data's, not an earlier start's
                refresh_copy(self.data.tokenizer_dir, self.run_dir / TOKENIZER)
            write_status(self.run_dir, "running", step=self.state.step)
        if cfg.train.debug.check_plans:
            self.plan_trace = open(self.run_dir / LOGS / f"plans_rank{self.layout.rank}.txt", "a", buffering=1)

    # ------------------------------------------------------------------ one step
    def _micro_batches(self):
        from megakv.data.loader import micro_batches

        return micro_batches(self.data.train, self.state.consumed_samples, self.cfg.train.global_batch,
                             self.cfg.train.micro_batch, self.layout.data_rank, self.layout.data_parallel)

    def _tokens_per_micro_batch(self, batches) -> float:
        """The step's counted labels per micro-batch, over every data-parallel replica (causal_lm_loss): the
        same for every micro-batch of pre-training data, fewer where a loss mask hides prompts or padding."""
        from megakv.parallel.runners import counted_labels

        counts = torch.tensor([sum(counted_labels(labels) for _, labels in batches), len(batches)],
                              dtype=torch.float64, device=self.ctx.device)
        self.ctx.all_reduce(counts, self.ctx.data_group)
        return max(float(counts[0]), 1.0) / float(counts[1])

    def _step(self) -> tuple[float, bool, list, float | None, bool]:
        cfg, state = self.cfg, self.state
        number = state.step + 1  # 1-based number of the step being run
        count = plans_per_step(cfg.routing, cfg.train.global_batch, cfg.train.micro_batch)
        plans = broadcast_step_plans(cfg.routing, cfg.model.n_layers, state.step, count, self.layout.rank,
                                     self.ctx.device)
        if cfg.train.debug.check_plans:
            check_plans_agree(plans, number, self.ctx.device)
            self.plan_trace.write(f"{number} " + " | ".join(str(p) for p in plans) + "\n")
        poison = number in cfg.train.debug.nonfinite_loss_at
        batches = self._micro_batches()
        started = time.monotonic()
        result = self.runner.train_step(batches, plans, self._tokens_per_micro_batch(batches), poison=poison)
        time.sleep(max(0.0, cfg.train.debug.min_step_s - (time.monotonic() - started)))  # a signal's handler runs
        if number == cfg.train.debug.sigterm_at_step and self.ctx.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)  # fault injection: a real signal, through the real handler
        losses = torch.tensor([result.loss_sum, result.micro_batches], dtype=torch.float64, device=self.ctx.device)
        self.ctx.all_reduce(losses, self.ctx.data_group)
        stop = torch.tensor([float(self.stop.requested)], dtype=torch.float64, device=self.ctx.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # any rank's signal stops every rank
        loss = float(losses[0] / losses[1])
        state.step = number
        state.consumed_samples += cfg.train.global_batch
        state.tokens += cfg.train.global_batch * self.seq_len
        return loss, bool(stop[0] > 0), plans, (result.grad_norm if result.applied else None), result.applied

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg, state = self.cfg, self.state
        total = cfg.train.steps
        tokens_per_step = cfg.train.global_batch * self.seq_len
        window_time, window_steps = 0.0, 0
        eta_clock = EtaClock()
        validated_at = None
        ran, applied_updates = 0, 0  # steps of this launch, and those that updated the weights
        if state.step >= total and self.ctx.is_global_zero:  # a resumed run that had finished: say so
            log.info("the run already finished: its checkpoint is at step %d of train.steps=%d, nothing to train "
                     "(raise train.steps to train on)", state.step, total)
        while state.step < total:
            lr = self.runner.learning_rate()  # the rate this step trains with; the scheduler moves on after it
            started = time.perf_counter()
            eta_clock.iteration_starts(started)
            loss, stop, plans, grad_norm, applied = self._step()
            elapsed = time.perf_counter() - started
            window_time, window_steps = window_time + elapsed, window_steps + 1
            finite = math.isfinite(loss) and applied
            ran, applied_updates = ran + 1, applied_updates + finite
            if finite:
                state.nonfinite_in_a_row = 0
            else:
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
                log.warning("step %d: non-finite loss/gradients (loss=%s); update skipped (%d in a row, %d total)",
                            state.step, loss, state.nonfinite_in_a_row, state.skipped_steps)
            if self.metrics is not None:
                scalars = {"train/loss": loss if math.isfinite(loss) else None, "train/lr": lr,
                           "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_step / elapsed,
                           "train/samples_consumed": state.consumed_samples,
                           "train/skipped_steps": state.skipped_steps, **routing_scalars(plans),
                           **self.meter.scalars(elapsed)}
                self.metrics.write(state.step, scalars, loss_exact=repr(loss), applied=applied,
                                   plans=[str(p) for p in plans])
            if state.step % cfg.logging.log_every == 0 or state.step == total:
                eta = eta_clock.seconds_left(total - state.step, elapsed)
                if self.ctx.is_global_zero:
                    gnorm = f"{grad_norm:.3f}" if grad_norm is not None else "-"
                    log.info("step %d/%d | loss %.4f | lr %.2e | grad norm %s | %s tok/s | %s | ETA %s", state.step,
                             total, loss, lr, gnorm, f"{tokens_per_step * window_steps / window_time:,.0f}",
                             self.meter.log_fields(window_time / window_steps), format_duration(eta))
                self._status("running")  # the step a failure is recorded at (a lost peer leaves no other trace)
                window_time, window_steps = 0.0, 0
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                log.error("stopping: %d non-finite steps in a row (train.max_nonfinite_steps); the last good "
                          "checkpoint is kept", state.nonfinite_in_a_row)
                self._status("diverged")
                return EXIT_DIVERGED
            if cfg.validation.every and state.step % cfg.validation.every == 0:
                self.validate()
                validated_at = state.step
            # Periodic saves wait for a healthy step, so `latest` never lands inside a non-finite streak.
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and finite:
                self.save()
            if stop:
                log.warning("stop requested (%s): saving a checkpoint at step %d and exiting",
                            self.stop.signal_name or "signal on another rank", state.step)
                self.save()
                self._status("preempted", signal=self.stop.signal_name)
                return EXIT_OK
        if ran and not applied_updates:  # every step was skipped: nothing was trained, not a finished run
            log.error("stopping: none of this launch's %d steps was finite, so no update was applied; the last "
                      "good checkpoint is kept. Fix: check the model and optimizer settings (e.g. "
                      "model.rope_scaling, optim.lr, train.precision)", ran)
            self._status("diverged")
            return EXIT_DIVERGED
        if state.nonfinite_in_a_row:  # the weights are those of the last good step; say so and finish
            log.warning("the run ended with %d non-finite step(s) in a row, whose updates were skipped",
                        state.nonfinite_in_a_row)
        if cfg.validation.every and validated_at != state.step:
            self.validate()
        if cfg.checkpoint.save_final:
            self.save()
        self._status("finished")
        return EXIT_OK

    def validate(self) -> dict[str, float]:
        losses = validation_losses(self.runner, self.valid_batches, self.valid_weights, self.valid_plans,
                                   self.ctx)
        scalars = {f"valid/loss_{spec.replace(':', '')}": value for spec, value in losses.items()}
        if self.metrics is not None:
            self.metrics.write(self.state.step, scalars)
        if self.ctx.is_global_zero:
            shown = " | ".join(f"{spec} {value:.4f}" for spec, value in losses.items())
            log.info("step %d validation loss: %s", self.state.step, shown)
        return losses

    def save(self) -> None:
        if self.checkpoints.last_saved_step == self.state.step:
            return
        self.checkpoints.save(self.runner.engine, self.state)

    def _status(self, state: str, **details) -> None:
        if self.ctx.is_global_zero:
            write_status(self.run_dir, state, step=self.state.step, skipped_steps=self.state.skipped_steps,
                         **details)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.plan_trace is not None:
            self.plan_trace.close()
