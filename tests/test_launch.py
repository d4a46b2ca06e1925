"""rlkernels.triton_ops.launch: the compiled kernel Triton returned is launched again only for arguments that
Triton would specialise alike. On CPU with stand-ins for a Triton kernel and its compiled form (the real ones run in
every Triton test on a GPU, bench/device_check.sh)."""
import contextlib

import pytest
import torch

from rlkernels.triton_ops import launch as L


class _Compiled:
    """A compiled kernel: indexable by a 3-D grid, its launcher taking every parameter positionally."""

    def __init__(self, calls):
        self.calls = calls

    def run(self):  # a CompiledKernel has its launcher here
        raise AssertionError("launched through __getitem__ only")

    def __getitem__(self, grid):
        assert len(grid) == 3
        return lambda *params: self.calls.append(("fast", grid, params))


class _Kernel:
    """A JITFunction: ``kernel[grid](*args, **kwargs)`` compiles (here: records) and returns the compiled kernel."""
    arg_names = ["x_ptr", "n", "y_ptr", "BLOCK", "FLAG"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return _Compiled(self.calls)
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(L, "ENABLED", True)
    monkeypatch.setattr(L, "_device", lambda: 0)
    L.clear()
    yield
    L.clear()


def _paths(kernel):
    return [c[0] for c in kernel.calls]


def test_a_seen_key_launches_the_kept_kernel_with_every_parameter(fast):
    k = _Kernel()
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.float64)
    L.launch(k, (5,), x, 32, y, BLOCK=128, FLAG=True, num_warps=4)
    L.launch(k, (7, 2), x, 48, y, BLOCK=128, FLAG=True, num_warps=4)  # 48: also a multiple of 16, not 1
    assert _paths(k) == ["triton", "fast"]
    assert k.calls[0][1:] == ((5,), (x, 32, y), dict(BLOCK=128, FLAG=True, num_warps=4))
    _, grid, params = k.calls[1]
    assert grid == (7, 2, 1)  # padded to 3-D
    assert params[:3] == (x, 48, y) and params[3:] == (128, True)  # the constexprs in order; num_warps is an option


@pytest.mark.parametrize("change", ["alignment", "dtype", "one", "divisibility", "int64", "uint64", "constexpr",
                                    "option", "bool", "device"])
def test_what_triton_specialises_on_is_in_the_key(fast, monkeypatch, change):
    k = _Kernel()
    x, y = torch.zeros(64), torch.zeros(64)
    base = dict(args=(x, 32, y), kwargs=dict(BLOCK=128, FLAG=True, num_warps=4))
    other = {"alignment": dict(args=(x[1:], 32, y)),  # 4 bytes off a 16-byte boundary
             "dtype": dict(args=(x, 32, y.double())),
             "one": dict(args=(x, 1, y)),
             "divisibility": dict(args=(x, 33, y)),
             "int64": dict(args=(x, 2 ** 32, y)),  # a multiple of 16 too: only the integer type differs
             "uint64": dict(args=(x, 2 ** 63 + 16, y)),
             "constexpr": dict(kwargs=dict(BLOCK=256, FLAG=True, num_warps=4)),
             "option": dict(kwargs=dict(BLOCK=128, FLAG=True, num_warps=8)),
             "bool": dict(kwargs=dict(BLOCK=128, FLAG=False, num_warps=4)),
             "device": {}}[change]
    L.launch(k, (1,), *base["args"], **base["kwargs"])
    if change == "device":
        monkeypatch.setattr(L, "_device", lambda: 1)
    changed = {**base, **other}
    L.launch(k, (1,), *changed["args"], **changed["kwargs"])
    L.launch(k, (1,), *changed["args"], **changed["kwargs"])
    assert _paths(k) == ["triton", "triton", "fast"]


def test_int_classes_and_runtime_scalars():
    key = L.arg_key
    assert key([16]) == key([4096]) != key([1]) != key([17])
    assert key([17]) == key([3]) != key([2 ** 31]) != key([2 ** 63])
    assert key([-(2 ** 31)]) == key([-16]) and key([-(2 ** 31) - 16]) != key([-16])
    assert key([0.5]) == key([2.0]) and key([True]) != key([1]) and key([True]) != key([False])
    assert key([None]) == (None,)
    assert key([(1, 2)]) is None and key(["text"]) is None  # not modelled: Triton's own path


def test_triton_path_when_off_unmodelled_or_not_kept(fast, monkeypatch):
    x = torch.zeros(16)
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), x, (1, 2), x, BLOCK=16, FLAG=True)  # a tuple argument
    assert _paths(k) == ["triton", "triton"]
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), x, 16, x, BLOCK=16)  # FLAG not named: its place is unknown
    assert _paths(k) == ["triton", "triton"]

    class Deferred(_Kernel):  # a launch that returned no compiled kernel
        def __getitem__(self, grid):
            return lambda *a, **kw: self.calls.append(("triton",))

    k = Deferred()
    for _ in range(2):
        L.launch(k, (1,), x, 16, x, BLOCK=16, FLAG=True)
    assert _paths(k) == ["triton", "triton"]

    class Wrapper:  # a stand-in without arg_names (as the tests' recording wrappers)
        def __init__(self):
            self.inner = _Kernel()

        def __getitem__(self, grid):
            return self.inner[grid]

    w = Wrapper()
    for _ in range(2):
        L.launch(w, (1,), x, 16, x, BLOCK=16, FLAG=True)
    assert _paths(w.inner) == ["triton", "triton"]
    monkeypatch.setattr(L, "ENABLED", False)
    k = _Kernel()
    for _ in range(2):
        L.launch(k, (1,), x, 16, x, BLOCK=16, FLAG=True)
    assert _paths(k) == ["triton", "triton"]


def test_prepare_defers_the_launch(fast, monkeypatch):
    """prepare() computes the key and fetches the kept kernel's launcher now; nothing is launched until the returned
    function is called (the logits op calls it once its checks' copies are queued). A first launch prepared is
    Triton's."""
    k = _Kernel()
    x = torch.zeros(32)
    first = L.prepare(k, (3,), x, 16, x, BLOCK=64, FLAG=False)
    assert k.calls == []
    first()
    assert _paths(k) == ["triton"]
    later = L.prepare(k, (3,), x, 32, x, BLOCK=64, FLAG=False)
    assert _paths(k) == ["triton"]
    later()
    assert _paths(k) == ["triton", "fast"] and k.calls[1][1] == (3, 1, 1) and k.calls[1][2] == (x, 32, x, 64, False)
    monkeypatch.setattr(L, "ENABLED", False)
    off = L.prepare(k, (3,), x, 32, x, BLOCK=64, FLAG=False)
    assert len(k.calls) == 2
    off()
    assert _paths(k) == ["triton", "fast", "triton"]


def test_host_sizes_match_tritons():
    """next_pow2 / cdiv, the host-side stand-ins for triton.next_power_of_2 / triton.cdiv (constexpr functions, a few
    microseconds per call), give Triton's values."""
    triton = pytest.importorskip("triton")
    for n in list(range(1, 2100)) + [152064, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1]:
        assert L.next_pow2(n) == triton.next_power_of_2(n), n
    for a in list(range(0, 300)) + [152064, 2 ** 33 + 7]:
        for b in (1, 2, 3, 16, 128, 4096):
            assert L.cdiv(a, b) == triton.cdiv(a, b), (a, b)


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it lives on a CUDA device (launch reads only ``get_device()`` of it)."""
    index = 1

    def get_device(self):
        return self.index


class _OnDevice0(_OnDevice):
    index = 0


def test_a_launch_runs_on_its_tensors_device(fast, monkeypatch):
    """Triton launches on the current CUDA device whatever device the tensors are on: a launch whose tensors are on
    another device runs inside that device's context (Triton's path and the kept kernel's alike, prepared or not),
    under a key of that device; on the current device no context is entered."""
    current, entered = [0], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(L, "_device", lambda: current[0])
    monkeypatch.setattr(L, "_device_context", device)

    class Compiled(_Compiled):  # records the device current at each launch of the kept kernel
        def __getitem__(self, grid):
            run = super().__getitem__(grid)
            return lambda *params: (self.calls.append(("on", current[0])), run(*params))

    class Kernel(_Kernel):  # and at each launch through Triton's path
        def __getitem__(self, grid):
            run = super().__getitem__(grid)
            return lambda *a, **kw: (self.calls.append(("on", current[0])), run(*a, **kw), Compiled(self.calls))[2]

    def launches(k):  # (path, device current during it)
        return [(path[0], on[1]) for on, path in zip(k.calls[::2], k.calls[1::2])]

    k = Kernel()
    x1, x0 = torch.zeros(64).as_subclass(_OnDevice), torch.zeros(64).as_subclass(_OnDevice0)
    for _ in range(2):
        L.launch(k, (1,), x1, 32, x1, BLOCK=128, FLAG=True)
    assert launches(k) == [("triton", 1), ("fast", 1)] and entered == [1, 1] and current == [0]
    L.launch(k, (1,), x0, 32, x0, BLOCK=128, FLAG=True)  # the current device: a key of its own, no context
    assert launches(k)[2:] == [("triton", 0)] and entered == [1, 1]
    later = L.prepare(k, (1,), x1, 48, x1, BLOCK=128, FLAG=True)
    assert entered == [1, 1]  # nothing entered until the launch
    later()
    assert launches(k)[3:] == [("fast", 1)] and entered == [1, 1, 1] and current == [0]
    current[0] = 1  # the tensors' device made current (torch.cuda.set_device): no context needed
    L.launch(k, (1,), x1, 32, x1, BLOCK=128, FLAG=True)
    assert launches(k)[4:] == [("fast", 1)] and entered == [1, 1, 1]
    current[0] = 0
    monkeypatch.setattr(L, "ENABLED", False)  # RLKERNELS_FAST_LAUNCH=0: Triton's path every time, on the same device
    L.launch(k, (1,), x1, 32, x1, BLOCK=128, FLAG=True)
    assert launches(k)[5:] == [("triton", 1)] and entered == [1, 1, 1, 1] and current == [0]
