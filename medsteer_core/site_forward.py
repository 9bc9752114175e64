"""The torch.compile-safe way the hooks sit on a cross-attention site: an instance ``forward``.

``hooks`` adds its capture and steer hooks through ``add_site_hook``; they run after the site's own
forward like forward hooks, but a compiled model notices them (see ``SiteForward``). Also
``eager_when_compiled`` (Python-side bookkeeping kept out of compiled graphs) and ``Callback``.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

__all__ = ["Callback", "add_site_hook", "eager_when_compiled"]


class SiteForward:
    """The instance ``forward`` of a steered or captured site while any context is open on it.

    Why not ``register_forward_hook``: ``torch.compile`` does not guard on module hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a model compiled and run before the
    hooks were added keeps running its unhooked graph and steering silently does nothing (issue 12).
    It does guard on whether a module has an instance ``forward``, so installing this object makes
    a compiled model trace the hooks into a second graph, and removing it brings the first back.
    One object per module, reused by every context, so a new context (ComfyUI opens one per model
    call) matches the same graph instead of recompiling.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)  # _SITE_FORWARDS holds this object: no strong cycle
        self.function = type(module).forward  # unbound: dynamo traces it without a graph break
        self.previous = None  # an instance forward already there (e.g. accelerate's offload hook)
        self.hooks: list = []

    def __call__(self, *args, **kwargs):
        module = self.module()
        if self.previous is not None:
            output = self.previous(*args, **kwargs)
        else:
            output = self.function(module, *args, **kwargs)
        for hook in self.hooks:
            result = hook(module, args, output)
            if result is not None:
                output = result
        return output


_SITE_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SiteHookHandle:
    """Takes one hook off a site; the instance ``forward`` goes when the site's last hook goes."""

    def __init__(self, module: nn.Module, dispatcher: SiteForward, hook) -> None:
        self._module, self._dispatcher, self._hook = module, dispatcher, hook

    def remove(self) -> None:
        dispatcher, module = self._dispatcher, self._module
        if any(h is self._hook for h in dispatcher.hooks):
            dispatcher.hooks = [h for h in dispatcher.hooks if h is not self._hook]
        if not dispatcher.hooks and module.__dict__.get("forward") is dispatcher:
            if dispatcher.previous is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = dispatcher.previous
            dispatcher.previous = None


def add_site_hook(module: nn.Module, hook) -> SiteHookHandle:
    """Run ``hook(module, args, output)`` after the site's forward (like a forward hook; see ``SiteForward``)."""
    dispatcher = _SITE_FORWARDS.get(module)
    if dispatcher is None:
        dispatcher = _SITE_FORWARDS[module] = SiteForward(module)
    if module.__dict__.get("forward") is not dispatcher:
        dispatcher.previous = module.__dict__.get("forward")
        module.__dict__["forward"] = dispatcher
    # Replaced, not mutated: a call in progress keeps iterating the list it started with.
    dispatcher.hooks = [*dispatcher.hooks, hook]
    return SiteHookHandle(module, dispatcher, hook)


def eager_when_compiled(function):
    """``function``, made to run outside any compiled graph when torch.compile is in use.

    For Python-side bookkeeping (gate records, estimator sums): traced into a graph, the lists and
    dicts it grows would become guards and the model would recompile at every step (issue 12).
    Without torch.compile loaded, ``function`` itself: importing dynamo takes seconds.
    """
    if "torch._dynamo" not in sys.modules:
        return function
    return torch.compiler.disable(function)


class Callback:
    """A handle whose ``remove()`` calls a function (a last flush when the hooks come off)."""

    def __init__(self, function) -> None:
        self._function = function

    def remove(self) -> None:
        self._function()
