"""The backward walk: from one tensor down to the leaves, each backward called once.

``backward(root, grad)`` orders the graph below ``root`` so that every node
comes after everything that uses it, then walks that order once, calling
each node's ``Function.backward`` and *adding* the gradients that flow into a
tensor from several uses. The walk is iterative, not recursive: a 1000-layer
network does not hit Python's recursion limit.

The graph is made of ``Node`` objects, one per computed tensor, which
``Function.apply`` creates; their ``_parents`` are the inputs' nodes, or the
leaf tensors themselves. A node refers to its tensor weakly: an intermediate
result that nothing but the graph refers to is freed after the forward
unless a backward saved its array in a context (a convolution's output
followed by batch norm, which keeps its normalised output instead, is freed).
The engine reads the nodes and the leaves (``_fn``, ``_ctx``, ``_parents``,
``_retain_grad``, ``shape``) and writes ``.grad``; it imports nothing from the
rest of the package.
"""

from __future__ import annotations

import sys
import weakref

__all__ = ["backward", "Node", "node_of"]


class Node:
    """One recorded operation: the Function that made a tensor, its context, its inputs' nodes
    (or leaf tensors; None where no gradient is wanted), the tensor's shape, and the tensor, weakly."""

    __slots__ = ("_fn", "_ctx", "_parents", "shape", "_tensor", "__weakref__")

    def __init__(self, fn, ctx, parents, tensor):
        self._fn, self._ctx, self._parents = fn, ctx, parents
        self.shape = tensor.shape
        self._tensor = weakref.ref(tensor)

    @property
    def _retain_grad(self):
        tensor = self._tensor()
        return tensor is not None and tensor._retain_grad


def node_of(tensor):
    """What stands for ``tensor`` in the graph: its node, or the tensor itself for a leaf."""
    return tensor if tensor._node is None else tensor._node


def backward(root, grad, retain_graph=False):
    """Add d(root)/d(leaf) into ``.grad`` of every leaf below ``root``; ``grad`` is dL/droot (an array)."""
    start = node_of(root)
    grads = {id(start): grad}
    for node in topological_order(start):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if node._fn is None:  # a leaf
            owned = _sole_reference(g)  # (its own statement: g on the stack of a call would count)
            _accumulate(node, g, owned=owned)
            continue
        if node._retain_grad:
            _accumulate(node._tensor(), g, owned=False)  # g still flows on to the parents
        if node._ctx is None:
            raise RuntimeError(
                "trying to backward through the graph a second time; "
                "pass retain_graph=True to the first backward() if you need to"
            )
        parent_grads = node._fn.backward(node._ctx, g)
        if not isinstance(parent_grads, tuple):
            parent_grads = (parent_grads,)
        for parent, pg in zip(node._parents, parent_grads):
            if parent is None or pg is None:
                continue
            if tuple(pg.shape) != tuple(parent.shape):
                raise RuntimeError(
                    f"{node._fn.__name__}.backward returned a gradient of shape {pg.shape} "
                    f"for an input of shape {parent.shape}"
                )
            key = id(parent)
            if key in grads:
                grads[key] = grads[key] + pg
            else:
                grads[key] = pg
        parent_grads = pg = None  # grads[] holds the only references the engine keeps
        if not retain_graph:
            node._ctx = None


def _accumulate(tensor, g, owned=False):
    """Add ``g`` into ``tensor.grad``; ``owned``: nothing else can see ``g``, so it may become ``.grad`` itself."""
    if g.dtype != tensor.data.dtype:
        g, owned = g.astype(tensor.data.dtype), True
    if tensor.grad is None:
        # own the memory: unless the engine knows g is its own, g may be a read-only
        # broadcast, the caller's grad array, or the very array another input also
        # received (Add passes dout to both sides)
        tensor.grad = g if owned else g.copy()
    else:
        tensor.grad = tensor.grad + g


def topological_order(root):
    """Nodes from ``root`` down to the leaves, each after everything that uses it."""
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent is not None and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


# ------------------------------------------------------ buffer stealing
def _count_references(a):
    return sys.getrefcount(a)


def _one_local(extra=False):
    a = object()
    b = a if extra else None  # noqa: F841  (a second reference, to check that it shows)
    return _count_references(a)


# What sys.getrefcount reports, one call down, for an object that one local
# variable of the caller holds; -1 (never) where counts are not reliable.
_SOLE = _one_local() if hasattr(sys, "getrefcount") else -1
if _one_local(extra=True) <= _SOLE:
    _SOLE = -1


def _sole_reference(a):
    """True when ``a`` owns its memory and only the caller's variable refers to it.

    Then no view, no user variable, no saved context and no other gradient can
    see it, and a leaf can keep it as ``.grad`` without a copy (torch decides
    by the reference count too when it steals a gradient's buffer). Called as
    ``_sole_reference(g)`` with ``g`` a local variable: the same references as
    in ``_one_local``, whose count is ``_SOLE``.
    """
    # (no flags object is kept in a variable: it would refer to a; CuPy's flags
    # have no ``writeable``: its arrays always are)
    if not (hasattr(a, "flags") and a.flags.owndata and getattr(a.flags, "writeable", True)):
        return False
    return sys.getrefcount(a) <= _SOLE
