"""Optimizers and learning-rate schedules, following PyTorch's update rules
number for number (its single-tensor implementations), so one training step
can be compared with torch's.

Optimizers update ``param.data`` in place, outside any graph. Their
``state_dict()`` holds arrays and numbers only (plus lists and dicts of
them), so it survives an ``.npz`` round trip through ``flatten_state`` /
``unflatten_state``; ``load_state_dict`` accepts what comes back (string
keys, 0-d arrays for numbers, arrays for lists).

    >>> import numpy as np, scratchseg
    >>> from scratchseg import optim
    >>> w = scratchseg.nn.Parameter(np.array([1.0, -2.0]))
    >>> opt = optim.SGD([w], lr=0.1, momentum=0.9)
    >>> sched = optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    >>> for _ in range(3):
    ...     w.grad = 2 * w.data          # d/dw of |w|^2
    ...     opt.step(); sched.step()
    >>> sched.get_last_lr()
    [0.05]
"""

from __future__ import annotations

import numbers
import sys
import types
from collections import Counter

import numpy

from . import backend
from .autograd import Tensor, enable_grad
from .backend import replaceable

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "LRScheduler",
    "LambdaLR",
    "StepLR",
    "MultiStepLR",
    "PolyLR",
    "lr_scheduler",
    "flatten_state",
    "unflatten_state",
]


# --------------------------------------------------- state <-> flat arrays
def flatten_state(state, prefix=""):
    """A nested dict/list of arrays and numbers as ``{"a.b.0": array}``, ready for ``numpy.savez``.

    Dict keys and list indices join with ``.``; lists of numbers become one
    array; an empty list or dict is kept as a marker (``"<key>.__empty_list__"``).
    """
    flat = {}

    def walk(value, key):
        if isinstance(value, dict):
            if not value:
                flat[key + ".__empty_dict__"] = numpy.zeros(0)
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)) and not all(isinstance(v, numbers.Number) for v in value):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, (list, tuple)) and not value:
            flat[key + ".__empty_list__"] = numpy.zeros(0)
        elif value is None:
            flat[key + ".__none__"] = numpy.zeros(0)
        else:
            flat[key] = backend.asnumpy(value) if hasattr(value, "shape") else numpy.asarray(value)

    walk(state, prefix)
    return flat


def unflatten_state(flat):
    """The inverse of ``flatten_state``: nested dicts (list indices come back as
    string keys, numbers as 0-d arrays; ``load_state_dict`` accepts both)."""
    root = {}
    for key in sorted(flat):
        parts = key.split(".")
        node = root
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        leaf = parts[-1]
        if leaf == "__empty_dict__":
            continue
        elif leaf == "__empty_list__":
            node.setdefault("__list__", True)
        elif leaf == "__none__":
            node["__none__"] = True
        else:
            node[leaf] = flat[key]

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node.get("__none__") and len(node) == 1:
            return None
        if node.get("__list__") and len(node) == 1:
            return []
        return {k: fix(v) for k, v in node.items()}

    return fix(root)


def _number(value):
    """0-d arrays (after an .npz round trip) back to Python numbers; other values unchanged."""
    if hasattr(value, "shape") and value.shape == ():
        return value.item()
    return value


def _as_list(value):
    if isinstance(value, dict):  # a list that came back from flatten_state with string indices
        return [value[k] for k in sorted(value, key=int)]
    if hasattr(value, "tolist"):
        return value.tolist() if getattr(value, "shape", None) != () else [value.item()]
    return list(value)


# -------------------------------------------------------------- optimizer
class Optimizer:
    """Base class: ``param_groups`` (a list of dicts, each with ``"params"`` and
    its own options), per-parameter ``state``, ``zero_grad`` and state dicts.

    ``params`` is an iterable of Parameters, or of dicts
    ``{"params": [...], "lr": ...}`` whose options override ``defaults``.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}  # Parameter -> dict of arrays and numbers
        self.param_groups = []
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Parameters or of dicts, not a single Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group):
        if not isinstance(group, dict):
            raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors/Parameters, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter group contains the same parameter twice")
        new = {"params": params}
        for key, default in self.defaults.items():
            new[key] = group.get(key, default)
        for key, value in group.items():
            if key != "params":
                new[key] = value
        self._check_group(new)
        self.param_groups.append(new)

    def _check_group(self, group):
        lr = group["lr"]
        if not isinstance(lr, numbers.Real) or lr < 0:
            raise ValueError(f"invalid learning rate: {lr!r} (a non-negative number is expected)")
        if group.get("weight_decay", 0) < 0:
            raise ValueError(f"invalid weight_decay value: {group['weight_decay']!r}")

    def zero_grad(self, set_to_none=True):
        """Forget every parameter's gradient (``.grad = None``, or zeros)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None if set_to_none else p.grad * 0

    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        self._update()
        return loss

    def _update(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # torch's layout: state keyed by the parameter's index across all groups
    def state_dict(self):
        """``{"state": {index: {name: array or number}}, "param_groups": [{options..., "params": [index, ...]}]}``."""
        index, groups, i = {}, [], 0
        for group in self.param_groups:
            packed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
            packed["params"] = list(range(i, i + len(group["params"])))
            for p in group["params"]:
                index[id(p)] = i
                i += 1
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    state[index[id(p)]] = dict(self.state[p])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore state and options from ``state_dict()`` (or its .npz round trip).

        Arrays are copied to each parameter's device and floating ones cast to its dtype.
        """
        saved_groups = state_dict["param_groups"]
        if isinstance(saved_groups, dict):
            saved_groups = _as_list(saved_groups)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        params_by_index = {}
        for group, saved in zip(self.param_groups, saved_groups):
            ids = [int(i) for i in _as_list(saved["params"])]
            if len(ids) != len(group["params"]):
                raise ValueError(
                    f"a loaded parameter group has {len(ids)} parameters, this optimizer's has {len(group['params'])}"
                )
            params_by_index.update(zip(ids, group["params"]))
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key == "params":
                    continue
                if key == "betas":
                    value = tuple(float(v) for v in _as_list(value))
                else:
                    value = _number(value)
                group[key] = value
        self.state = {}
        for key, entry in state_dict.get("state", {}).items():
            p = params_by_index.get(int(key))
            if p is None:
                raise ValueError(f"loaded optimizer state refers to parameter {key!r}, which this optimizer lacks")
            restored = {}
            for name, value in entry.items():
                if hasattr(value, "shape") and value.shape != ():
                    value = backend.to_device(value, p.device)
                    if value.dtype.kind == "f":
                        value = value.astype(p.dtype)
                    value = value.copy()
                else:
                    value = _number(value)
                restored[name] = value
            self.state[p] = restored

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _grads(group):
    """(param, grad) for the parameters of ``group`` that have a gradient."""
    for p in group["params"]:
        if p.grad is not None:
            yield p, p.grad


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay (torch's rule).

    g = grad (negated when maximize) + weight_decay * p
    buf = g on the first step, else momentum * buf + (1 - dampening) * g
    g = g + momentum * buf (nesterov) or buf (momentum != 0)
    p = p - lr * g
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False):
        if momentum < 0:
            raise ValueError(f"invalid momentum value: {momentum!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _update(self):
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            weight_decay, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
            params, grads, bufs, firsts = [], [], [], []
            for p, grad in _grads(group):
                buf, first = None, False
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:  # the first step fills it with g
                        buf = state["momentum_buffer"] = backend.get_array_module(p.data).empty_like(p.data)
                        first = True
                params.append(p.data)
                grads.append(grad)
                bufs.append(buf)
                firsts.append(first)
            if params:
                sgd_update_many(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize,
                                firsts)


@replaceable
def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    """One SGD step on the array ``p``, in place (torch's rule, see ``SGD``).

    ``buf`` is the momentum buffer, updated in place (``None`` when momentum
    is 0); ``first`` says it holds nothing yet, so it starts as ``g``.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if first:
            buf[...] = g
        else:
            buf *= momentum
            buf += (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g


@replaceable
def sgd_update_many(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize, firsts):
    """``sgd_update`` of every parameter of a group: lists of arrays p, grad, buf (None where momentum is
    0) and of flags ``first``. A twin may update them all in one call (the CPU kernel shares the elements
    between the cores), with the same numbers.
    """
    for p, grad, buf, first in zip(params, grads, bufs, firsts):
        sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first)


class Adam(Optimizer):
    """Adam (torch's single-tensor rule, with ``amsgrad`` and ``maximize``).

    t = t + 1;  g = grad + weight_decay * p   (AdamW instead: p = p * (1 - lr * weight_decay))
    m = m + (1 - beta1) * (g - m);  v = beta2 * v + (1 - beta2) * g^2
    v_max = max(v_max, v) (amsgrad);  denom = sqrt(v or v_max) / sqrt(1 - beta2^t) + eps
    p = p - lr / (1 - beta1^t) * m / denom
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, maximize=False):
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid betas {betas!r}: two numbers in [0, 1) are expected")
        if eps < 0:
            raise ValueError(f"invalid epsilon value: {eps!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def _update(self):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay, amsgrad, maximize = group["weight_decay"], group["amsgrad"], group["maximize"]
            for p, grad in _grads(group):
                xp = backend.get_array_module(p.data)
                g = -grad if maximize else grad
                state = self.state.setdefault(p, {})
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = xp.zeros_like(p.data)
                    state["exp_avg_sq"] = xp.zeros_like(p.data)
                    if amsgrad:
                        state["max_exp_avg_sq"] = xp.zeros_like(p.data)
                state["step"] += 1
                step = float(state["step"])
                if weight_decay != 0:
                    if self._decoupled:
                        p.data *= 1 - lr * weight_decay
                    else:
                        g = g + weight_decay * p.data
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg += (1 - beta1) * (g - exp_avg)  # torch's lerp with weight < 0.5
                exp_avg_sq *= beta2
                exp_avg_sq += (1 - beta2) * g * g  # addcmul's order: (value * g) * g
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                bias_correction2_sqrt = bias_correction2**0.5
                if amsgrad:
                    xp.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    denom = xp.sqrt(state["max_exp_avg_sq"]) / bias_correction2_sqrt + eps
                else:
                    denom = xp.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
                p.data += -step_size * exp_avg / denom  # addcdiv's order: (value * m) / denom


class AdamW(Adam):
    """Adam with decoupled weight decay: p = p * (1 - lr * weight_decay) before the Adam step."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)


# --------------------------------------------------------------- schedules
class LRScheduler:
    """Base of the learning-rate schedules (torch's protocol).

    On construction each group's ``initial_lr`` is recorded (``base_lrs``)
    and ``step()`` is called once, so ``last_epoch`` is 0 and the group's lr
    is the schedule's first value. Call ``step()`` after each
    ``optimizer.step()``; ``get_last_lr()`` is what the optimizer now uses.
    """

    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] when resuming")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._step_count = 0
        self.step()

    def get_lr(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self):
        self._step_count += 1
        self.last_epoch += 1
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return list(self._last_lr)

    def _state_keys(self):
        return ("base_lrs", "last_epoch", "_step_count", "_last_lr")

    def state_dict(self):
        """Numbers and lists of numbers: ``base_lrs``, ``last_epoch``, ``_step_count``,
        ``_last_lr`` and the schedule's options (torch's names)."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.__dict__.items()
                if k in self._state_keys()}

    def load_state_dict(self, state_dict):
        for key, value in state_dict.items():
            if key in ("base_lrs", "_last_lr", "milestones"):
                value = [_number(v) for v in _as_list(value)]
            else:
                value = _number(value)
            setattr(self, key, value)
        if "milestones" in state_dict:
            self.milestones = Counter(int(m) for m in self.milestones)


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(epoch); one function, or one per group."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"expected {n} lr_lambdas, but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base_lr * f(self.last_epoch) for f, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class StepLR(LRScheduler):
    """lr = lr * gamma every ``step_size`` epochs (torch's chained form)."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        if not isinstance(step_size, numbers.Integral) or step_size <= 0:
            raise ValueError(f"step_size must be a positive integer, got {step_size!r}")
        self.step_size, self.gamma = int(step_size), gamma
        super().__init__(optimizer, last_epoch)

    def _state_keys(self):
        return super()._state_keys() + ("step_size", "gamma")

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [group["lr"] for group in self.optimizer.param_groups]
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]


class MultiStepLR(LRScheduler):
    """lr = lr * gamma at each milestone epoch (torch's chained form)."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"milestones should be a list of increasing integers, got {milestones}")
        self.milestones, self.gamma = Counter(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def _state_keys(self):
        return super()._state_keys() + ("milestones", "gamma")

    def state_dict(self):
        state = super().state_dict()
        state["milestones"] = sorted(self.milestones.elements())
        return state

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return [group["lr"] for group in self.optimizer.param_groups]
        return [group["lr"] * self.gamma ** self.milestones[self.last_epoch] for group in self.optimizer.param_groups]


class PolyLR(LRScheduler):
    """DeepLab's "poly" schedule with an optional linear warm-up.

    lr = base_lr * warmup(t) * max(1 - t / max_iters, 0) ** power, where
    warmup(t) = warmup_factor + (1 - warmup_factor) * t / warmup_iters for
    t < warmup_iters and 1 after (Detectron2's WarmupPolyLR), and ``lr``
    never goes below ``min_lr``. ``t`` counts ``step()`` calls (iterations).
    """

    def __init__(self, optimizer, max_iters, power=0.9, warmup_iters=0, warmup_factor=0.001, min_lr=0.0,
                 last_epoch=-1):
        if not isinstance(max_iters, numbers.Integral) or max_iters <= 0:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        if warmup_iters < 0 or warmup_iters > max_iters:
            raise ValueError(f"warmup_iters must be in [0, max_iters={max_iters}], got {warmup_iters!r}")
        self.max_iters, self.power = int(max_iters), float(power)
        self.warmup_iters, self.warmup_factor, self.min_lr = int(warmup_iters), float(warmup_factor), float(min_lr)
        super().__init__(optimizer, last_epoch)

    def _state_keys(self):
        return super()._state_keys() + ("max_iters", "power", "warmup_iters", "warmup_factor", "min_lr")

    def factor(self, t):
        """The multiplier of base_lr at iteration ``t``."""
        poly = max(1.0 - t / self.max_iters, 0.0) ** self.power
        if t < self.warmup_iters:
            poly *= self.warmup_factor + (1 - self.warmup_factor) * t / self.warmup_iters
        return poly

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [max(base_lr * f, self.min_lr) for base_lr in self.base_lrs]


# ``scratchseg.optim.lr_scheduler.StepLR`` as in torch (and importable as a module)
lr_scheduler = types.ModuleType(__name__ + ".lr_scheduler", "Learning-rate schedules (also in scratchseg.optim).")
for _cls in (LRScheduler, LambdaLR, StepLR, MultiStepLR, PolyLR):
    setattr(lr_scheduler, _cls.__name__, _cls)
lr_scheduler.__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "PolyLR"]
sys.modules[lr_scheduler.__name__] = lr_scheduler
del _cls
