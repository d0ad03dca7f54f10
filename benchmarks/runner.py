"""One configuration (a case at one dtype on one device): gate, time, measure memory, derive.

Order matters: the float64 truth is computed and every provider gated first, then the truth is
dropped so that only the timed inputs are alive while times and memory are measured. Any failure
(out of memory, a compile error) is recorded against the provider or the configuration and the run
goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from . import memory
from .correctness import evaluate, judge, references
from .cost_models import tensor_bytes
from .records import ConfigResult, Gate, Memory, ProviderResult
from .registry import Case, Provider
from .timing import measure
from .workload import at_dtype, make_step, master_inputs


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def reason(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _attempt(what: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    """(result, None) or (None, reason): one failure never ends the run."""
    try:
        return what(), None
    except Exception as exc:  # noqa: BLE001 - OOM, compile and kernel errors are all recorded, not raised
        why = reason(exc)
    _release(device)
    return None, why


def _gate(
    case: Case,
    provider: Provider,
    fn,
    inputs: dict,
    upstream: list,
    dtype: torch.dtype,
    device: torch.device,
    truth,
    same,
) -> Gate:
    if not provider.gated:
        return Gate(ok=None)
    gate, why = _attempt(
        lambda: judge(evaluate(fn, inputs, case.grad_names, upstream), truth, same, dtype, case.output_names), device
    )
    return gate if why is None else Gate(ok=False, error=why)


def _time_and_memory(
    case: Case,
    provider: Provider,
    fn,
    inputs: dict,
    upstream: list,
    dtype: torch.dtype,
    device: torch.device,
    result: ProviderResult,
) -> None:
    for mode in case.modes:
        # the lambdas here run inside _attempt, before the loop moves on
        timing, why = _attempt(
            lambda: measure(make_step(fn, inputs, case.grad_names, upstream, mode), device),  # noqa: B023
            device,
        )
        if why is None:
            result.times[mode] = timing
        else:
            result.time_errors[mode] = why
    result.memory = _memory(case, provider, fn, inputs, upstream, dtype, device)


def _memory(
    case: Case, provider: Provider, fn, inputs: dict, upstream: list, dtype: torch.dtype, device: torch.device
) -> Memory:
    mem = Memory()
    saved, why = _attempt(lambda: memory.saved_for_backward(fn, inputs), device)
    if why is None:
        mem.saved_bytes, mem.saved_beyond_inputs_bytes = saved
    else:
        mem.errors.append(f"saved for backward: {why}")
    if device.type == "cuda":
        step = make_step(fn, inputs, case.grad_names, upstream, case.memory_mode)
        peak, why = _attempt(lambda: memory.cuda_peak(step, device), device)
        del step
        if why is None:
            mem.peak_bytes, mem.peak_delta_bytes = peak
            mem.method = (
                f"CUDA max_memory_allocated over one {case.memory_mode} step; delta over memory_allocated before it"
            )
    else:
        report, why = _attempt(lambda: memory.cpu_peak_in_subprocess(case.name, provider.name, dtype), device)
        if why is None:
            mem.peak_bytes, mem.peak_delta_bytes, mem.method = (
                report["peak_bytes"],
                report["peak_delta_bytes"],
                report["method"],
            )
    if why is not None:
        mem.errors.append(f"peak: {why}")
    return mem


def _derive(config: ConfigResult, copy_gbps: float) -> None:
    for result in config.providers.values():
        for mode, timing in result.times.items():
            seconds = timing.median_ms * 1e-3
            if mode in config.bytes:
                result.gbps[mode] = config.bytes[mode] / seconds / 1e9
                result.copy_fraction[mode] = result.gbps[mode] / copy_gbps
            if config.flops and mode in config.flops:
                result.tflops[mode] = config.flops[mode] / seconds / 1e12


def _speedups(config: ConfigResult, baselines: tuple[str, ...]) -> None:
    """Baseline time / provider time, only between providers whose numbers are verified."""
    for name, result in config.providers.items():
        if name in baselines or result.alias_of is not None or not result.verified:
            continue
        for base_name in baselines:
            base = config.providers.get(base_name)
            if base is None or not base.verified:
                continue
            ratios = {m: base.times[m].median_ms / t.median_ms for m, t in result.times.items() if m in base.times}
            if ratios:
                config.speedups[f"{name}/{base_name}"] = ratios


def run_config(case: Case, dtype: torch.dtype, device: torch.device, copy_gbps: float) -> ConfigResult:
    config = ConfigResult(
        case=case.name,
        op=case.op,
        kind=case.kind,
        params=dict(case.params),
        dtype=dtype_name(dtype),
        device=str(device),
    )
    prepared, why = _attempt(lambda: _prepare(case, dtype, device), device)
    if why is not None:
        config.error = f"inputs or float64 reference failed: {why}"
        _log(f"  {case.name} {config.dtype}: {config.error}")
        return config
    inputs, truth, same, upstream = prepared
    del prepared
    config.input_bytes = sum(tensor_bytes(v) for v in inputs.values() if isinstance(v, torch.Tensor))
    config.bytes = case.byte_model(inputs, same[0], case.grad_names) if case.byte_model else {}
    config.flops = case.flop_model(case.params) if case.flop_model else None
    upstream = [g.to(dtype) for g in upstream]

    # 1. build and gate each distinct implementation (providers with one identity run the same code)
    measured: list[tuple[Provider, Any, ProviderResult]] = []
    aliases: dict[str, str] = {}  # provider -> the provider measured for it
    by_identity: dict[str, str] = {}
    for provider in case.providers_for(device.type):
        built, why = _attempt(lambda: (provider.build(case), provider.identity(case, inputs)), device)  # noqa: B023
        if why is not None:
            config.providers[provider.name] = ProviderResult(name=provider.name, skipped=f"could not build: {why}")
            continue
        fn, identity = built
        if identity in by_identity:
            aliases[provider.name] = by_identity[identity]
            continue
        by_identity[identity] = provider.name
        result = ProviderResult(
            name=provider.name,
            identity=identity,
            gate=_gate(case, provider, fn, inputs, upstream, dtype, device, truth, same),
        )
        config.providers[provider.name] = result
        measured.append((provider, fn, result))
    del truth, same
    _release(device)

    # 2. time and measure memory with only the timed inputs alive
    for provider, fn, result in measured:
        started = time.monotonic()
        if result.gate.error is not None:
            result.skipped = f"raised during the correctness check: {result.gate.error}"
        else:
            _time_and_memory(case, provider, fn, inputs, upstream, dtype, device, result)
        _log(f"{_progress(config, result)} [{time.monotonic() - started:.0f} s]")
    del measured
    _release(device)
    for name, target in aliases.items():
        config.providers[name] = dataclasses.replace(
            copy.deepcopy(config.providers[target]), name=name, alias_of=target
        )
    order = [p.name for p in case.providers]
    config.providers = dict(sorted(config.providers.items(), key=lambda item: order.index(item[0])))
    _derive(config, copy_gbps)
    _speedups(config, case.baselines)
    return config


def _prepare(case: Case, dtype: torch.dtype, device: torch.device):
    masters = master_inputs(case, device)
    truth, same, upstream = references(case, masters, dtype)
    return at_dtype(masters, dtype, case.grad_names), truth, same, upstream


def _progress(config: ConfigResult, result: ProviderResult) -> str:
    parts = [{True: "gate ok", False: "GATE FAILED", None: "ungated"}[result.gate.ok]]
    parts += [f"{m} {t.median_ms:.3g} ms" for m, t in result.times.items()]
    parts += [f"{m} failed: {e}" for m, e in result.time_errors.items()]
    parts += [f"skipped: {result.skipped}"] if result.skipped else []
    return f"  {config.case} {config.dtype} {result.name} [{result.identity}]: {'; '.join(parts)}"
