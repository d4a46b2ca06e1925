"""group_advantages vs the loop-per-group reference, and the A.3 conventions, for each implementation (torch, and
the Triton kernel where it runs: CUDA, or CPU under TRITON_INTERPRET=1)."""
import pytest
import torch

import rlkernels as R
from rlkernels import reference as ref

from conftest import BACKENDS, DEVICE, assert_matches

METHODS = ["grpo", "dr_grpo", "rloo", "lite_ppo", "rpp_baseline", "passk"]
# the engines under test, mapped onto group_advantages' two implementations (the native engine has none of its own)
ADV_BACKENDS = sorted({"triton" if b == "triton" else "torch" for b in BACKENDS}) or ["torch"]


@pytest.fixture(params=ADV_BACKENDS)
def backend(request):
    return request.param


def adv(r, backend, **kw):
    """group_advantages on DEVICE, back on the CPU."""
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return R.group_advantages(r.to(DEVICE), backend=backend, **kw).cpu()


def _rewards(seed, n=24, binary=False):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, (n,), generator=g).double() if binary else torch.randn(n, generator=g, dtype=torch.float64)
    return r


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("binary", [False, True])
def test_group_size(method, binary, backend):
    r = _rewards(1, binary=binary)
    assert_matches(method, adv(r, backend, group_size=4, method=method),
                   ref.group_advantages(r, group_size=4, method=method))


@pytest.mark.parametrize("method", METHODS)
def test_large_groups_span_several_tiles(method, backend):
    """Groups longer than the kernel's tile (256): contiguous groups of 300, and labelled groups of 600, 1 and 299
    with NaN rewards and ties at the top."""
    g = torch.Generator().manual_seed(4)
    r = torch.randint(0, 7, (900,), generator=g).double() / 7  # many ties, also at the maximum
    r[torch.randperm(900, generator=g)[:40]] = float("nan")
    assert_matches(method, adv(r, backend, group_size=300, method=method),
                   ref.group_advantages(r, group_size=300, method=method))
    ids = torch.randint(0, 2, (900,), generator=g) * 5
    ids[17] = 3
    lengths = torch.randint(1, 50, (900,), generator=g)
    assert_matches(method, adv(r, backend, group_ids=ids, method=method, lengths=lengths),
                   ref.group_advantages(r, group_ids=ids, method=method, lengths=lengths))


@pytest.mark.parametrize("method", METHODS)
def test_variable_groups_singletons_equal_and_nan(method, backend):
    """Non-contiguous group labels of different sizes, a singleton, an all-equal group and NaN rewards."""
    r = _rewards(2, n=20)
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 5, 5, 5, 5, 2, 2, 2, 11, 11, 11, 11, 4, 4, 4])
    r[ids == 9] = 1.0  # singleton group
    r[ids == 2] = 0.5  # all-equal group
    r[[0, 14, 18]] = float("nan")  # unscorable responses
    r[ids == 4] = torch.tensor([float("nan"), 0.3, 0.3], dtype=torch.float64)  # all-equal among the valid ones
    lengths = torch.randint(1, 50, (20,), generator=torch.Generator().manual_seed(3))
    ours = adv(r, backend, group_ids=ids, method=method, lengths=lengths)
    expect = ref.group_advantages(r, group_ids=ids, method=method, lengths=lengths)
    assert_matches(method, ours, expect)
    assert torch.isfinite(ours).all()
    zero = (ids == 9) | (ids == 2) | (ids == 4) | torch.isnan(r)
    assert torch.all(ours[zero] == 0), "singletons, all-equal groups and NaN rewards get exactly 0"


def test_all_equal_exactly_zero_despite_rounding(backend):
    r = torch.full((6,), 0.1)  # 0.1 * 3 / 3 != 0.1 in floating point
    for method in METHODS:
        assert torch.all(adv(r, backend, group_size=3, method=method) == 0), method


def test_grpo_closed_form_and_dtypes():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    a = R.group_advantages(r, group_size=4)
    g = r.view(2, 4)
    expect = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).flatten()
    assert a.dtype == torch.float32
    assert torch.allclose(a, expect, atol=1e-6)
    assert R.group_advantages(r.double(), group_size=4).dtype == torch.float64
    rloo = R.group_advantages(r, group_size=4, method="rloo")
    # leave-one-out baseline: R_i - mean of the other three
    other = (g.sum(1, keepdim=True) - g) / 3
    assert torch.allclose(rloo, (g - other).flatten(), atol=1e-6)


def test_passk_ties_pick_first_index(backend):
    r = torch.tensor([0.2, 0.9, 0.9, 0.1])
    a = adv(r, backend, group_size=4, method="passk")
    assert a[1] == 0 and a[2] == 0 and a[0] == 0 and a[3] == 0  # tie at the top: the gap is 0
    r = torch.tensor([0.2, 0.9, 0.5, 0.1])
    a = adv(r, backend, group_size=4, method="passk")
    assert a[1] > 0 and torch.all(a[[0, 2, 3]] == 0)
    assert torch.isclose(a[1], torch.tensor((0.9 - 0.5) / (r.std().item() + 1e-6)))


def test_bad_arguments():
    r = torch.randn(6)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        R.group_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        R.group_advantages(r, group_size=3, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        R.group_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="method='ppo'"):
        R.group_advantages(r, group_size=3, method="ppo")
    with pytest.raises(ValueError, match="group_ids has shape"):
        R.group_advantages(r, group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids has dtype"):
        R.group_advantages(r, group_ids=torch.zeros(6))
    with pytest.raises(TypeError, match="rewards has dtype"):
        R.group_advantages(torch.zeros(6, dtype=torch.long), group_size=3)
    with pytest.raises(ValueError, match="rewards holds inf"):
        R.group_advantages(torch.tensor([1.0, float("inf"), 0.0]), group_size=3)
    with pytest.raises(ValueError, match="backend='cuda'"):
        R.group_advantages(r, group_size=3, backend="cuda")
    if R.available_backends(r.device)["triton"] != "available":
        with pytest.raises(ValueError, match="backend='triton' cannot run on cpu"):
            R.group_advantages(r, group_size=3, backend="triton")


def test_group_labels_numbered_on_the_device():
    """Labels become 0..k-1 in the order of their values, as torch.unique's inverse, with no read of k: negative,
    large and repeated labels, one group, one response, none."""
    from rlkernels.advantages import _dense_ids

    g = torch.Generator().manual_seed(8)
    cases = [torch.randint(-5, 5, (40,), generator=g), torch.randint(0, 2**40, (9,), generator=g).repeat(3),
             torch.full((7,), 3), torch.tensor([12]), torch.zeros(0, dtype=torch.long)]
    for labels in cases:
        want = torch.unique(labels, return_inverse=True)[1]
        assert torch.equal(_dense_ids(labels.to(DEVICE)).cpu(), want), labels


@pytest.mark.parametrize("method", METHODS)
def test_under_torch_compile(method, backend):
    """torch.compile(fullgraph=True) over group_advantages (no graph break: no host read, the Triton path left to
    eager calls; aot_eager: what is traced, not inductor's code, is under test) equals the eager call, for contiguous groups and labelled ones with a singleton, an all-equal group
    and NaN rewards."""
    torch._dynamo.reset()
    r = _rewards(5, n=20).to(DEVICE)
    ids = torch.tensor([7, 3, 7, 3, 3, 9, 5, 5, 5, 5, 2, 2, 2, 11, 11, 11, 11, 4, 4, 4], device=DEVICE)
    r[ids == 2] = 0.5
    r[[0, 14]] = float("nan")
    lengths = torch.randint(1, 50, (20,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for kw in (dict(group_size=4), dict(group_ids=ids, lengths=lengths)):
        compiled = torch.compile(lambda r: R.group_advantages(r, method=method, backend=backend, **kw),
                                 fullgraph=True, backend="aot_eager")
        got, want = compiled(r), R.group_advantages(r, method=method, backend=backend, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=False)
        assert torch.all(got[torch.isnan(r)] == 0)
