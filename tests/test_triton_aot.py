"""Every Triton kernel variant syncnorm launches compiles for sm_80 and sm_90, without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_triton.py) runs the kernels' Python on CPU
tensors: it accepts kernels that the GPU compiler refuses (a runtime value where a ``tl.constexpr``
is needed, a type the target has no instruction for). Triton also compiles ahead of time for a GPU
it does not have: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
90, 32))`` runs the whole pipeline, Triton IR to LLVM to PTX to a cubin with the ``ptxas`` shipped in
the Triton wheel. This test does that for every variant syncnorm launches.

The variants are recorded, not written down (the kernels' arguments and flags change with the code):
two Gloo ranks run real training steps of ``syncnorm.SyncBatchNorm`` with ``SYNCNORM_KERNELS=native``
and ``=fused`` (tests/fused_cpu.py's stand-ins) under the interpreter, over input dtypes, parameter
dtypes, affine/bias, running statistics, momentum None and 0, a rank with no samples, a global batch
without samples, and channel counts that give the smallest and the largest block. Every launch is
caught where Triton's interpreter runs a kernel, and specialised as a GPU launch would specialise it
(Triton's own binder: integer arguments typed by value, 16-byte alignment hints, the constexprs).
The ranks share the deduplicated variants and split the compiling between them. It depends on no
syncnorm internal name.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from distributed import run_on_ranks, use_kernels

import syncnorm

try:
    import triton.language as tl
except ImportError:  # the module skips below
    tl = None

TARGETS = (80, 90)  # compute capabilities: A100 (sm_80) and H100 (sm_90)
CHANNELS = 5  # block 8; CHANNEL_SWEEP adds the smallest block (1) and the largest (1024, two programs)
CHANNEL_SWEEP = (1, 1500)
# (input dtype, parameter and buffer dtype): float32 parameters, and the input's dtype (syncnorm takes both
# with every input dtype; torch's CPU BatchNorm refuses float32 parameters with float64 input).
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]
SETTINGS = ("native-triton", "fused")  # tests/distributed.py KERNEL_SETTINGS: both with the Triton kernels
COMPILE_TIMEOUT_S = 240.0  # below pytest's 300 s (pyproject.toml), so the ranks' errors are shown


def _triton_missing() -> str:
    """Why the kernels cannot be compiled in this environment ("" where they can)."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:
        return f"needs Triton (torch's CUDA builds ship it): {error}"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return "this Triton has no NVIDIA backend"
    try:
        knobs.nvidia.ptxas  # noqa: B018 - the lookup raises where the wheel ships no ptxas
    except RuntimeError as error:
        return f"Triton's ptxas is missing ({error}; TRITON_PTXAS_PATH or triton/backends/nvidia/bin/ptxas)"
    return ""


pytestmark = pytest.mark.skipif(bool(_triton_missing()), reason=_triton_missing() or "runs")


# --- recording ------------------------------------------------------------------------------------


class Variant:
    """One launch as a GPU would compile it: the jitted function, argument types, constexprs, alignment hints."""

    def __init__(self, jitted: Any, signature: dict[str, str], constexprs: dict[Any, Any], attrs: dict[Any, Any],
                 options: dict[str, Any]) -> None:
        self.jitted, self.signature, self.constexprs, self.attrs, self.options = (
            jitted, signature, constexprs, attrs, options)
        self.name = jitted.fn.__name__
        self.key = f"{jitted.fn.__qualname__} {signature} {constexprs} {attrs} {options}"

    def describe(self) -> str:
        names = self.jitted.arg_names
        flags = {names[path[0]]: value for path, value in self.constexprs.items()}
        types = {name: kind for name, kind in self.signature.items() if kind != "constexpr"}
        # Pointers without Triton's 16-byte alignment hint (a view into a larger buffer) compile apart.
        unaligned = [name for index, name in enumerate(names)
                     if self.signature[name].startswith("*") and not self.attrs.get((index,))]
        return (f"{self.name}({', '.join(f'{n}: {t}' for n, t in types.items())}; {flags}"
                + (f"; not 16-byte aligned: {', '.join(unaligned)})" if unaligned else ")"))


def specialise(interpreted: Any, args: tuple[Any, ...], kwargs: dict[str, Any], cache: dict[int, Any]) -> Variant:
    """The variant a GPU launch ``fn[grid](*args, **kwargs)`` would compile, by Triton's own binder."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    # The same function and jit options as a GPU run, where triton.jit makes a JITFunction. Specialisation
    # (types, alignment, constexprs) does not depend on the target; options are parsed per target when
    # compiling.
    if id(interpreted) not in cache:
        jitted = JITFunction(interpreted.fn, **interpreted.kwargs)
        backend = make_backend(GPUTarget("cuda", TARGETS[-1], 32))
        cache[id(interpreted)] = (jitted, backend, create_function_from_signature(jitted.signature, jitted.params,
                                                                                   backend))
    jitted, backend, binder = cache[id(interpreted)]
    # As JITFunction.run does:
    kwargs = dict(kwargs, debug=kwargs.get("debug", jitted.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound_args, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = jitted._pack_args(backend, kwargs, bound_args, specialization, options)
    launch_options = {name: value for name, value in kwargs.items() if name not in jitted.arg_names}
    return Variant(jitted, signature, constexprs, attrs, launch_options)


@contextlib.contextmanager
def record_launches() -> Iterator[dict[str, Variant]]:
    """Every kernel launch Triton's interpreter runs in the block, as variants by key (the kernels still run)."""
    from triton.runtime.interpreter import InterpretedFunction

    recorded: dict[str, Variant] = {}
    cache: dict[int, Any] = {}
    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        variant = specialise(self, args, kwargs, cache)
        recorded.setdefault(variant.key, variant)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run  # type: ignore[method-assign]
    try:
        yield recorded
    finally:
        InterpretedFunction.run = original  # type: ignore[method-assign]


def _step(layer: torch.nn.Module, samples: int, x_dtype: torch.dtype, generator: torch.Generator) -> None:
    shape = (samples, layer.num_features, 4)  # type: ignore[attr-defined]
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3).to(x_dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator, dtype=torch.float64).to(x_dtype)
    layer(x).backward(dy)


def drive_every_setting(samples: int, empty_samples: int) -> None:
    """Training steps through syncnorm's public entry points over every setting that changes a kernel launch.

    Every dtype pair with every optional part on (weight, bias, running statistics: the code that converts
    to and from those dtypes), and every combination of the layer's options in float32 (a flag that is off
    removes code, so its dtypes do not matter); the smallest and the largest block; momentum 0. Each on a
    rank with samples and, for every dtype pair, on a rank without; and a global batch without samples.
    Two steps a layer, as training runs them: float32, float16 and bfloat16 input pack about zero, float64
    input about zero (the pass that finds the global mean), then about the global mean.
    """
    generator = torch.Generator().manual_seed(0)
    all_on: dict[str, Any] = dict(affine=True, track_running_stats=True, momentum=0.1)
    layer_options: list[dict[str, Any]] = [
        dict(affine=affine, track_running_stats=track, momentum=momentum, **({"bias": bias} if affine else {}))
        for affine, bias in ((True, True), (True, False), (False, False))
        # Without running statistics (or in a checkpointed forward's recomputation) momentum None passes 0.
        for track, momentum in ((True, 0.1), (True, None), (False, 0.1), (False, None))
    ]
    runs: list[tuple[int, torch.dtype, torch.dtype, dict[str, Any], int]] = [
        (CHANNELS, x_dtype, p_dtype, all_on, n) for x_dtype, p_dtype in DTYPES for n in (samples, empty_samples)
    ]
    runs += [(CHANNELS, torch.float32, torch.float32, options, samples) for options in layer_options]
    runs += [(channels, torch.float32, torch.float32, all_on, samples) for channels in CHANNEL_SWEEP]
    # Triton types an integer argument by its value: momentum 0 passes its float64 bits as an i32 zero.
    runs += [(CHANNELS, torch.float32, torch.float32, dict(all_on, momentum=0.0), samples)]
    # A global batch without samples updates nothing (the running statistics keep their values).
    runs += [(CHANNELS, x_dtype, p_dtype, all_on, 0) for x_dtype, p_dtype in DTYPES[:2]]
    for setting in SETTINGS:
        with use_kernels(setting):
            for channels, x_dtype, p_dtype, options, n in runs:
                layer = syncnorm.SyncBatchNorm(channels, dtype=p_dtype, **options)
                for _ in range(2):
                    _step(layer, n, x_dtype, generator)


# --- compiling ------------------------------------------------------------------------------------


def compile_variant(variant: Variant, capability: int) -> str:
    """Compile ``variant`` to a cubin for sm_``capability``; "" when it compiles, else the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(variant.jitted, variant.signature, variant.constexprs, variant.attrs)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=variant.options)
    except Exception as error:  # any failure of the pipeline is the finding; report it with the variant
        return f"{type(error).__name__}: {error}".strip()
    if not kernel.asm.get("cubin"):
        return "no cubin produced"
    return ""


@contextlib.contextmanager
def fresh_triton_cache() -> Iterator[None]:
    """A new, empty Triton cache for the block: each variant is compiled, never found in a cache."""
    directory = tempfile.mkdtemp(prefix="syncnorm-aot-")
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): the cost without the machine's other load."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def rank_record_and_compile() -> dict[str, Any]:
    """On each of 2 ranks: record the variants, share them, compile this rank's share for every target."""
    import torch.distributed as dist

    rank = dist.get_rank()
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    with record_launches() as recorded:
        # Rank 1 is the one without samples in the empty-rank steps.
        drive_every_setting(samples=3 if rank == 0 else 2, empty_samples=3 if rank == 0 else 0)
    record_s, record_cpu_s = time.perf_counter() - start, _cpu_seconds() - start_cpu
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(recorded))
    # Each variant is compiled (for every target) by one rank that recorded it, alternating.
    owners: dict[str, int] = {}
    load = [0] * len(everyone)
    for key in sorted(set().union(*everyone)):
        owner = min((r for r, keys in enumerate(everyone) if key in keys), key=lambda r: load[r])
        owners[key] = owner
        load[owner] += 1
    compiled = []
    with fresh_triton_cache():
        for key, variant in sorted(recorded.items()):
            if owners[key] != rank:
                continue
            for capability in TARGETS:
                begin, begin_cpu = time.perf_counter(), _cpu_seconds()
                error = compile_variant(variant, capability)
                compiled.append((key, capability, time.perf_counter() - begin, _cpu_seconds() - begin_cpu, error))
    return {
        "rank": rank,
        "record_s": record_s,
        "record_cpu_s": record_cpu_s,
        "variants": {key: (variant.name, variant.describe()) for key, variant in recorded.items()},
        "compiled": compiled,
        "launched": sorted({variant.name for variant in recorded.values()}),
        "launched_sources": {variant.name: inspect.getsource(variant.jitted.fn) for variant in recorded.values()},
    }


def jitted_functions_in_package() -> set[str]:
    """Names of the functions decorated with ``triton.jit`` anywhere in the syncnorm package's source."""
    names = set()
    for path in pathlib.Path(syncnorm.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in node.decorator_list:
                    target = decorator.func if isinstance(decorator, ast.Call) else decorator
                    if ast.unparse(target) in ("triton.jit", "jit"):
                        names.add(node.name)
    return names


def test_every_kernel_variant_syncnorm_launches_compiles_for_sm80_and_sm90() -> None:
    start = time.perf_counter()
    reports = run_on_ranks(2, rank_record_and_compile, timeout=COMPILE_TIMEOUT_S)
    variants: dict[str, tuple[str, str]] = {}
    for report in reports:
        variants.update(report["variants"])
    compiled = [entry for report in reports for entry in report["compiled"]]
    done = {(key, capability) for key, capability, _, _, _ in compiled}
    missing = [(variants[key][1], capability) for key in variants for capability in TARGETS
               if (key, capability) not in done]
    assert not missing, f"variants recorded but not compiled: {missing}"
    failures: dict[str, list[str]] = {}
    for key, capability, _, _, error in compiled:
        if error:
            failures.setdefault(error, []).append(f"sm_{capability} {variants[key][1]}")
    assert not failures, (
        f"{sum(map(len, failures.values()))} of {len(compiled)} compilations failed, with "
        f"{len(failures)} distinct errors:\n" + "\n".join(
            f"\n--- {len(failed)} failed: {', '.join(failed[:2])}{' ...' if len(failed) > 2 else ''}\n{error}"
            for error, failed in failures.items())
    )

    # Every jitted function of the package was launched, or is called by a launched kernel (a helper).
    launched = set().union(*(report["launched"] for report in reports))
    sources = "\n".join(src for report in reports for src in report["launched_sources"].values())
    never = {name for name in jitted_functions_in_package() - launched if f"{name}(" not in sources}
    assert not never, f"jitted functions no recorded step launched (drive them in drive_every_setting): {never}"
    assert launched, "no kernel launch recorded: the Triton kernels did not run under the interpreter"

    wall = sorted(seconds for _, _, seconds, _, _ in compiled)
    cpu = sorted(seconds for _, _, _, seconds, _ in compiled)
    per_kernel = ", ".join(f"{n}: {sum(v[0] == n for v in variants.values())}" for n in sorted(launched))
    if os.environ.get("SYNCNORM_AOT_LIST"):
        print("\n" + "\n".join(sorted(v[1] for v in variants.values())))
    from triton import knobs

    ptxas = knobs.nvidia.ptxas
    print(f"\n{len(variants)} variants ({per_kernel}), {len(compiled)} compilations (sm_80, sm_90) on 2 ranks "
          f"with ptxas {ptxas.version} ({ptxas.path}): "
          f"per compilation median {wall[len(wall) // 2]:.2f} s wall / {cpu[len(cpu) // 2]:.2f} s CPU, max "
          f"{wall[-1]:.2f} s wall, total {sum(wall):.1f} s wall / {sum(cpu):.1f} s CPU; recording "
          f"{max(r['record_s'] for r in reports):.1f} s wall / {max(r['record_cpu_s'] for r in reports):.1f} s CPU; "
          f"test {time.perf_counter() - start:.1f} s")


# A kernel that sm_90 compiles and sm_80 refuses (no float8e4nv conversions before sm_89).
def _fp8_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # noqa: N803
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs).to(tl.float8e4nv).to(tl.float32))


def test_a_variant_that_cannot_compile_is_reported_not_skipped() -> None:
    """The compile step fails loudly: sm_80's compile of a float8 conversion gives an error, sm_90's passes."""
    from triton.runtime.jit import JITFunction

    variant = Variant(JITFunction(_fp8_kernel), {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
                      {(2,): 16}, {}, {})
    with fresh_triton_cache():
        assert compile_variant(variant, 90) == ""
        error = compile_variant(variant, 80)
    assert error, "sm_80 compiled a float8e4nv conversion: the check cannot tell a failing compile"
