"""Time and peak memory of ``e2pa infer`` on one BraTS-size case (240 x 240 x 155, four modalities).

    python -m benchmarks.infer_case [--features 8 16 32] [--roi 64] [--maps weights] [--profile]

Writes a synthetic case (smooth noise inside an ellipsoidal "brain", zeros outside, as BraTS) and a
checkpoint of an untrained E2PANet of the given size into a temporary folder, then runs the same
``infer`` the command line runs and reports: wall time and CPU time (all threads; the honest number
on a shared machine), the CPU time of its stages (sliding window, the rest of predict_case: loading,
bringing outputs back to the file grid; writing), peak resident memory (ru_maxrss) and the bytes
written. Untrained weights cost the same time as trained ones. ``--profile`` adds the top
functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def write_case(folder: Path, shape=(240, 240, 155)) -> Path:
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2 / np.array([0.8, 0.9, 0.8])[:, None, None, None] ** 2).sum(0) < 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for name in ("flair", "t1", "t1ce", "t2"):
        volume = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3) * 300 + 600
        volume[~brain] = 0
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), folder / f"{folder.name}_{name}.nii.gz")
    return folder


def write_checkpoint(path: Path, features: list[int], roi: int) -> Path:
    from e2pa.engine.checkpoint import save_checkpoint
    from e2pa.model.registry import build_model, model_config

    modalities = ("flair", "t1", "t1ce", "t2")
    model = build_model({"in_channels": 4, "modalities": modalities, "features": tuple(features)})
    return save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "model_config": model_config(model),
            "modalities": list(modalities),
            "label_convention": "brats2021",
            "train_config": {"roi_size": [roi] * 3},
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--features", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--roi", type=int, default=64)
    parser.add_argument("--maps", choices=("none", "weights", "all"), default="weights")
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    import torch

    from e2pa.engine import inference

    work = Path(tempfile.mkdtemp(prefix="e2pa-infer-bench-"))
    case = write_case(work / "inputs" / "Bench_000")
    checkpoint = write_checkpoint(work / "model.pt", args.features, args.roi)
    stages: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                stages[name] = stages.get(name, 0.0) + time.process_time() - started

        return wrapper

    inference.sliding_window_outputs = timed("sliding window", inference.sliding_window_outputs)
    inference.save_prediction = timed("writing", inference.save_prediction)
    inference.predict_case = timed("predict_case", inference.predict_case)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    report = inference.infer(
        checkpoint,
        [case],
        work / "out",
        maps=args.maps,
        sw_batch_size=args.sw_batch_size,
        device="cpu",
        log=lambda _: None,
    )
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert not report.failures, report.failures
    written = sum(p.stat().st_size for p in (work / "out" / "Bench_000").iterdir())
    result = {
        "case": "240x240x155, 4 modalities",
        "features": args.features,
        "roi": args.roi,
        "maps": args.maps,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        **{f"cpu_{k}_s": round(v, 1) for k, v in stages.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "written_mb": round(written / 2**20, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=1))
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
