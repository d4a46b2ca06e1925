"""Launching a compiled Triton kernel with less host work than ``kernel[grid](...)``.

On every call Triton's ``JITFunction.run`` binds and specialises each argument, builds its cache key from them and
checks the kernel's globals before it launches. On the H100 machine's host (2026-11-27, ``bench/host_profile.py``)
that took 108-138 us for the statistics kernel (16 runtime arguments, 11 constexprs) against 27 us for a kernel of
three arguments, and the logits op's GPU idles through it: the statistics kernel is its first.

:func:`launch` keeps the compiled kernel that Triton's own launch returned, under a key at least as fine as Triton's
specialisation of the arguments, and launches that kernel through its own launcher (``compiled[grid](...)``, which
keeps Triton's launch hooks) on later calls with an equal key. The key holds, for each argument:

* a tensor: its dtype and whether its address is a multiple of 16 bytes (Triton: the pointer type, and the "D"
  alignment attribute unless the parameter is exempt);
* an int: whether it is 1, whether it is a multiple of 16, and its range (32-bit, 64-bit, unsigned 64-bit)
  (Triton: the constexpr 1, the "D" divisibility attribute, and the integer type);
* a float, a bool or None: its kind (bools also their value);

and the constexprs and launch options (``num_warps``...) with their values, and the device. Anything else
(a tuple, a descriptor, a Triton function) takes Triton's own path every time, as does everything under the
interpreter or with ``RLKERNELS_FAST_LAUNCH=0``. The key can only be finer than Triton's: two launches with an equal
key get the same compiled kernel from Triton too. What the key leaves out are Triton's process-wide switches read at
launch (``TRITON_DEBUG``, instrumentation): changing them after a kernel's first launch does not recompile it here.

The device: Triton launches on the *current* CUDA device (and its current stream), whatever device the tensors are
on. Tensors on another device (a model spread over GPUs with ``device_map="auto"`` puts the LM head on the last one,
while the current device stays ``cuda:0``) then fail Triton's pointer check, or would run on the wrong device's
stream. Every launch here (both paths) therefore runs on the device of its first tensor argument: inside
``torch.cuda.device(...)`` when that is not the current one, and under no context otherwise (the usual case: one
``get_device()`` more per launch).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

# read once, as Triton reads TRITON_INTERPRET once when it is imported
ENABLED = (os.environ.get("RLKERNELS_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no")
           and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))

_COMPILED: Dict[tuple, Any] = {}
_I32 = (-(2 ** 31), 2 ** 31)
_U64 = 2 ** 63


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1): ``triton.next_power_of_2`` for host code. Triton's is a
    constexpr function whose every call unwraps its arguments through an import (3.7 us with Triton 3.6, 2.0-2.4 us
    with 3.9, on the 2-core CPU machine; this one 0.2-0.3 us), paid before each launch."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code (see :func:`next_pow2`)."""
    return -(-a // b)


def _int_class(v: int) -> Tuple[bool, bool, int]:
    kind = 0 if _I32[0] <= v < _I32[1] else (2 if v >= _U64 else 1)
    return v == 1, v % 16 == 0, kind


def arg_key(args) -> Optional[tuple]:
    """The per-argument part of :func:`launch`'s key, or None for an argument it does not model."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool):  # before int: a bool is an int
            key.append(("b", a))
        elif isinstance(a, int):
            key.append(_int_class(a))
        elif isinstance(a, float):
            key.append("f")
        elif a is None:
            key.append(None)
        else:
            return None
    return tuple(key)


def launch(kernel, grid: Tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: the runtime arguments positionally, in the kernel's order, then the
    constexprs and launch options by name, on the device of the first tensor argument. A launch whose key was seen
    before skips Triton's binding, specialising and cache lookup (see the module's docstring)."""
    prepare(kernel, grid, *args, **kwargs)()


def prepare(kernel, grid: Tuple[int, ...], *args, **kwargs) -> Callable[[], None]:
    """:func:`launch` in two steps: the key and the kept kernel's launcher now, the launch when the returned function
    is called (on the current stream of the tensors' device then). The logits op prepares its launch inside its
    value-checking block and launches once the checks' copies are queued (before it waits for them; with
    ``_checks.READ_AFTER_LAUNCH`` off, after the checks' host sync), so that little host work is left between the
    two."""
    device = _tensor_device(args)
    if device < 0:  # CPU tensors (the interpreter) or none: Triton's current device
        return _prepare(kernel, grid, None, args, kwargs)
    start = _prepare(kernel, grid, device, args, kwargs)
    return start if device == _device() else functools.partial(_launch_on, device, start)


def _launch_on(device: int, start: Callable[[], None]) -> None:
    with _device_context(device):
        start()


def _tensor_device(args) -> int:
    """The CUDA device index of the first tensor argument; -1 for a CPU tensor or none."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.get_device()
    return -1


def _prepare(kernel, grid, device: Optional[int], args, kwargs) -> Callable[[], None]:
    """:func:`prepare` on ``device`` (None: the current one), without the device context."""
    if not ENABLED:
        return lambda: kernel[grid](*args, **kwargs)
    per_arg = arg_key(args)
    if per_arg is None:
        return lambda: kernel[grid](*args, **kwargs)
    key = (id(kernel), _device() if device is None else device, per_arg, tuple(kwargs.items()))
    kept = _COMPILED.get(key)
    if kept is None:
        return lambda: _first_launch(kernel, grid, key, args, kwargs)
    compiled, names = kept
    # a CompiledKernel's launcher reads grid[0], grid[1] and grid[2]
    runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]
    params = args + tuple(kwargs[n] for n in names)
    return lambda: runner(*params)


def _first_launch(kernel, grid, key, args, kwargs) -> None:
    compiled = kernel[grid](*args, **kwargs)
    names = _params(kernel, args, kwargs)
    if names is not None and _launchable(compiled):
        _COMPILED[key] = (compiled, names)


def _device() -> int:
    return torch.cuda.current_device()  # the device Triton launches on (its driver asks torch the same)


_device_context = torch.cuda.device  # entered around a launch on another device than the current one


def _params(kernel, args, kwargs) -> Optional[Tuple[str, ...]]:
    """The names of the parameters after the positional ones, in the kernel's order (the compiled kernel's launcher
    takes every parameter, constexprs included, positionally), or None when the kernel object does not list them
    or the call does not name each of them (Triton's path, every time)."""
    arg_names = getattr(kernel, "arg_names", None)
    if arg_names is None:
        return None
    names = tuple(arg_names[len(args):])
    return names if all(n in kwargs for n in names) else None


def _launchable(compiled) -> bool:
    # what Triton's JITFunction.run returns after a launch: a CompiledKernel (indexable by a grid); anything else
    # (None when a compile was deferred) is not kept
    return compiled is not None and hasattr(type(compiled), "__getitem__") and hasattr(compiled, "run")


def clear() -> None:
    """Forget every kept kernel (tests)."""
    _COMPILED.clear()
