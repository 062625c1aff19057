"""Fixtures for every test, and one guard for the whole test process."""

from __future__ import annotations

import pytest
import torch
from torch.jit import _builtins


def _keep_torchscript_builtins_alive() -> None:
    """Keep every object torch registers as a TorchScript builtin alive, so that no other object can take its id.

    TorchScript recognises builtins by ``id()`` (``torch.jit._builtins``), and torch registers
    operator objects there without keeping them (``torch._ops._get_packet``). When an
    operator's Python object is made again (a packet refreshed as a library adds overloads,
    as torch.ao's ``quantized_decomposed`` does while the compile stack loads), the old one
    dies with its id still in the table; a later object at the same address, such as a
    conv's ``_reversed_padding_repeated_twice`` list, is then taken for a builtin, and
    scripting that module fails with "builtin cannot be used as a value". That happened once
    in this suite (GoogLeNet in ``test_zoo.py``, after the compile tests had run), depending
    on where objects land in memory.
    """
    register = _builtins._register_builtin
    kept = []

    def register_and_keep(fn, op):
        kept.append(fn)
        register(fn, op)

    _builtins._register_builtin = register_and_keep


_keep_torchscript_builtins_alive()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
