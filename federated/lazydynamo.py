"""Keep torch.optim from importing torch._dynamo while nothing in the process compiles.

torch 2.x wraps ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` in
``torch._disable_dynamo`` and every built-in ``step`` in ``_use_grad_for_differentiable``; both import
``torch._dynamo`` on their first call, which costs 1.5 s of start-up on a 2-core machine and slows the exit.
Disabling dynamo and graph breaks mean nothing while dynamo is not imported (``torch.compile`` imports it
before it traces anything), so until then the wrapped functions are called directly, and from the moment
``torch._dynamo`` is in ``sys.modules`` torch's own wrappers take over again.

Every patch is applied only to the exact wrapper code of the installed torch (compared by code object); a
torch whose wrappers look different is left as it is.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any, Callable

import torch
from torch.optim import Optimizer

__all__ = ["prepare_optimizer_class", "STEP_WRAPPERS"]

_DYNAMO = "torch._dynamo"
#: Where ``torch._disable_dynamo``'s wrapper caches the disabled function on the function it wraps.
_CACHE = "__dynamo_disable"


def _code_of(wrapper: Callable[..., Any]) -> Any:
    return getattr(wrapper, "__code__", None)


def _probe() -> None:
    """Stand-in wrapped only to read the code of torch's wrappers."""


try:
    _DISABLE_INNER = _code_of(torch._disable_dynamo(_probe))
    _USE_GRAD = _code_of(sys.modules[Optimizer.__module__]._use_grad_for_differentiable(_probe))
    _PROFILE_HOOK = _code_of(Optimizer.profile_hook_step(_probe))
    #: torch's registries of step hooks for every optimizer (``register_optimizer_step_pre_hook`` and post).
    _GLOBAL_HOOKS = (sys.modules[Optimizer.__module__]._global_optimizer_pre_hooks,
                     sys.modules[Optimizer.__module__]._global_optimizer_post_hooks)
except (AttributeError, KeyError, TypeError):  # a torch without these wrappers: nothing to patch
    _DISABLE_INNER = _USE_GRAD = _PROFILE_HOOK = None
    _GLOBAL_HOOKS = ({}, {})


def _dynamo_loaded() -> bool:
    return _DYNAMO in sys.modules


class _UntilDynamo:
    """What ``torch._disable_dynamo`` caches on a function: the function itself until dynamo is imported."""

    __slots__ = ("fn", "recursive")

    def __init__(self, fn: Callable[..., Any], recursive: bool) -> None:
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _dynamo_loaded():
            return self.fn(*args, **kwargs)
        import torch._dynamo

        # From now on torch's wrapper finds the real disabled function, exactly as if we had never been here
        # (setattr: a dunder name written in a class body would be mangled).
        disabled = torch._dynamo.disable(self.fn, self.recursive, wrapping=False)
        setattr(self.fn, _CACHE, disabled)
        return disabled(*args, **kwargs)


def _closure(wrapper: Callable[..., Any]) -> dict[str, Any]:
    code = wrapper.__code__
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, wrapper.__closure__ or ())}


def _defer_disable(wrapper: Any) -> None:
    """Let one ``torch._disable_dynamo`` wrapper call its function directly until dynamo is imported."""
    if _DISABLE_INNER is None or _code_of(wrapper) is not _DISABLE_INNER:
        return
    cells = _closure(wrapper)
    fn = cells.get("fn")
    if fn is None or "recursive" not in cells or getattr(fn, _CACHE, None) is not None:
        return
    setattr(fn, _CACHE, _UntilDynamo(fn, cells["recursive"]))


def _lazy_use_grad(use_grad: Callable[..., Any]) -> Callable[..., Any]:
    """``_use_grad_for_differentiable`` without its graph breaks (and their import) until dynamo is imported."""
    func = _closure(use_grad)["func"]

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        if _dynamo_loaded():
            return use_grad(*args, **kwargs)
        self = args[0]
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return func(*args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    step.__fedevents_lazy_dynamo__ = True  # type: ignore[attr-defined]
    return step


def _defer_step(cls: type) -> None:
    """Replace the ``step`` that ``cls`` uses, if it is torch's ``_use_grad`` wrapper, by the lazy one."""
    owner = next((klass for klass in cls.__mro__ if "step" in vars(klass)), None)
    if owner is None or owner is Optimizer:
        return
    step = vars(owner)["step"]
    hooked = _code_of(step) is _PROFILE_HOOK
    inner = _closure(step).get("func") if hooked else step
    if _USE_GRAD is None or _code_of(inner) is not _USE_GRAD or "func" not in _closure(inner):
        return
    # The step hooks and profiler label around the lazy step, which Optimizer.__init__ would otherwise add
    # with torch's own wrapper (it wraps a class's step once, unless the step says it is ``hooked``).
    lazy = _hooked_step(_lazy_use_grad(inner))
    lazy.hooked = True  # type: ignore[attr-defined]
    owner.step = lazy  # type: ignore[attr-defined]


def _hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``Optimizer.profile_hook_step(step)`` that opens its profiler range only while a profiler records.

    torch's wrapper enters ``record_function`` on every step, about 30 % of a small model's optimizer step
    (issue 12: per-step overhead), whether or not anything records it. The step hooks and the step counter
    it runs are kept exactly; under ``torch.profiler``, with hooks, or once dynamo is imported (something
    compiles) the step goes through torch's own wrapper.
    """
    profiled = Optimizer.profile_hook_step(step)
    pre_hooks, post_hooks = _GLOBAL_HOOKS

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if (torch.autograd._profiler_enabled() or pre_hooks or post_hooks or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _dynamo_loaded()):  # torch's own wrapper where it matters
            return profiled(*args, **kwargs)
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        return out

    return wrapper


def _wrapper_codes() -> frozenset[Any]:
    codes = {_USE_GRAD, _PROFILE_HOOK, _code_of(_hooked_step(_probe))}
    if _USE_GRAD is not None:
        codes.add(_code_of(_lazy_use_grad(sys.modules[Optimizer.__module__]._use_grad_for_differentiable(_probe))))
    return frozenset(code for code in codes if code is not None)


#: The code of every wrapper torch or this module puts around an optimizer class's ``step`` (each keeps the
#: function it wraps as ``__wrapped__``): a step under none but these is the class's own.
STEP_WRAPPERS = _wrapper_codes()


_prepared: set[type] = set()
# Trainings build optimizers in several worker threads at once; a class is patched by one of them.
_lock = threading.Lock()


def prepare_optimizer_class(cls: type) -> None:
    """Make building and stepping a ``cls`` optimizer import nothing of dynamo while nothing compiles."""
    if cls in _prepared or _dynamo_loaded() or not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        return
    with _lock:
        if cls in _prepared:
            return
        if not _prepared:
            for wrapper in list(vars(Optimizer).values()):
                _defer_disable(wrapper)
        _defer_step(cls)
        _prepared.add(cls)
