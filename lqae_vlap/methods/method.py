"""The record a method hands the trainer: all the trainer ever knows of VLAP or LQAE."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method's ``build(config, mesh, abstract=False)`` returns.

    Attributes:
      init_params: rng -> trainable params, boxed with logical axis names.
      frozen: frozen weights and constants (plain arrays already placed on the mesh, or
        ``jax.ShapeDtypeStruct``s with shardings when built abstractly); the trainer passes them
        to ``loss_fn`` with their own shardings and never differentiates them.
      loss_fn: (params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics). ``batch``
        holds global arrays sharded over data x fsdp on the leading axis.
      train_batches: the deterministic batch source (``batch_at(step)``, ``iterate(start,
        stop)``), or None when built abstractly.
      evaluate: optional (params, frozen, step, workdir, names=None) -> dict of scalars; runs the
        named evaluations (None: every configured one) on every process (they may use
        collectives) and writes files from process 0 only.
      eval_every: evaluation name -> run it every that many steps (0: only at the end of
        training and in ``mode=eval``), the cadence the trainer follows.
      batch_spec: the global batch's shapes and dtypes, for building without data (plan mode).
      describe: one line that says what was built (printed at start-up).
    """

    init_params: Callable[[jax.Array], PyTree]
    frozen: PyTree
    loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    train_batches: Any = None
    evaluate: Callable[..., dict[str, float]] | None = None
    eval_every: Mapping[str, int] = dataclasses.field(default_factory=dict)
    batch_spec: Mapping[str, jax.ShapeDtypeStruct] | None = None
    describe: str = ""

    def evals_due(self, step: int) -> Sequence[str]:
        """The evaluations whose cadence falls on ``step`` (never those with ``every`` 0)."""
        return [name for name, every in self.eval_every.items() if every > 0 and step % every == 0]
