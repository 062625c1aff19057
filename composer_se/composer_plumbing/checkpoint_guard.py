"""The :class:`~composer_se.SqueezeExcite` algorithm's guard while Composer loads a checkpoint.

Between ``Event.BEFORE_LOAD`` and ``Event.AFTER_LOAD`` the Trainer reads a checkpoint
(``load_path``, ``autoresume``) and copies its model state into the model. While
enabled, a :class:`CheckpointGuard` refuses a state dict whose SE blocks differ from
the network's, before anything is copied, and learns which ``SqueezeExcite(...)`` the
checkpoint records, so that its message can name both calls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from composer_se.checkpoints import check_model_state
from composer_se.composer_plumbing.registration import register, registered_factory

__all__ = ['CheckpointGuard']


class CheckpointGuard:
    """Makes ``network.load_state_dict`` refuse state dicts whose SE blocks differ from ``network``'s.

    The check is a ``load_state_dict`` pre-hook, so it runs before anything is copied:
    the model is left as it was. It compares with
    :func:`~composer_se.checkpoints.find_mismatch` (``partial=True``): a state dict that
    holds a module's weights must hold that module's SE block, with the same shapes,
    and may not bring SE blocks where the network has none.

    Args:
        network (torch.nn.Module): the network the algorithm changed.
        current_call (str, optional): the ``SqueezeExcite(...)`` that built its blocks,
            for messages.
    """

    def __init__(self, network: nn.Module, current_call: Optional[str] = None):
        self.network = network
        self.current_call = current_call
        self.saved_call: Optional[str] = None  #: the call the checkpoint being loaded records, once Composer reads it
        self._handle = None
        self._registered: Optional[Callable[..., Any]] = None  #: the factory to register again on disable

    def enable(self) -> None:
        """Installs the pre-hook, and wraps our factory under ``composer.algorithms`` to learn the saved call."""
        self.disable()
        self.saved_call = None
        self._handle = self.network.register_load_state_dict_pre_hook(self._check)
        factory = registered_factory()
        if factory is not None:
            # A load that failed outside this guard (a missing file, a recipe's own check) never reaches
            # Event.AFTER_LOAD, so its guard's wrapper may still be registered: wrap the factory beneath it.
            while hasattr(factory, 'wrapped_factory'):
                factory = factory.wrapped_factory
            self._registered = factory

            def recording_factory(*args, **kwargs):
                algorithm = factory(*args, **kwargs)
                self.saved_call = algorithm.settings.call()
                return algorithm

            recording_factory.wrapped_factory = factory
            register(recording_factory)

    def disable(self) -> None:
        """Removes what :meth:`enable` installed; a guard not enabled is left as it is."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._registered is not None:
            register(self._registered)
            self._registered = None

    def _check(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        try:
            check_model_state(saved, module, source='the state dict loaded into this SE model',
                              saved_call=self.saved_call, current_call=self.current_call, partial=True)
        except Exception:
            self.disable()  # the load stops here, and Composer will not reach Event.AFTER_LOAD
            raise

    def __getstate__(self):  # a guarded model may be pickled (deep-copied) while loading; the hook does not travel
        return {'network': None, 'current_call': self.current_call, 'saved_call': self.saved_call, '_handle': None,
                '_registered': None}
