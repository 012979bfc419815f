"""Exact, deterministic costs of a computation: saved-for-backward bytes, FLOPs, op counts.

Timings depend on the machine; these do not. They are what the book prints and asserts:

- :func:`saved_tensors` records every tensor autograd keeps for the backward pass, through
  :func:`torch.autograd.graph.saved_tensors_hooks`, and adds up the storage it keeps alive
  (a storage shared by several saved tensors is counted once). Where the hooks are refused
  (``torch.func`` transforms before torch 2.5), it reads the same tensors off the graph.
- :func:`flops` counts floating-point operations with
  :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as two).
- :func:`op_counts` counts calls of ATen operators (``aten::convolution`` by default).
- :func:`largest_tensor` finds the largest tensor any operator produced, forward and
  backward, to prove that a computation never materialises some big intermediate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "SavedTensors",
    "saved_tensors",
    "flops",
    "op_counts",
    "largest_tensor",
    "parameter_bytes",
]


@dataclass
class SavedTensors:
    """What autograd saved for the backward pass of one call.

    Attributes:
        nbytes: bytes of distinct storage kept alive by the saved tensors.
        count: number of tensors saved (including repeats of one storage).
        shapes: ``(shape, dtype)`` of each saved tensor, in the order they were saved.
        excluded_nbytes: bytes of saved storage that belongs to the ``exclude`` tensors
            (typically the module's parameters, which exist anyway), not in ``nbytes``.
        method: ``"hooks"`` (saved-tensor hooks saw each tensor as it was saved) or
            ``"graph"`` (read off the nodes of the output's autograd graph, where the
            running torch refuses the hooks: then ``shapes`` is in graph order).
    """

    nbytes: int = 0
    count: int = 0
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    excluded_nbytes: int = 0
    method: str = "hooks"

    def _add(self, t: Tensor, seen: set[tuple[str, int]], excluded: set[tuple[str, int]]) -> None:
        self.count += 1
        self.shapes.append((tuple(t.shape), t.dtype))
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            size = t.untyped_storage().nbytes()
            if key in excluded:
                self.excluded_nbytes += size
            else:
                self.nbytes += size


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def saved_tensors(
    fn: Callable[..., Any], *args: Any, exclude: Iterable[Tensor] = (), **kwargs: Any
) -> SavedTensors:
    """Run ``fn(*args, **kwargs)`` and report what autograd saved for its backward.

    Tensors whose storage is that of one of ``exclude`` (for example
    ``module.parameters()``) are reported in ``excluded_nbytes`` instead of ``nbytes``.
    At least one input must require grad, or autograd saves nothing.

    Before torch 2.5, ``torch.func`` transforms (``torch.vmap`` among them) refuse to run
    under saved-tensor hooks. There ``fn`` is run again without them and the saved tensors
    are read off the autograd graph of what it returns (the ``_saved_*`` tensors of every
    node, and the ``saved_tensors`` of custom Functions): the tensors the graph keeps alive
    for the backward, the same ones, so ``nbytes`` and ``count`` agree with the hooks'
    (``method`` is then ``"graph"``). Only tensors reachable from the output are seen.

    Example::

        >>> conv = torch.nn.Conv1d(4, 8, 3)
        >>> x = torch.randn(2, 4, 10, requires_grad=True)
        >>> report = saved_tensors(conv, x, exclude=conv.parameters())
        >>> report.nbytes == x.numel() * 4  # the input; the weight is excluded
        True
    """
    excluded = {_storage_key(t) for t in exclude}
    report = SavedTensors()
    seen: set[tuple[str, int]] = set()

    def pack(t: Tensor) -> Tensor:
        report._add(t, seen, excluded)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args, **kwargs)
    except RuntimeError as error:
        # torch 2.4: "torch.func transforms don't yet support saved tensor hooks"
        if "support saved tensor hooks" not in str(error):
            raise
        return _saved_in_graph(fn(*args, **kwargs), excluded)
    return report


def _saved_in_graph(out: Any, excluded: set[tuple[str, int]]) -> SavedTensors:
    """What the autograd graph of ``out`` saved for its backward, node by node."""
    from torch.utils._pytree import tree_flatten

    report = SavedTensors(method="graph")
    seen: set[tuple[str, int]] = set()
    stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    visited: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        values: list[Any] = [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's ctx
            values.append(node.saved_tensors)
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, Tensor):
                    report._add(t, seen, excluded)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return report


def flops(
    fn: Callable[..., Any], *args: Any, backward: bool = False, **kwargs: Any
) -> int:
    """FLOPs of ``fn(*args, **kwargs)``, and of its backward too when ``backward=True``.

    The backward is run with ``out.sum().backward()``; the sum itself costs no counted FLOPs
    (FlopCounterMode counts matrix products and convolutions, the operations that dominate).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def op_counts(
    fn: Callable[..., Any],
    *args: Any,
    ops: Sequence[str] = ("aten::convolution",),
    backward: bool = False,
    **kwargs: Any,
) -> dict[str, int]:
    """How many times each ATen operator in ``ops`` ran during ``fn(*args, **kwargs)``.

    Operators are seen through a dispatch mode, after composite operators such as
    ``aten::conv1d`` have been decomposed, so every convolution shows up as
    ``aten::convolution`` (one per real call, also under :func:`torch.vmap`). With
    ``backward=True`` the backward of ``out.sum()`` is included, so
    ``"aten::convolution_backward"`` can be counted as well.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict.fromkeys(ops, 0)

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            name = func._schema.name
            if name in counts:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return counts


def largest_tensor(
    fn: Callable[..., Any], *args: Any, backward: bool = False, **kwargs: Any
) -> tuple[int, str]:
    """Bytes and operator of the largest tensor produced while running ``fn`` (and backward).

    Every ATen operator call is seen through a dispatch mode (the mechanism
    :class:`~torch.utils.flop_counter.FlopCounterMode` is built on), views included (a view
    allocates nothing but reports its own size, so the bound is conservative). With
    ``backward=True``, ``out.sum()`` is differentiated too.

    Returns:
        ``(nbytes, operator name)`` of the largest output.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    largest: list[Any] = [0, ""]

    class _Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.numel() * t.element_size() > largest[0]:
                    largest[0], largest[1] = t.numel() * t.element_size(), str(func)
            return out

    with _Largest():
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return largest[0], largest[1]


def parameter_bytes(module: nn.Module, with_grad: bool = True) -> int:
    """Bytes of ``module``'s parameters, doubled for their gradients when ``with_grad``."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    return 2 * total if with_grad else total
