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
- :func:`step_cost` gives all of one training step at once: FLOPs, the bytes its
  operators move, the bytes saved for the backward, the peak of what it allocates, the
  parameter bytes. It runs on ``meta`` tensors too, so shapes too large for the machine
  (a 13.58 GiB input) cost nothing to count.
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
    "StepCost",
    "step_cost",
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
    # the storage object's own address, not its data pointer: meta tensors have none
    return (str(t.device), t.untyped_storage()._cdata)


def _conv_backward_flop(grad_out_shape: Any, x_shape: Any, w_shape: Any, bias_sizes: Any,
                        stride: Any, padding: Any, dilation: Any, transposed: bool,
                        output_padding: Any, groups: int, output_mask: Sequence[bool],
                        **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: each gradient asked for is a convolution
    with the forward's multiply-adds. (torch's own formula, as of 2.13, counts the weight
    gradient of a grouped convolution ``groups`` times over.)"""
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _flop_counter() -> Any:
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: _conv_backward_flop})


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
    report, hooks = _recording(excluded)
    try:
        with hooks:
            fn(*args, **kwargs)
    except RuntimeError as error:
        # torch 2.4: "torch.func transforms don't yet support saved tensor hooks"
        if "support saved tensor hooks" not in str(error):
            raise
        return _saved_in_graph(fn(*args, **kwargs), excluded)
    return report


def _recording(excluded: set[tuple[str, int]]) -> tuple[SavedTensors, Any]:
    """An empty report, and the saved-tensor hooks that fill it while they are active."""
    report = SavedTensors()
    seen: set[tuple[str, int]] = set()

    def pack(t: Tensor) -> Tensor:
        report._add(t, seen, excluded)
        return t

    return report, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


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
    Each gradient of a convolution counts the forward's FLOPs, grouped or not.
    """
    with _flop_counter() as counter:
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


@dataclass(frozen=True)
class StepCost:
    """Exact costs of one training step: a forward, then a backward of a fixed gradient.

    Attributes:
        forward_flops: FLOPs of the forward (a multiply-add counts as two).
        flops: FLOPs of forward and backward together.
        moved_bytes: bytes the step's operators read and write, with each operator
            reading every tensor argument once and writing every tensor it produces or
            modifies once; views and bare allocations (``empty``) move nothing, and an
            expanded tensor is read as its storage. A model of memory traffic with no
            cache between operators.
        saved_bytes: bytes autograd keeps from the forward for the backward, parameters
            excluded.
        peak_bytes: the most bytes of storage the step holds at once, on top of the
            inputs, the parameters and the output gradient that exist before it.
        param_bytes: bytes of the parameters it trains.
    """

    forward_flops: int
    flops: int
    moved_bytes: int
    saved_bytes: int
    peak_bytes: int
    param_bytes: int

    @property
    def intensity(self) -> float:
        """The step's arithmetic intensity (FLOPs per byte moved), its place on a roofline."""
        return self.flops / self.moved_bytes


def _traffic_mode() -> Any:
    """A dispatch mode that adds up bytes moved and tracks the live bytes it allocated."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    def _tensors(values: Any) -> list[Tensor]:  # the tensors among arguments or results
        found = []
        for v in values:
            if isinstance(v, Tensor):
                found.append(v)
            elif isinstance(v, (list, tuple)):
                found.extend(t for t in v if isinstance(t, Tensor))
        return found

    def nbytes(t: Tensor) -> int:  # an expanded view reads no more than its storage
        return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())

    class _Traffic(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.moved = self.live = self.peak = 0
            self._refs: dict[int, Any] = {}

        def _free(self, key: int, size: int) -> None:
            self.live -= size
            self._refs.pop(key, None)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            out = func(*args, **(kwargs or {}))
            ins = _tensors(args) + (_tensors(kwargs.values()) if kwargs else [])
            known = {t.untyped_storage()._cdata for t in ins}
            made = []
            for t in _tensors((out,)):
                storage = t.untyped_storage()
                key = storage._cdata
                if key in known or key in self._refs:
                    continue  # a view, or a storage seen already
                made.append(t)
                size = storage.nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                # the storage's Python object lives as long as the storage does
                self._refs[key] = weakref.ref(
                    storage, lambda _, key=key, size=size: self._free(key, size))
            # tensors written in place or through out=, passed by position or by name
            schema = func._schema.arguments
            named = {arg.name: arg for arg in schema}
            passed = [*zip(args, schema, strict=False),
                      *((v, named[k]) for k, v in (kwargs or {}).items() if k in named)]
            written = [a for a, arg in passed
                       if isinstance(a, Tensor) and arg.alias_info is not None
                       and arg.alias_info.is_write]
            if "empty" in func._schema.name:  # allocates, reads and writes nothing
                return out
            if made or written:
                self.moved += sum(nbytes(t) for t in ins if not any(t is w for w in written))
                self.moved += sum(nbytes(t) for t in made + written)
            return out

    return _Traffic()


def step_cost(
    fn: Callable[..., Tensor], *inputs: Tensor, params: Sequence[Tensor] = ()
) -> StepCost:
    """Count one training step of ``fn(*inputs)``: forward, then backward of ``ones``.

    The backward computes the gradient of every input and parameter that requires one, as
    a step from zero gradients does; their ``.grad`` is left as it was.

    ``params`` are the tensors it trains besides the inputs (their bytes are
    ``param_bytes``, and what autograd saves of them is not counted as saved). Everything
    is counted through dispatch modes, :class:`~torch.utils.flop_counter.FlopCounterMode`
    for the FLOPs and :func:`torch.autograd.graph.saved_tensors_hooks` for the saved
    bytes, so the counts are exact and the same on every machine. With inputs on the
    ``meta`` device nothing is computed or allocated, and any shape can be counted.

    Example::

        >>> x = torch.randn(8, 4, 100, device="meta", requires_grad=True)
        >>> w = torch.randn(16, 1, 5, device="meta", requires_grad=True)
        >>> conv = torch.nn.functional.conv1d
        >>> cost = step_cost(lambda x, w: conv(x.view(32, 1, 100), w), x, w)
        >>> cost.forward_flops == 2 * 32 * 16 * 96 * 5, cost.flops == 3 * cost.forward_flops
        (True, True)
    """
    excluded = {_storage_key(t) for t in params}
    saved, hooks = _recording(excluded)
    traffic = _traffic_mode()
    forward_counter, backward_counter = _flop_counter(), _flop_counter()
    try:
        with forward_counter, traffic, hooks:
            out = fn(*inputs)
    except RuntimeError as error:
        # torch 2.4: "torch.func transforms don't yet support saved tensor hooks"
        if "support saved tensor hooks" not in str(error):
            raise
        traffic = _traffic_mode()
        with forward_counter, traffic:
            out = fn(*inputs)
        saved = _saved_in_graph(out, excluded)
    leaves = [t for t in (*inputs, *params) if t.requires_grad]
    if not leaves or not isinstance(out, Tensor) or not out.requires_grad:
        raise ValueError(
            "step_cost counts a training step, so some input or parameter must require a "
            f"gradient and fn's output must depend on it; got {len(leaves)} tensors "
            "requiring one and an output that "
            + ("does not require a gradient" if isinstance(out, Tensor)
               else f"is a {type(out).__name__}, not a tensor"))
    grad = torch.ones_like(out)  # made outside the modes: it exists before the step
    kept = [t.grad for t in leaves]
    try:
        for t in leaves:  # a step from zero gradients: nothing is added into old ones
            t.grad = None
        with backward_counter, traffic:
            out.backward(grad, inputs=leaves)
            del out
    finally:
        for t, old in zip(leaves, kept, strict=True):
            t.grad = old
    forward = forward_counter.get_total_flops()
    return StepCost(
        forward_flops=forward,
        flops=forward + backward_counter.get_total_flops(),
        moved_bytes=traffic.moved,
        saved_bytes=saved.nbytes,
        peak_bytes=traffic.peak,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
    )
