"""Runs that survive preemption: stop signals, and checkpoints in the middle of an epoch.

Clusters stop jobs with SIGTERM (SLURM, Kubernetes; SIGUSR1 by ``--signal`` ahead of the time
limit). :class:`StopSignals` turns either into a flag; the trainer looks at it after every
optimiser step, writes ``checkpoints/last.pth`` there and raises :class:`Preempted`, which the
scripts print as one line and exit 0 with (a requeued job then runs ``--resume``).
``--checkpoint-every-steps N`` writes the same mid-epoch checkpoint every N steps.

A mid-epoch checkpoint holds, besides the epoch-end state, the position in the epoch: the
number of batches done, the augmentation generator's state, the epoch's running loss sums and
edge statistics and the lrs it recorded. The order of an epoch depends only on (seed, epoch),
so a resume takes the same order from the first batch not yet seen; the global RNG states
are those of the step boundary. The resumed run ends bit-identical to the uninterrupted one
(on the CPU; cuDNN may choose other algorithms after a restart).

Hand-written because neither Accelerate nor timm offers it: Accelerate's ``skip_first_batches``
wraps a DataLoader, not this project's in-memory loader, and neither handles signals.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Preempted", "StopSignals", "stop_requested", "MidEpochState", "STOP_SIGNALS"]

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
_received: list[str] = []   # the signals seen since the outermost StopSignals was entered
_depth = 0
_previous: dict = {}


class Preempted(Exception):
    """A stop signal arrived; the run wrote its checkpoint (when it has an output) and stopped."""

    def __init__(self, signame: str, run: Optional[Path] = None, epoch: Optional[int] = None, step: int = 0,
                 steps: int = 0, text: Optional[str] = None):
        self.signame, self.run, self.epoch, self.step, self.steps = signame, run, epoch, step, steps
        if text is None:
            tail = (f"checkpoints/last.pth written; continue with --resume {run}" if run is not None
                    else "the run has no --output, so nothing was saved")
            text = f"at epoch {epoch + 1}, step {step} of {steps}: {tail}"
        super().__init__(f"stopped by {signame} {text}")


def _handler(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set a flag (:func:`stop_requested`) instead of killing the
    process. Re-entrant: only the outermost entry installs (and finally restores) the handlers, so
    a search worker and the trainer inside it share one flag. Outside the main thread (where
    Python cannot install handlers) it does nothing."""

    def __enter__(self) -> "StopSignals":
        global _depth
        if threading.current_thread() is not threading.main_thread():
            self._active = False
            return self
        self._active = True
        if _depth == 0:
            _received.clear()
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    _previous[sig] = signal.signal(sig, _handler)
        _depth += 1
        return self

    def __exit__(self, *exc) -> None:
        global _depth
        if not self._active:
            return
        _depth -= 1
        if _depth == 0:
            for sig, old in _previous.items():
                signal.signal(sig, old)
            _previous.clear()
            _received.clear()


def stop_requested() -> Optional[str]:
    """The first stop signal received inside :class:`StopSignals` (None: none)."""
    return _received[0] if _received else None


class MidEpochState:
    """The mid-epoch part of :class:`~timm_dcl.trainer.GraphTrainer` (a mixin: it uses the trainer's
    accelerator, loader, config and :class:`~timm_dcl.run_state.RunState` methods)."""

    _epoch_position: Optional[dict] = None  # from a mid-epoch checkpoint, until its epoch starts

    def _stop_signal(self) -> Optional[str]:
        """The stop signal, agreed by every process (one may get it before the others)."""
        name = stop_requested()
        acc = self.accelerator
        if acc.num_processes == 1:
            return name
        flag = torch.tensor([0.0 if name is None else 1.0], device=acc.device)
        return (name or "SIGTERM") if acc.reduce(flag, reduction="sum").item() > 0 else None

    def _resume_position(self, epoch: int, gen: torch.Generator, sums: tuple[torch.Tensor, ...], edges) -> int:
        """Restore the epoch's running state from a mid-epoch checkpoint; returns the batches done."""
        pos, self._epoch_position = self._epoch_position, None
        if pos is None or pos["epoch"] != epoch:
            return 0
        gen.set_state(pos["generator"])
        for mine, saved in zip(sums, pos["sums"]):
            mine.copy_(saved)
        if edges is not None and pos["edges"] is not None:
            for name, value in pos["edges"].items():
                getattr(edges, name).copy_(value)
        self.epoch_lrs = list(pos["lrs"])
        if self.accelerator.is_main_process:
            self.accelerator.print(f"resume: epoch {epoch + 1} continues at step {pos['step'] + 1} of "
                                   f"{len(self.train_loader)}")
        return int(pos["step"])

    def _after_step(self, epoch: int, done: int, gen: torch.Generator, sums: tuple[torch.Tensor, ...],
                    edges) -> None:
        """At a step boundary (``done`` batches of the epoch): write the mid-epoch checkpoint when
        ``--checkpoint-every-steps`` says or a stop signal came, and stop on the signal."""
        every, steps = self.cfg.checkpoint_every_steps, len(self.train_loader)
        signame = self._stop_signal()
        # at the epoch's last step the epoch-end checkpoint follows anyway
        due = every is not None and self.iteration % every == 0 and done < steps
        if not (signame or due):
            return
        position = {
            "epoch": epoch, "step": done, "generator": gen.get_state(),
            "sums": [s.detach().cpu().clone() for s in sums],
            "edges": (None if edges is None else
                      {k: getattr(edges, k).detach().cpu().clone() for k in ("loss", "kept", "progress", "batches")}),
            "lrs": list(self.epoch_lrs),
        }
        rng = self._rng_states()  # a collective: every rank takes part
        self._save_state("last", rng, position=position)
        self.accelerator.wait_for_everyone()
        if signame:
            raise Preempted(signame, self.output, epoch, done, steps)


def skip_batches(loader, start: int):
    """``loader``'s batches from batch ``start`` on: its own ``iter_from`` when it has one (the
    loaders of :mod:`timm_dcl.data` skip without reading the images), else by reading past them."""
    if start == 0:
        return iter(loader)
    if hasattr(loader, "iter_from"):
        return loader.iter_from(start)
    import itertools
    return itertools.islice(iter(loader), start, None)
