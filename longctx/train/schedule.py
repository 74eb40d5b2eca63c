"""The learning-rate schedule, and what a resume that changes it does to the rates ahead.

    factor = lr_factor(cfg.optim, cfg.train.steps)   # LambdaLR's multiplier after `step` optimizer steps
    check_schedule_change(saved_meta, cfg, checkpoint, force)   # one line: refused, or said with the step

A resumed scheduler keeps its step count and takes the new config's schedule: with another
train.steps (or, forced, another lr or warmup) the rate jumps at the first resumed step, which
nobody should learn from the loss curve.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

from .config import ConfigError

SCHEDULE_KEYS = ("optim.lr", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio")


def lr_factor(optim, total: int):
    """The multiplier of optim.lr after `step` optimizer steps: linear warmup, then cosine, linear or
    constant down to min_lr_ratio at `total`."""
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay
    return factor


def learning_rates(optim, total: int, first: int, last: int) -> dict[int, float]:
    """step -> the rate its update uses, for the steps first..last (1-based, as metrics.jsonl counts)."""
    factor = lr_factor(optim, total)
    return {step: optim.lr * factor(step - 1) for step in range(first, last + 1)}


def schedule_change(saved: dict, cfg, start: int):
    """(first step whose rate changes, its saved-schedule rate, its new rate, what changed) or None."""
    settings = saved.get("settings", {})
    if not all(key in settings for key in SCHEDULE_KEYS):
        return None
    old = SimpleNamespace(**{key.split(".", 1)[1]: settings[key] for key in SCHEDULE_KEYS})
    old_steps = saved.get("train.steps", cfg.train.steps)   # checkpoints before it was stored: unknown
    new_steps = cfg.train.steps
    if new_steps <= start:
        return None
    before = learning_rates(old, old_steps, start + 1, new_steps)
    after = learning_rates(cfg.optim, new_steps, start + 1, new_steps)
    for step in range(start + 1, new_steps + 1):
        if not math.isclose(before[step], after[step], rel_tol=1e-9, abs_tol=0.0):
            changed = [f"{key} {settings[key]!r} -> {getattr(cfg.optim, key.split('.', 1)[1])!r}"
                       for key in SCHEDULE_KEYS if settings[key] != getattr(cfg.optim, key.split(".", 1)[1])]
            if old_steps != new_steps:
                changed.insert(0, f"train.steps {old_steps} -> {new_steps}")
            return step, before[step], after[step], "; ".join(changed)
    return None


def check_schedule_change(saved: dict, cfg, checkpoint, force: bool, say: bool = True) -> None:
    """Refuse (one line) a resume whose schedule gives other rates from the next step on, unless
    forced; forced, say from which step and how the rate changes."""
    change = schedule_change(saved, cfg, saved["step"])
    if change is None:
        return
    step, before, after, what = change
    if not force:
        raise ConfigError(f"{checkpoint}: {what} changes the learning rate from step {step} on ({before:.3g} -> "
                          f"{after:.3g} at step {step}); resume with the saved schedule, or set "
                          "train.resume_force=true to follow the new one")
    if say:
        print(f"warning: train.resume_force=true: {what}: the learning rate follows the new schedule from step "
              f"{step} on ({before:.3g} -> {after:.3g} at step {step})", flush=True)


def follow_config_schedule(scheduler, lr: float) -> None:
    """After a resume, the rate of the next step from this run's schedule. A loaded LambdaLR keeps the
    saved run's base rate and the rate it last set (which the optimizer's loaded groups hold too):
    without this a forced resume would keep the old optim.lr, and another train.steps would show
    one step late."""
    scheduler.base_lrs = [lr] * len(scheduler.optimizer.param_groups)
    rates = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["initial_lr"], group["lr"] = lr, rate
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
