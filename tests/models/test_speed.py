"""The fit's speed switches and its cost accounting, on CPU (bench/cost.py measures the speed).

Each switch must leave the method alone: channels-last and TF32 are exact on CPU (TF32 is a
CUDA mode), compile agrees to float32 rounding, bf16 autocast to a stated tolerance. The
out-of-memory path is taken for real: ``memory_limit_mb`` makes the fit refuse a volume
whose estimated peak exceeds it, raising the allocator's own error type, the path a full GPU
takes.
"""
import pickle

import numpy as np
import pytest
import torch

from dipnode.models.dip import (DipOutOfMemoryError, backend_flags, fit_conditional_dip,
                                fit_memory_bytes, make_lbfgs)
from dipnode.models.params import DipParams, preset
from dipnode.models.stability import TorchWelford, Welford
from volumes import disc_phantom

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/models/conftest.py


def load_bench(name: str):
    """bench/<name>.py by path (bench/ is a folder of measurement scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "bench" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module

SHAPE = (12, 16, 14)
PARAMS = preset("tiny").replace(device="cpu", epochs=4, sample_from=2, sample_every=1, max_iter=3)


def phantom(seed=0, shape=SHAPE):
    return disc_phantom(seed, shape)


@pytest.fixture(scope="module")
def reference():
    pet, mr = phantom()
    return pet, mr, fit_conditional_dip(pet, mr, PARAMS)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_passes_are_counted_per_epoch_within_lbfgs_cap(reference):
    fit = reference[2]
    assert len(fit.passes_per_epoch) == PARAMS.epochs
    assert fit.passes == sum(fit.passes_per_epoch)
    cap = PARAMS.max_iter * 5 // 4 + 1  # max_eval, plus the step's first evaluation
    assert all(1 <= n <= cap for n in fit.passes_per_epoch), fit.passes_per_epoch


def test_passes_equal_the_closure_calls_of_an_independent_lbfgs_run():
    """The counter counts what L-BFGS calls: max_iter 1 is one evaluation and one line-search
    trial per epoch at most; compare with torch's own LBFGS driven by hand."""
    pet, mr = phantom()
    p = PARAMS.replace(max_iter=1, epochs=3, sample_from=2)
    fit = fit_conditional_dip(pet, mr, p)
    net = torch.nn.Linear(3, 1)
    opt = make_lbfgs(net.parameters(), p)
    calls = [0]
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert fit.passes_per_epoch == (calls[0],) * 3  # the same optimiser settings, same count


def test_channels_last_and_tf32_give_the_same_fit_on_cpu(reference):
    pet, mr, ref = reference
    for change in (dict(channels_last=True), dict(precision="tf32")):
        fit = fit_conditional_dip(pet, mr, PARAMS.replace(**change))
        assert rel(fit.output, ref.output) < 1e-5, change
        assert rel(fit.stability, ref.stability) < 1e-5, change
        assert fit.passes_per_epoch == ref.passes_per_epoch


def test_bf16_autocast_runs_and_tracks_the_fp32_loss(reference):
    """bf16 carries ~3 significant digits: the L-BFGS path drifts from fp32's (measured: output
    13 % apart after 4 epochs here, losses within 2 %); the loss must follow fp32's to 5 %.
    Its effect on fidelity is measured in bench/README.md, not here."""
    pet, mr, ref = reference
    fit = fit_conditional_dip(pet, mr, PARAMS.replace(precision="bf16"))
    assert fit.output.dtype == np.float32 and np.all(np.isfinite(fit.output))
    assert np.allclose(fit.loss_history, ref.loss_history, rtol=0.05)
    assert fit.loss_history[-1] < 0.5 * fit.loss_history[0]


@pytest.mark.slow
def test_compiled_network_gives_the_same_fit_to_rounding(reference):
    """torch.compile (inductor, C++ on CPU): measured 1.5e-6 relative; a few minutes to compile here."""
    pet, mr, ref = reference
    fit = fit_conditional_dip(pet, mr, PARAMS.replace(compile=True))
    assert rel(fit.output, ref.output) < 1e-4
    assert rel(fit.stability, ref.stability) < 1e-3
    assert fit.passes_per_epoch == ref.passes_per_epoch


def test_backend_flags_set_for_the_fit_and_restored():
    """The CUDA branch only sets torch.backends flags, which a CPU build has too."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.conv.fp32_precision, matmul.fp32_precision)
    cuda = torch.device("cuda")
    with backend_flags(cuda, DipParams(precision="tf32", cudnn_benchmark=True)):
        assert cudnn.benchmark is True
        assert cudnn.conv.fp32_precision == "tf32" and matmul.fp32_precision == "tf32"
    assert (cudnn.benchmark, cudnn.conv.fp32_precision, matmul.fp32_precision) == before
    with backend_flags(cuda, DipParams(precision="fp32")):  # fp32 means IEEE: TF32 convs off
        assert cudnn.conv.fp32_precision == "ieee" and matmul.fp32_precision == "ieee"
        assert cudnn.benchmark is False
    assert (cudnn.benchmark, cudnn.conv.fp32_precision, matmul.fp32_precision) == before
    with backend_flags(torch.device("cpu"), DipParams(cudnn_benchmark=True)):
        assert cudnn.benchmark == before[0]  # nothing to tune on CPU


def test_memory_limit_refuses_the_fit_with_the_allocators_error():
    pet, mr = phantom()
    need = fit_memory_bytes(SHAPE, PARAMS)
    with pytest.raises(DipOutOfMemoryError, match=r"out of memory on cpu for a 12x16x14 volume.*"
                       r"limit memory_limit_mb = 1.*on_oom") as info:
        fit_conditional_dip(pet, mr, PARAMS.replace(memory_limit_mb=1))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert info.value.device == "cpu"
    assert need > 2**20  # the limit is really below the estimate
    fit = fit_conditional_dip(pet, mr, PARAMS.replace(memory_limit_mb=need // 2**20 + 1))
    assert fit.passes > 0  # at the estimate, the fit runs
    # It crosses process boundaries (a Ray worker to the node) as itself: on_oom depends on it.
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is DipOutOfMemoryError and again.device == "cpu"
    assert str(again) == str(info.value)


def test_memory_estimate_grows_with_volume_width_and_falls_with_bf16():
    p = preset("paper")
    small, big = fit_memory_bytes((32, 64, 64), p), fit_memory_bytes((112, 136, 136), p)
    assert big > 3 * small  # activations scale with voxels; the L-BFGS state (~0.7 GB) does not
    assert fit_memory_bytes((112, 136, 136), p.replace(precision="bf16")) < big
    assert fit_memory_bytes((112, 136, 136), preset("fast")) < big / 4


def test_torch_welford_matches_numpy_welford():
    rng = np.random.default_rng(3)
    xs = [rng.normal(5, 2, (4, 5, 6)) for _ in range(7)]
    a, b = Welford(), TorchWelford()
    for x in xs:
        a.add(x)
        b.add(torch.from_numpy(x))
    assert b.count == 7
    np.testing.assert_allclose(b.mean, a.mean, rtol=1e-12)
    np.testing.assert_allclose(b.std(ddof=1), a.std(ddof=1), rtol=1e-12)
    np.testing.assert_allclose(b.std(ddof=1), np.std(xs, axis=0, ddof=1), rtol=1e-10)


def test_papernet_preset_is_exactly_what_the_fidelity_benchmark_measured():
    fidelity = load_bench("fidelity")
    measured = fidelity.network_params("papernet", seed=0)
    assert preset("papernet").replace(device="cpu") == measured


def test_cost_bench_counts_the_fits_passes_and_flops():
    """bench/cost.py: the passes it reports are the fit's own count; FLOPs scale with voxels
    and with the width squared (3x3x3 convolutions), counted on the meta device."""
    cost = load_bench("cost")
    args = cost.parse_args(["--preset", "tiny", "--shape", "8", "12", "10", "--device", "cpu",
                            "--passes", "1", "--epochs", "1", "--fit", "--fit-epochs", "4"])
    r = cost.run(args)
    assert r["passes"] == sum(r["passes_per_epoch"]) and len(r["passes_per_epoch"]) == 4
    assert r["passes"] <= r["passes_bound"]
    assert r["pass_s"] > 0 and r["peak_mem_mib"] > 0
    tiny = preset("tiny")
    f1 = cost.flops_per_pass((16, 16, 16), tiny)
    assert cost.flops_per_pass((32, 16, 16), tiny) == pytest.approx(2 * f1, rel=0.05)
    f_wide = cost.flops_per_pass((16, 16, 16), tiny.replace(base_channels=8))
    assert 3.0 < f_wide / f1 < 4.2  # the first conv (1 input channel) grows only linearly
    assert cost.flops_per_pass((112, 136, 136), preset("paper")) == 787_950_600_192  # bench/README.md


_RLIMIT_FIT = """
import resource, numpy as np, torch
from dipnode.models.dip import fit_conditional_dip, DipOutOfMemoryError
from dipnode.models.params import preset
torch.set_num_threads(1)
pet = np.random.default_rng(0).poisson(50, (48, 64, 64)).astype(np.float32)
vsz = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vsz + 300 * 2**20, resource.RLIM_INFINITY))
try:
    fit_conditional_dip(pet, pet, preset("paper").replace(device="cpu", epochs=2, sample_from=1, sample_every=1, max_iter=1))
    print("no error")
except DipOutOfMemoryError as e:
    print("DipOutOfMemoryError:", e)
"""


@pytest.mark.slow
def test_a_real_allocation_failure_is_the_fits_out_of_memory_error():
    """The host allocator really failing (a child process whose address space is capped 300 MiB
    above what it holds, fitting the paper network that needs ~1 GiB) ends the fit with the
    same DipOutOfMemoryError the node's on_oom policy acts on."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RLIMIT_FIT], capture_output=True, text=True, timeout=240)
    assert "DipOutOfMemoryError: out of memory on cpu for a 48x64x64 volume" in out.stdout, out.stdout + out.stderr
    assert "can't allocate memory" in out.stdout
