"""Faults and bad input across ranks: every rank gets an error naming syncnorm, nobody hangs, no state is lost.

Two kinds of worlds:
- the shared Gloo pools of ``distributed.run_on_ranks``, for cases where every rank leaves every
  collective cleanly (validation errors, errors raised before any collective, injected faults on
  every rank);
- dedicated worlds (``run_dedicated``) with a 2-second group timeout, for a dead, silent or
  mismatched peer: after a timeout or a lost peer a Gloo group is not reusable, so each such case
  gets fresh processes, forked from a forkserver that has torch imported already (fast), and is
  thrown away afterwards.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
from distributed import COLLECTIVES, my_slice, rank, run_on_ranks
from reference import assert_close, reference_module, reference_step
from torch import nn

import syncnorm
from syncnorm import _validate, validation
from syncnorm._errors import SyncNormError

GROUP_TIMEOUT_S = 2.0
# Far above what a case needs (fork, connect, one group timeout); reaching it means a hang.
DEDICATED_DEADLINE_S = 60.0
# In a dedicated world: the whole world, with the short timeout; the layers of ``_layer()`` use it.
# None in the shared pools (the layers then use the default group).
_SHORT_TIMEOUT_GROUP: Any = None


# --------------------------------------------------------------------------- dedicated worlds


@dataclass
class Outcome:
    """How one rank of a dedicated world ended."""

    status: str  # "returned", "raised", "died" (exited without a result) or "hung" (killed at the deadline)
    value: Any = None
    error_type: str = ""
    message: str = ""
    exitcode: Optional[int] = None


def _dedicated_worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
                      results: Any) -> None:
    global _SHORT_TIMEOUT_GROUP
    torch.set_num_threads(1)
    # Joining may take long on a loaded machine; only the group the layers use has the short timeout.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=DEDICATED_DEADLINE_S))
    _SHORT_TIMEOUT_GROUP = dist.new_group(list(range(world_size)),
                                          timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        outcome: tuple[str, Any] = ("returned", fn(*args))
    except BaseException as error:  # report everything to the parent, with the traceback
        outcome = ("raised", (type(error).__name__, str(error), traceback.format_exc()))
    results.put((rank, outcome))
    results.close()
    results.join_thread()
    # No destroy_process_group: after a lost peer it can wait on that peer; the world is discarded anyway.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_dedicated(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Outcome]:
    """Run ``fn(*args)`` on a fresh Gloo world with a short timeout; how each rank ended, never a hang."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "syncnorm", "test_reliability"])
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_dedicated_worker, args=(r, world_size, port, fn, args, results),
                                 daemon=True) for r in range(world_size)]
    for process in processes:
        process.start()
    reported: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + DEDICATED_DEADLINE_S
    while len(reported) < world_size and time.monotonic() < deadline:
        silent = [r for r in range(world_size) if r not in reported]
        all_exited = all(processes[r].exitcode is not None for r in silent)
        try:
            rank_, outcome = results.get(timeout=1.0 if all_exited else 0.1)
            reported[rank_] = outcome
        except queue.Empty:
            if all_exited:  # and nothing more in the queue: the silent ranks died
                break
    hung = [r for r, p in enumerate(processes) if p.is_alive() and r not in reported]
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join(timeout=10)
    outcomes = []
    for r, process in enumerate(processes):
        if r in reported:
            status, payload = reported[r]
            if status == "returned":
                outcomes.append(Outcome("returned", value=payload, exitcode=process.exitcode))
            else:
                outcomes.append(Outcome("raised", error_type=payload[0], message=payload[1] + "\n" + payload[2],
                                        exitcode=process.exitcode))
        else:
            outcomes.append(Outcome("hung" if r in hung else "died", exitcode=process.exitcode))
    return outcomes


def _caught(error: BaseException) -> dict[str, Any]:
    return {"error": type(error).__name__, "message": str(error)}


def _assert_syncnorm_error_with_hint(report: dict[str, Any]) -> None:
    """A SyncNormError that names syncnorm and points to validation mode."""
    assert report.get("error") == "SyncNormError", report
    assert "syncnorm" in report["message"] and "SYNCNORM_VALIDATE=1" in report["message"], report["message"]


def _returned(outcome: Outcome) -> dict[str, Any]:
    assert outcome.status == "returned", outcome
    return outcome.value  # type: ignore[no-any-return]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Bit for bit the same parameters and buffers (NaN equal to NaN)."""
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) or torch.allclose(before[k], after[k], 0, 0, equal_nan=True)
               for k in before)


def _forward_failure(bn: syncnorm.SyncBatchNorm, x: torch.Tensor, validate: bool) -> dict[str, Any] | None:
    """Run one forward; on a SyncNormError, its report plus whether the layer is unchanged, else None."""
    before = _state(bn)
    try:
        with validation(validate):
            bn(x)
    except SyncNormError as error:
        return {**_caught(error), "unchanged": _unchanged(before, bn)}
    return None


def _layer(channels: int = 3) -> syncnorm.SyncBatchNorm:
    """A converted layer named 'block.bn', with non-trivial parameters and buffers."""
    model = syncnorm.convert_model(nn.ModuleDict({"block": nn.ModuleDict({"bn": nn.BatchNorm1d(channels)})}),
                                   process_group=_SHORT_TIMEOUT_GROUP)
    bn = model["block"]["bn"]  # type: ignore[index]
    assert isinstance(bn, syncnorm.SyncBatchNorm) and bn.layer_name == "block.bn"
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
        bn.running_mean.copy_(torch.linspace(-0.3, 0.3, channels))
        bn.running_var.copy_(torch.linspace(0.7, 1.3, channels))
    return bn


def _stay_silent() -> None:
    """Stay alive without communicating past the group timeout, so the peer sees a timeout, not a closed socket."""
    time.sleep(GROUP_TIMEOUT_S + 1)


def rank_peer_exits_before_forward(validate: bool) -> dict[str, Any]:
    if rank() == 1:
        os._exit(0)
    return _forward_failure(_layer(), torch.randn(4, 3), validate) or {"error": None}


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validating"])
def test_peer_that_exits_before_the_forward_gives_an_error_and_changes_nothing(validate: bool) -> None:
    survivor, dead = run_dedicated(2, rank_peer_exits_before_forward, validate)
    assert dead.status == "died"
    report = _returned(survivor)
    if validate:  # the validation all-gather is the first collective to find the peer gone
        assert report["error"] == "SyncNormError" and "block.bn" in report["message"], report
        assert "the validation all-gather over 2 ranks failed" in report["message"], report
    else:
        _assert_syncnorm_error_with_hint(report)
    assert report["unchanged"]


def rank_peer_skips_backward() -> dict[str, Any]:
    bn = _layer()
    x = torch.randn(4, 3, requires_grad=True)
    y = bn(x)
    after_forward = _state(bn)
    if rank() == 1:
        _stay_silent()
        return {"error": None}
    try:
        (y * torch.randn(4, 3)).sum().backward()
    except SyncNormError as error:
        # The forward's running statistics stay (as after any forward); no gradient was half-written.
        return {**_caught(error), "unchanged": _unchanged(after_forward, bn),
                "no_grads": bn.weight.grad is None and bn.bias.grad is None and x.grad is None}
    return {"error": None}


def test_peer_that_skips_backward_gives_a_timeout_error_and_no_gradient() -> None:
    waiting, skipping = (_returned(o) for o in run_dedicated(2, rank_peer_skips_backward))
    assert skipping["error"] is None
    _assert_syncnorm_error_with_hint(waiting)
    assert "timed out" in waiting["message"].lower() or "timeout" in waiting["message"].lower()
    assert waiting["unchanged"] and waiting["no_grads"]


def rank_one_rank_in_eval(validate: bool) -> dict[str, Any]:
    bn = _layer().train(rank() == 0)
    failure = _forward_failure(bn, torch.randn(4, 3), validate)
    if failure is not None:
        return failure
    if not validate and rank() == 1:
        _stay_silent()
    return {"error": None}


def test_one_rank_in_eval_without_validation_ends_in_a_timeout_error_on_the_training_rank() -> None:
    training, evaluating = (_returned(o) for o in run_dedicated(2, rank_one_rank_in_eval, False))
    assert evaluating["error"] is None  # eval mode does not communicate
    _assert_syncnorm_error_with_hint(training)
    assert training["unchanged"]


def rank_bad_input_on_one_rank(validate: bool) -> dict[str, Any]:
    bn = _layer()
    before = _state(bn)
    x = torch.randn(2, 3, 1, 1, 1, 2) if rank() == 1 else torch.randn(4, 3)
    try:
        with validation(validate):
            bn(x)
    except (SyncNormError, ValueError) as error:
        if not validate and rank() == 1:
            _stay_silent()
        return {**_caught(error), "unchanged": _unchanged(before, bn)}
    return {"error": None}


def test_bad_input_on_one_rank_without_validation_raises_there_and_times_out_elsewhere() -> None:
    good, bad = (_returned(o) for o in run_dedicated(2, rank_bad_input_on_one_rank, False))
    assert bad["error"] == "ValueError" and "expected input of 2 to 5 dimensions" in bad["message"]
    _assert_syncnorm_error_with_hint(good)
    assert good["unchanged"] and bad["unchanged"]


def rank_mismatch_without_validation(case: str) -> dict[str, Any]:
    """Rank 1 differs as ``case`` says; no validation mode, so only the collectives can notice."""
    odd = rank() == 1
    bn = _layer(4 if case == "width" and odd else 3)
    x = torch.randn(4, bn.num_features, dtype=torch.float64 if case == "dtype" and odd else torch.float32)
    bn.to(x.dtype)
    try:
        y = bn(x.requires_grad_())
        if case != "skipped-backward" or not odd:
            y.sum().backward()
        bn(torch.randn(4, bn.num_features, dtype=x.dtype, requires_grad=True))
    except SyncNormError as error:
        return _caught(error)
    return {"error": None}


@pytest.mark.parametrize("case", ["skipped-backward", "width", "dtype"])
def test_mismatched_collectives_without_validation_never_hang(case: str) -> None:
    # skipped-backward: rank 0's backward all-reduce (2C float32) meets rank 1's next forward
    # all-reduce (2C+1 float64). width: 7 values meet 9. dtype: the forward buffers agree (float64
    # either way, and the merged statistics are right), the backward sums do not (float32 vs float64).
    # Gloo refuses every size mismatch: it aborts the receiving process ("Is there a distributed
    # collective mismatch in your code?") and the other rank gets a SyncNormError. No hang, no mixing.
    outcomes = run_dedicated(2, rank_mismatch_without_validation, case)
    assert all(o.status in ("returned", "died") for o in outcomes), outcomes
    survivors = [o.value for o in outcomes if o.status == "returned"]
    assert survivors, outcomes
    for report in survivors:
        _assert_syncnorm_error_with_hint(report)


# --------------------------------------------------------------------------- validation mode (shared pools)

def _two_layers(order: list[str]) -> nn.Module:
    return syncnorm.convert_model(nn.Sequential(OrderedDict((name, nn.BatchNorm1d(3)) for name in order)))


def rank_validation_mismatch(case: str) -> dict[str, Any]:
    """One rank differs from the others as ``case`` says; every rank must raise, nothing may change."""
    r, last = rank(), dist.get_world_size() - 1
    odd = r == last
    x = torch.randn(4, 3)
    if case == "order":
        model = _two_layers(["b", "a"] if odd else ["a", "b"])
    else:
        model = nn.Sequential(OrderedDict(features=nn.BatchNorm1d(4 if case == "width" and odd else 3)))
        model = syncnorm.convert_model(model)
    if case == "width" and odd:
        x = torch.randn(4, 4)
    model.train(not (case == "eval" and odd))
    if case == "dtype" and odd:
        x = x.double()
        model.double()
    if case == "input-rank" and odd:
        x = torch.randn(4, 3, 2)
    if case == "6-D" and odd:
        x = torch.randn(2, 3, 1, 1, 1, 2)
    x.requires_grad_(not (case == "needs-grad" and odd))
    before = _state(model)
    COLLECTIVES.reset()
    try:
        with validation():
            y = model(x)
            if case == "skipped-backward":
                before = _state(model)  # the first forward succeeded; what follows must change nothing
                if not odd:
                    y.sum().backward()
                model(x)
    except SyncNormError as error:
        return {**_caught(error), "unchanged": _unchanged(before, model), "calls": COLLECTIVES.names()}
    return {"error": None}


MISMATCHES = {
    # case: (world size, text every rank's message must contain)
    "width": (3, ["layer 'features'", "num_features differs (rank 0: 3, rank 1: 3, rank 2: 4)"]),
    "eval": (2, ["layer 'features'", "training flag differs (rank 0: True, rank 1: False)"]),
    "order": (2, ["layer name differs (rank 0: 'a', rank 1: 'b')"]),
    "dtype": (2, ["input dtype differs (rank 0: torch.float32, rank 1: torch.float64)"]),
    "input-rank": (2, ["input rank (number of dimensions) differs (rank 0: 2, rank 1: 3)"]),
    "6-D": (2, ["input rank (number of dimensions) differs (rank 0: 2, rank 1: 6)"]),
    "needs-grad": (2, ["input needs a gradient differs (rank 0: True, rank 1: False)"]),
    "skipped-backward": (3, ["not in the same pass", "rank 0 in the backward of 'features'",
                             "rank 2 in the forward of 'features'"]),
}


@pytest.mark.parametrize("case", MISMATCHES, ids=list(MISMATCHES))
def test_validation_names_the_layer_field_and_ranks_on_every_rank(case: str) -> None:
    world_size, texts = MISMATCHES[case]
    reports = run_on_ranks(world_size, rank_validation_mismatch, case)
    for report in reports:
        assert report["error"] == "SyncNormError", report
        assert report["message"].startswith("syncnorm validation:"), report["message"]
        for text in texts:
            assert text in report["message"], report["message"]
        assert report["unchanged"]
    # Every rank saw the same table, so every rank tells the same story.
    assert len({report["message"] for report in reports}) == 1


def rank_validated_steps(x: torch.Tensor, dy: torch.Tensor, sizes: list[int], validate: bool,
                         training: bool) -> dict[str, Any]:
    bn = _layer(x.shape[1]).train(training)
    xl = my_slice(x, sizes).requires_grad_()
    with validation(validate):
        COLLECTIVES.reset()
        y = bn(xl)
        forward = COLLECTIVES.names()
        COLLECTIVES.reset()
        (y * my_slice(dy, sizes)).sum().backward()
    return {"y": y.detach(), "grad_x": xl.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
            "forward": forward, "backward": COLLECTIVES.names()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("validate", [True, False], ids=["validating", "not-validating"])
def test_validation_changes_no_number_and_costs_one_all_gather_only_when_on(validate: bool, training: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    sizes = [3, 0, 4]
    x = torch.randn(sum(sizes), 3, generator=generator) * 2 + 1
    dy = torch.randn(sum(sizes), 3, generator=generator)
    reports = run_on_ranks(3, rank_validated_steps, x, dy, sizes, validate, training)
    reference = reference_module(2, 3, {}, _layer().weight.detach(), _layer().bias.detach())
    with torch.no_grad():
        reference.running_mean.copy_(_layer().running_mean)
        reference.running_var.copy_(_layer().running_var)
    expected = reference_step(reference.train(training), x, dy)
    for key in ("y", "grad_x"):
        assert_close(torch.cat([r[key] for r in reports]), expected[key], torch.float32, key)
    for r in reports:
        assert_close(r["running_mean"], expected["running_mean"], torch.float32, "running_mean")
        assert_close(r["running_var"], expected["running_var"], torch.float32, "running_var")
        check = ["all_gather"] if validate else []
        assert r["forward"] == check + (["all_reduce"] if training else [])
        assert r["backward"] == (check + ["all_reduce"] if training else [])


def test_validation_without_a_process_group_is_plain_batchnorm() -> None:
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    ours, theirs = syncnorm.SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm1d(3, dtype=torch.float64)
    with validation():
        assert_close(ours(x), theirs(x), torch.float64, "output")
    assert torch.equal(ours.running_var, theirs.running_var)


def test_validation_switch_environment_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv("SYNCNORM_VALIDATE", "1")
        importlib.reload(_validate)
        assert _validate.enabled()
        with _validate.validation(False):
            assert not _validate.enabled()
            with _validate.validation():
                assert _validate.enabled()
            assert not _validate.enabled()
        assert _validate.enabled()
        monkeypatch.setenv("SYNCNORM_VALIDATE", "maybe")
        with pytest.raises(ValueError, match="SYNCNORM_VALIDATE must be 1"):
            importlib.reload(_validate)
    finally:
        monkeypatch.delenv("SYNCNORM_VALIDATE")
        importlib.reload(_validate)
    assert not _validate.enabled()  # off by default
    assert [_validate._from_environment(v) for v in ("0", "", "off", "1", "true", " ON ")] == [
        False, False, False, True, True, True]


# --------------------------------------------------------------------------- failed steps change nothing

def rank_collective_raises(phase: str, validate: bool) -> dict[str, Any]:
    """Every rank's collective raises (as on a broken network); the layers must be as before the step."""
    bn = _layer()
    x = torch.randn(4, 3, requires_grad=True)
    name = "all_gather" if validate else "all_reduce"
    original = getattr(dist, name)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected fault: connection lost")

    try:
        with validation(validate):
            if phase == "backward":
                y = bn(x)
            before = _state(bn)
            setattr(dist, name, broken)
            try:
                if phase == "forward":
                    bn(x)
                else:
                    y.sum().backward()
            finally:
                setattr(dist, name, original)
    except SyncNormError as error:
        return {**_caught(error), "unchanged": _unchanged(before, bn),
                "no_grads": x.grad is None and bn.weight.grad is None and bn.bias.grad is None}
    return {"error": None}


@pytest.mark.parametrize("validate", [False, True], ids=["all-reduce", "validation-all-gather"])
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_failed_collective_leaves_parameters_and_running_stats_as_they_were(phase: str, validate: bool) -> None:
    for report in run_on_ranks(2, rank_collective_raises, phase, validate):
        assert report["error"] == "SyncNormError" and "injected fault" in report["message"], report
        assert "block.bn" in report["message"]
        assert report["unchanged"] and report["no_grads"]


# --------------------------------------------------------------------------- bad input across ranks

BAD_INPUTS = {
    # the core's bad inputs (tests/test_module.py) and a 6-D one, given to every rank at once
    "1-D": (torch.randn(8), ValueError, "expected input of 2 to 5 dimensions"),
    "6-D": (torch.randn(2, 3, 1, 1, 1, 2), ValueError, "expected input of 2 to 5 dimensions"),
    "wrong-channels": (torch.randn(4, 5, 2), ValueError, "expected 3 channels"),
    "integer": (torch.ones(4, 3, dtype=torch.long), TypeError, "expected a floating-point input"),
    "complex": (torch.ones(4, 3, dtype=torch.complex64), TypeError, "expected a floating-point input"),
    "not-a-tensor": ([[1.0, 2.0, 3.0]] * 4, TypeError, "expected a torch.Tensor"),
}


def rank_bad_input_everywhere(x: Any, validate: bool) -> dict[str, Any]:
    bn = _layer()
    before = _state(bn)
    COLLECTIVES.reset()
    try:
        with validation(validate):
            bn(x)
    except (ValueError, TypeError) as error:
        return {**_caught(error), "unchanged": _unchanged(before, bn), "calls": COLLECTIVES.names()}
    return {"error": None}


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validating"])
@pytest.mark.parametrize("bad", BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_bad_input_on_every_rank_raises_the_same_error_on_every_rank(bad: tuple[Any, type, str],
                                                                       validate: bool) -> None:
    x, error, text = bad
    for report in run_on_ranks(2, rank_bad_input_everywhere, x, validate):
        assert report["error"] == error.__name__ and text in report["message"], report
        assert "block.bn" in report["message"] and report["unchanged"]
        # Refused before the statistics all-reduce (the validation all-gather, if on, agreed).
        assert report["calls"] == (["all_gather"] if validate else [])


def rank_train_on_slices(steps: list[dict[str, Any]], validate: bool) -> list[dict[str, Any]]:
    bn = _layer(steps[0]["x"].shape[1])
    reports = []
    with validation(validate):
        for step in steps:
            x = my_slice(step["x"], step["sizes"]).requires_grad_()
            y = bn(x)
            (y * my_slice(step["dy"], step["sizes"])).sum().backward()
            reports.append({"y": y.detach(), "grad_x": x.grad, **_state(bn)})
    return reports


def _reference_of_steps(steps: list[dict[str, Any]], channels: int) -> list[dict[str, Any]]:
    layer = _layer(channels)
    reference = reference_module(2, channels, {}, layer.weight.detach(), layer.bias.detach())
    with torch.no_grad():
        reference.running_mean.copy_(layer.running_mean)
        reference.running_var.copy_(layer.running_var)
    return [reference_step(reference, step["x"], step["dy"]) for step in steps]


def _assert_matches(reports: list[list[dict[str, Any]]], expected: list[dict[str, Any]]) -> None:
    """Every step: outputs and input gradients over all ranks, and every rank's buffers (NaN where torch has NaN)."""
    for i, step in enumerate(expected):
        for key in ("y", "grad_x"):
            got = torch.cat([per_rank[i][key] for per_rank in reports]).double()
            torch.testing.assert_close(got, step[key], rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=lambda m, i=i, key=key: f"step {i} {key}: {m}")
        for per_rank in reports:
            for key in ("running_mean", "running_var"):
                got, want = per_rank[i][key].double(), step[key]
                # Non-finite exactly where torch's are. Where torch keeps +-inf (the running mean of a
                # channel holding an inf), syncnorm has NaN: its shifted sums meet inf - inf.
                assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (i, key, got, want)
                finite = torch.isfinite(want)
                torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5,
                                           msg=lambda m, i=i, key=key: f"step {i} {key}: {m}")
            assert int(per_rank[i]["num_batches_tracked"]) == int(step["num_batches_tracked"])


def test_nan_and_inf_on_one_rank_propagate_like_batchnorm_and_crash_nobody() -> None:
    generator = torch.Generator().manual_seed(7)
    sizes = [3, 4]
    x = torch.randn(sum(sizes), 3, generator=generator)
    x[1, 0] = float("nan")  # rank 0's part, channel 0
    x[5, 1] = float("inf")  # rank 1's part, channel 1; channel 2 stays finite
    dy = torch.randn(sum(sizes), 3, generator=generator)
    steps = [{"x": x, "dy": dy, "sizes": sizes}]
    reports = run_on_ranks(2, rank_train_on_slices, steps, False)
    expected = _reference_of_steps(steps, 3)
    assert torch.isnan(expected[0]["y"][:, :2]).all() and torch.isfinite(expected[0]["y"][:, 2]).all()
    _assert_matches(reports, expected)


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validating"])
def test_all_empty_global_batches_between_others_leave_running_stats_like_batchnorm(validate: bool) -> None:
    generator = torch.Generator().manual_seed(8)
    steps = []
    for sizes in ([0, 0, 0], [2, 0, 3], [0, 0, 0], [0, 2, 1]):
        x = torch.randn(sum(sizes), 4, generator=generator) * 3 - 1
        steps.append({"x": x, "dy": torch.randn(x.shape, generator=generator), "sizes": sizes})
    reports = run_on_ranks(3, rank_train_on_slices, steps, validate)
    expected = _reference_of_steps(steps, 4)
    assert all(r[0]["y"].shape == (0, 4) for r in reports)
    _assert_matches(reports, expected)


def rank_global_count_of_one(validate: bool) -> dict[str, Any]:
    bn = _layer()
    before = _state(bn)
    try:
        with validation(validate):
            bn(torch.randn(1 if rank() == 1 else 0, 3))
    except ValueError as error:
        return {**_caught(error), "unchanged": _unchanged(before, bn)}
    return {"error": None}


@pytest.mark.parametrize("validate", [False, True], ids=["plain", "validating"])
def test_one_value_per_channel_spread_over_ranks_raises_value_error_on_every_rank(validate: bool) -> None:
    for report in run_on_ranks(3, rank_global_count_of_one, validate):
        assert report["error"] == "ValueError", report
        assert "Expected more than 1 value per channel when training" in report["message"]
        assert report["unchanged"]


_PAIR_GROUPS: dict[str, Any] = {}


def rank_group_without_this_rank(x: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    if "01" not in _PAIR_GROUPS:  # new_group is collective: every rank builds it, once per pool
        _PAIR_GROUPS["01"] = dist.new_group([0, 1])
    bn = syncnorm.SyncBatchNorm(3, process_group=_PAIR_GROUPS["01"])
    before = _state(bn)
    try:
        y = bn(my_slice(x, sizes))
    except SyncNormError as error:
        return {**_caught(error), "unchanged": _unchanged(before, bn)}
    return {"error": None, "y": y}


def test_a_process_group_without_this_rank_is_refused_there_and_the_members_go_on() -> None:
    x = torch.randn(9, 3) * 2 + 1
    sizes = [4, 3, 2]
    members_0, members_1, outsider = run_on_ranks(3, rank_group_without_this_rank, x, sizes)
    assert outsider["error"] == "SyncNormError" and outsider["unchanged"]
    assert "not a member of the layer's process_group" in outsider["message"]
    assert "new_sync_groups" in outsider["message"]
    expected = reference_step(reference_module(2, 3, {}, None, None), x[:7], None)
    assert_close(torch.cat([members_0["y"], members_1["y"]]), expected["y"], torch.float32, "members' output")
