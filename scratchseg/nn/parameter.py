"""``Parameter``: a Tensor that a ``Module`` learns.

Assigning a Parameter to a module attribute registers it, so it shows up in
``module.parameters()`` (what the optimizer updates) and in
``module.state_dict()`` under the attribute's name.

    >>> import numpy as np
    >>> from scratchseg.nn import Parameter
    >>> w = Parameter(np.zeros((2, 3)))
    >>> w.requires_grad, w.shape
    (True, (2, 3))
"""

from __future__ import annotations

from ..autograd import Tensor

__all__ = ["Parameter"]


class Parameter(Tensor):
    """A leaf Tensor with ``requires_grad=True`` by default, owned by a Module.

    ``data`` keeps its dtype and device, as for any Tensor. Modules build
    theirs with ``scratchseg.get_default_dtype()`` on the active backend.
    """

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()
