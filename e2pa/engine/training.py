"""Training: a resumable, reproducible loop for E2PANet on BraTS-layout data.

Reproducibility is by construction: every random draw of the data pipeline (crops, flips, intensity
jitter), of the sample order and of modality dropout is a pure function of ``(seed, epoch, position)``.
So a run killed at any step and resumed from its last checkpoint continues exactly as if it had
never stopped — the checkpoint only has to say where it was (epoch, step within the epoch), and
holds the model, optimiser, scheduler, gradient scaler, cohort prototypes (in the loss's state
dict) and running statistics of the epoch.

Run folder (self-contained: it can be moved or copied, and resumed from any working directory)::

    RUN/config.json              what was asked; ``data`` as an absolute path, ``out`` as "." (the folder itself)
    RUN/split.json               the case ids trained on and validated on (``e2pa evaluate --split validation``)
    RUN/checkpoints/last.pt      latest complete state (atomic, checksummed; every --checkpoint-every steps
                                 and each epoch); the one it replaced stays as last.previous.pt
    RUN/checkpoints/best.pt      best validation mean Dice (best.previous.pt: the one before)
    RUN/metrics.csv              one row per epoch
    RUN/training_curve.png
    RUN/train.log                the run's messages (written when run from the command line, e2pa.log)
    RUN/.e2pa.lock               held (flock) by the process training in the folder

Nothing is written into the folder before the whole data set has been validated. A start that
stops before its first checkpoint (bad data, full disk, a kill during epoch 1) leaves only files
of its own; starting again (with or without ``--resume``) reuses the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.labels import REGIONS
from ..io import FolderLock, atomic_save_figure, atomic_write_json, atomic_write_text, csv_text, is_lock_file
from ..model.losses import E2PALoss
from ..model.registry import build_model, model_config
from ..model.targets import regions_to_classes
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    previous_path,
    restore_rng_state,
    save_checkpoint,
)
from .device import resolve_device
from .inference import SW_OVERLAP, LoadedModel
from .metrics import dice_score

NONFINITE_POLICIES = ("skip", "stop")
MAX_CONSECUTIVE_SKIPS = 20
# A training step never reads a device value on the host (no stream synchronisation): the loss terms
# and the non-finite flags stay on the device and the host looks at them every HOST_READ_EVERY steps,
# before each checkpoint and at the end of an epoch (the progress bar's numbers, skipped-step
# warnings and the stop policy act then).
HOST_READ_EVERY = 10
_log = logging.getLogger(__name__)
RESUME_SOURCES = ("last", "previous", "best")
# What a start leaves in a run folder before its first checkpoint: a new start may replace these.
OWN_FILES = ("config.json", "split.json", "train.log")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, nothing to train on, a run folder in the way); says why."""


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on. ``model`` holds E2PANet keyword arguments (``in_channels`` and
    ``modalities`` come from the data); ``loss`` holds E2PALoss weights."""

    data: str
    out: str
    epochs: int = 100
    batch_size: int = 2
    roi_size: tuple[int, ...] = (96, 96, 96)
    lr: float = 3e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 0
    grad_clip: float = 12.0
    modality_dropout: float = 0.5
    validation_fraction: float = 0.2
    val_every: int = 1
    sw_batch_size: int = 2
    sw_overlap: float = SW_OVERLAP
    checkpoint_every: int = 0
    max_steps_per_epoch: int = 0
    time_budget_s: float = 0.0
    num_workers: int = 0
    amp: str = "auto"
    seed: int = 0
    device: str = "auto"
    nonfinite: str = "skip"
    progress: bool = True
    labels: str = "auto"
    allow_outside_paths: bool = False
    model: dict = dataclasses.field(default_factory=dict)
    loss: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(v) for v in self.roi_size)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {self.nonfinite!r}")
        if self.amp not in ("auto", "on", "off"):
            raise ValueError(f"amp must be auto, on or off; got {self.amp!r}")
        for name in ("epochs", "batch_size", "val_every", "sw_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if not 0 <= self.modality_dropout <= 1:
            raise ValueError(f"modality_dropout must be in [0, 1]; got {self.modality_dropout!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1); got {self.validation_fraction!r}")
        if not 0 <= self.sw_overlap < 1:
            raise ValueError(f"sw_overlap must be in [0, 1); got {self.sw_overlap!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number; got {self.lr!r}")
        for name in ("checkpoint_every", "max_steps_per_epoch", "num_workers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def run_folder_json(self) -> dict:
        """What config.json holds: the data as an absolute path, ``out`` as "." (the run folder is
        wherever config.json is), so a moved or copied run resumes in place."""
        saved = self.to_json()
        saved["data"], saved["out"] = os.path.abspath(self.data), "."
        return saved


# ------------------------------------------------------------------------------------------------
# determinism helpers
# ------------------------------------------------------------------------------------------------
def derived_seed(*parts: int | str) -> int:
    """A 31-bit seed that is a pure function of ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class EpochSeededDataset(torch.utils.data.Dataset):
    """A MONAI transform chain over case dicts whose randomness depends only on (seed, epoch, index),
    also inside DataLoader workers — what makes a resumed run identical to an uninterrupted one."""

    def __init__(self, cases: Sequence[dict], transform: Any, seed: int):
        self.cases, self.transform, self.seed, self.epoch = list(cases), transform, seed, 0

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        self.transform.set_random_state(seed=derived_seed(self.seed, "data", self.epoch, index))
        return self.transform(dict(self.cases[index]))


def epoch_order(num_cases: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's sample order for ``epoch``: a seeded permutation, padded to a multiple of the
    world size (as DistributedSampler does), strided over ranks."""
    order = np.random.default_rng(derived_seed(seed, "order", epoch)).permutation(num_cases).tolist()
    padded = order + order[: (-len(order)) % world_size]
    return padded[rank::world_size]


def modality_dropout_mask(batch: int, num_modalities: int, probability: float, seed: int) -> torch.Tensor:
    """``[B, M]`` bool. With ``probability`` a sample keeps a uniformly drawn non-empty subset of its
    modalities (the 2^M − 1 subsets, as RFNet/mmFormer train), otherwise all of them."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, num_modalities), dtype=bool)
    for b in range(batch):
        if rng.random() < probability:
            subset = int(rng.integers(1, 2**num_modalities))
            mask[b] = [(subset >> m) & 1 for m in range(num_modalities)]
    return torch.from_numpy(mask)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on GPUs that have it (no loss scaling needed), else fp16; none on CPU
    unless asked ("on" uses bf16 there)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (NCCL needs CUDA)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> Distributed:
        """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, Gloo on CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            device=device,
        )

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean over ranks of one number per rank."""
        return self.sum([value])[0] / self.world_size

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over ranks (float64; every rank passes the same number of values)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs (or resumes) it. See the module docstring."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, resume_from: str = "last"):
        from monai.data import DataLoader, list_data_collate

        from ..data import discover, train_transforms, val_transforms
        from ..data.validation import validate_cases

        if resume_from not in RESUME_SOURCES:
            raise ValueError(f"resume_from must be one of {RESUME_SOURCES}; got {resume_from!r}")
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock = FolderLock(self.run_dir, "e2pa train")
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.dist = Distributed.from_environment(self.device)
        resume_path = self._check_run_folder(resume, resume_from)  # reads only: nothing written yet

        cohort = discover(cfg.data, label_convention=cfg.labels, allow_outside_paths=cfg.allow_outside_paths)
        cohort = self._split(cohort, resume_path is not None)
        if not cohort.training:
            raise TrainingError(f"{cfg.data}: no labelled training cases found")
        validate_cases(
            cohort.training + cohort.validation,
            modalities=cohort.modalities,
            label_convention=cohort.label_convention,
            progress=cfg.progress and self.dist.is_main,
            what=str(cfg.data),
        )
        self.cohort = cohort
        self.modalities = tuple(cohort.modalities)
        torch.manual_seed(derived_seed(cfg.seed, "init"))
        self.model = build_model({"in_channels": len(self.modalities), "modalities": self.modalities, **cfg.model})
        self.model.to(self.device)
        # baselines have no energies: their objective is the task loss alone
        energy_terms = (
            cfg.loss
            if model_config(self.model)["architecture"] == "e2pa"
            else dict(lambda_ds=0.0, lambda_ehf=0.0, lambda_esa=0.0)
        )
        self.loss_fn = E2PALoss(num_levels=len(self.model.features), **energy_terms).to(self.device)
        self.net = self.model
        if self.dist.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        # fused AdamW (CUDA and CPU kernels) skips a step on the device when handed a found_inf flag,
        # as GradScaler drives it: the non-finite guard needs no host read (see _optimizer_step)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self.device.type in ("cuda", "cpu")
        )

        convention = cohort.label_convention
        self.train_set = EpochSeededDataset(
            cohort.training,
            train_transforms(cfg.roi_size, label_convention=convention, modalities=self.modalities),
            cfg.seed,
        )
        self.val_transform = val_transforms(label_convention=convention, modalities=self.modalities)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_set) / self.dist.world_size) / cfg.batch_size)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _warmup_cosine(step, cfg.warmup_steps, total_steps)
        )
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self._loader_factory = lambda indices: DataLoader(
            torch.utils.data.Subset(self.train_set, indices),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            collate_fn=list_data_collate,
        )

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_dice, self.history, self.running = -1.0, [], _Running()
        self.nonfinite = _NonFiniteSteps(self.device)
        self.started = time.perf_counter()
        self._claim_run_folder(resume_path is not None)
        if resume_path is not None:
            try:
                self._resume(resume_path)
            except BaseException:
                self.lock.release()
                raise

    # ---------------------------------------------------------------------------------------------
    def _check_run_folder(self, resume: bool, resume_from: str) -> Path | None:
        """Before anything is read or written: may this run use the folder? Returns the checkpoint to
        resume from (None: start from the beginning). Reads only."""
        last = self.ckpt_dir / "last.pt"
        if resume:
            if not (self.run_dir / "config.json").is_file() and not last.is_file():
                raise TrainingError(
                    f"--resume: {self.run_dir} is not a run folder (no config.json, no "
                    f"checkpoints/last.pt); nothing to resume"
                )
            source = {"last": last, "previous": previous_path(last), "best": self.ckpt_dir / "best.pt"}[resume_from]
            if source.is_file():
                return source
            if resume_from == "last" and not any(self.ckpt_dir.glob("*.pt")):
                _log.warning(
                    "%s has no checkpoint yet (the run stopped before its first one): starting it from the beginning",
                    self.run_dir,
                )
                return None
            raise TrainingError(
                f"--resume: {source} does not exist (checkpoints in {self.ckpt_dir}: "
                f"{', '.join(sorted(p.name for p in self.ckpt_dir.glob('*.pt'))) or 'none'})"
            )
        if last.is_file():
            raise TrainingError(
                f"{self.run_dir} already holds a run (checkpoints/last.pt); pass --resume to continue "
                f"it or choose another --out (nothing is overwritten)"
            )
        foreign = self._foreign_files()
        if foreign:
            raise TrainingError(
                f"{self.run_dir} already holds files that are not from an e2pa run that stopped "
                f"before its first checkpoint (e.g. {foreign[0]}); choose another --out or pass "
                f"--resume to continue a run there (nothing is overwritten)"
            )
        return None

    def _foreign_files(self) -> list[str]:
        """Files in the run folder that a start which stopped before its first checkpoint would not
        have left (its config, split, log, lock, hidden partial files, empty checkpoints folder)."""
        if not self.run_dir.is_dir():
            return []
        foreign = []
        for path in sorted(self.run_dir.rglob("*")):
            relative = path.relative_to(self.run_dir)
            own = (
                is_lock_file(path)
                or str(relative) in OWN_FILES
                or path.name.endswith(".partial")
                or path.name.startswith(".")
                and relative.parts[0] == "checkpoints"
                or (path.is_dir() and relative.parts == ("checkpoints",))
            )
            if not own:
                foreign.append(str(path))
        return foreign

    def _split(self, cohort, resumed: bool):
        """This run's training / validation cases: the split recorded in the run folder when
        resuming, else the data set's own validation list or a seeded split of its training cases."""
        recorded = self.run_dir / "split.json"
        if resumed and recorded.is_file():
            try:
                split = json.loads(recorded.read_text())
                by_id = {c["case"]: c for c in cohort.training + cohort.validation}
                missing = [i for i in split["training"] + split["validation"] if i not in by_id]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise TrainingError(f"{recorded} is not a readable split record ({error})") from None
            if missing:
                raise TrainingError(
                    f"{recorded}: {len(missing)} case(s) this run trained or validated on are not "
                    f"in {self.cfg.data} (e.g. {missing[0]}); pass the run's data with --data"
                )
            return dataclasses.replace(
                cohort,
                training=[by_id[i] for i in split["training"]],
                validation=[by_id[i] for i in split["validation"]],
            )
        if not cohort.validation and self.cfg.validation_fraction > 0:
            cohort = cohort.split(self.cfg.validation_fraction, seed=self.cfg.seed)
        return cohort

    def split_record(self) -> dict:
        return {
            "training": [c["case"] for c in self.cohort.training],
            "validation": [c["case"] for c in self.cohort.validation],
            "data": os.path.abspath(self.cfg.data),
            "seed": self.cfg.seed,
            "validation_fraction": self.cfg.validation_fraction,
        }

    def _claim_run_folder(self, resumed: bool) -> None:
        """Lock the folder (rank 0), then write config.json and split.json on a new start. Runs after
        the data was validated, so a bad data set leaves no trace."""
        self.dist.barrier()  # every rank has looked before rank 0 writes
        if self.dist.is_main:
            self.lock.acquire()
            if not resumed:
                self._check_run_folder(False, "last")  # again, under the lock: another start may have won
                for leftover in self.ckpt_dir.glob(".*"):  # partial files of a killed start
                    leftover.unlink(missing_ok=True)
                atomic_write_json(self.run_dir / "config.json", self.cfg.run_folder_json())
            if not (self.run_dir / "split.json").is_file() or not resumed:
                atomic_write_json(self.run_dir / "split.json", self.split_record())
        self.dist.barrier()

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        saved_model = state.get("model_config")
        if saved_model != model_config(self.model):
            raise CheckpointError(
                f"{path}: the checkpoint's model configuration differs "
                f"from this run's ({saved_model} vs {model_config(self.model)})"
            )
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:  # same samples consumed, counted in this run's steps
            self.step_in_epoch = self.step_in_epoch * saved_world // self.dist.world_size
        self.global_step, self.best_dice = int(state["global_step"]), float(state["best_dice"])
        self.history = list(state["history"])
        self.running = _Running.from_state(state["running"])
        restore_rng_state(state["rng"])

    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "model_config": model_config(self.model),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_dice": self.best_dice,
            "history": self.history,
            "running": self.running.state(),
            "rng": capture_rng_state(),
            "train_config": self.cfg.to_json(),
            "world_size": self.dist.world_size,
            "modalities": list(self.modalities),
            "label_convention": self.cohort.label_convention.name,
            "label_convention_spec": self.cohort.label_convention.to_dict(),
            "split": self.split_record(),
        }

    def _save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / name, self._state(), keep_previous=True)

    # ---------------------------------------------------------------------------------------------
    def run(self, stop_after_steps: int | None = None) -> dict:
        """Train to ``cfg.epochs`` (or until ``cfg.time_budget_s`` runs out, finishing with a
        validation); returns the final metrics row. ``stop_after_steps`` halts (with ``last.pt``
        saved) once that many steps are done in total, as an interruption would. The run folder is
        locked while this runs (released on return, so a halted trainer can be resumed)."""
        if self.dist.is_main:
            self.lock.acquire()
        try:
            return self._run(stop_after_steps)
        finally:
            self.lock.release()

    def _run(self, stop_after_steps: int | None) -> dict:
        cfg = self.cfg
        start = f"resuming at epoch {self.epoch + 1} step {self.step_in_epoch} of" if self.global_step else "training"
        _log.info(
            "%s %s on %s (%d process(es)): %d training / %d validation case(s), %.2f M parameters, "
            "%d step(s) per epoch, run folder %s",
            start,
            model_config(self.model)["architecture"],
            self.device,
            self.dist.world_size,
            len(self.cohort.training),
            len(self.cohort.validation),
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            self.steps_per_epoch,
            self.run_dir,
        )
        while self.epoch < cfg.epochs and not self._out_of_time():
            if not self._train_epoch(stop_after_steps):
                self._save("last.pt")
                return {}
            row = {
                "epoch": self.epoch + 1,
                "step": self.global_step,
                "lr": self.scheduler.get_last_lr()[0],
                **self.running.means(self.dist),
            }
            if (self.epoch + 1) % cfg.val_every == 0 or self.epoch + 1 == cfg.epochs or self._out_of_time():
                row.update(self.validate())
            self.history.append(row)
            _log.info(
                "epoch %d/%d: %s",
                row["epoch"],
                cfg.epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
            )
            improved = row.get("val_dice_mean", -1.0) > self.best_dice
            if improved:
                self.best_dice = row["val_dice_mean"]
            self.epoch, self.step_in_epoch, self.running = self.epoch + 1, 0, _Running()
            self._save("last.pt")
            if improved:
                self._save("best.pt")
            if self.dist.is_main:
                write_metrics(self.run_dir, self.history)
            self.dist.barrier()
        return self.history[-1] if self.history else {}

    def _out_of_time(self) -> bool:
        """The time budget is spent (same answer on every rank: rank 0's clock decides)."""
        if not self.cfg.time_budget_s:
            return False
        spent = time.perf_counter() - self.started >= self.cfg.time_budget_s
        if self.dist.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([int(spent)], device=self.dist.device)
            dist.broadcast(flag, src=0)
            spent = bool(flag.item())
        return spent

    def _train_epoch(self, stop_after_steps: int | None) -> bool:
        """Run the rest of this epoch; False when halted early by ``stop_after_steps``."""
        cfg = self.cfg
        self.train_set.epoch = self.epoch
        self.model.train()
        order = epoch_order(len(self.train_set), cfg.seed, self.epoch, self.dist.rank, self.dist.world_size)
        order = order[: self.steps_per_epoch * cfg.batch_size]
        remaining = order[self.step_in_epoch * cfg.batch_size :]  # resume mid-epoch where it stopped
        batches = iter(self._loader_factory(remaining))
        bar = _progress(
            self.steps_per_epoch,
            self.step_in_epoch,
            f"epoch {self.epoch + 1}/{cfg.epochs}",
            enabled=cfg.progress and self.dist.is_main,
        )
        while self.step_in_epoch < self.steps_per_epoch:
            if stop_after_steps is not None and self.global_step >= stop_after_steps:
                bar.close()
                self._read_device_state()
                return False
            if self._out_of_time():
                break
            batch = next(batches)
            started = time.perf_counter()
            step = self._train_step(batch)
            self.nonfinite.record(step, self.global_step, (self.epoch, self.step_in_epoch))
            self.running.add(step.terms, step.finite, batch["image"].shape[0], time.perf_counter() - started)
            self.step_in_epoch += 1
            self.global_step += 1
            bar.update(1)
            checkpoint = (
                cfg.checkpoint_every
                and self.global_step % cfg.checkpoint_every == 0
                and self.step_in_epoch < self.steps_per_epoch
            )
            if checkpoint or self.global_step % HOST_READ_EVERY == 0:
                self._read_device_state()
                bar.set_postfix_str(self.running.postfix())
            if checkpoint:
                self._save("last.pt")
        bar.close()
        self._read_device_state()
        return True

    def _read_device_state(self) -> None:
        """The host's look at what the steps left on the device (one synchronisation): skipped steps and
        loss-scale overflows are counted and reported, and the non-finite policy acts (see
        :class:`_NonFiniteSteps`)."""
        self.nonfinite.check(
            self.running,
            self.cfg.nonfinite,
            self.ckpt_dir / "last.pt",
            self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
        )

    def _train_step(self, batch: dict) -> _Step:
        """One optimisation step that reads no device value on the host (no stream synchronisation: the
        GPU never waits for Python, and the step can be captured in a CUDA graph). A non-finite loss or
        gradient norm leaves weights and optimiser state untouched, decided on the device; under fp16 a
        non-finite gradient while the loss scale is > 1 is GradScaler's routine overflow (skipped too,
        the scale halved, counted apart). The masks (drawn non-empty) and labels (nested regions built
        by the data transforms) are valid by construction, so the network and the loss skip their value
        checks (``validate=False``)."""
        cfg = self.cfg
        image = _plain_tensor(batch["image"]).to(self.device, non_blocking=True)
        regions = _plain_tensor(batch["label"]).to(self.device, non_blocking=True)
        mask = modality_dropout_mask(
            image.shape[0],
            len(self.modalities),
            cfg.modality_dropout,
            derived_seed(cfg.seed, "dropout", self.epoch, self.step_in_epoch, self.dist.rank),
        ).to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            logits, energies = self.net(
                image,
                modality_mask=mask,
                target=regions_to_classes(regions, validate=False),
                return_energies=True,
                validate=False,
            )
            total, terms = self.loss_fn(logits, regions, energies, validate=False)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        finite_loss = torch.isfinite(total)
        finite = finite_loss & torch.isfinite(grad_norm)
        if self.scaler.is_enabled():  # the scale before update(), a device tensor (get_scale() would sync)
            overflow = finite_loss & ~finite & (self.scaler._get_scale_async() > 1.0)
        else:
            overflow = torch.zeros_like(finite)
        self._optimizer_step(finite)
        self.scaler.update()  # fp16: unscale_ saw any inf/NaN, so the scale is halved (else a no-op)
        # the schedule follows the step count, skipped steps included (as with torch.amp's GradScaler)
        self.scheduler.step()
        return _Step(terms, total.detach(), grad_norm.detach(), finite, overflow)

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """``optimizer.step()`` where ``finite`` (a device bool) holds; otherwise nothing changes (weights,
        moments, step counts). Fused optimisers take the flag as ``found_inf`` and skip on the device, the
        way GradScaler drives them; any other optimiser (one a user swapped in) costs one host read."""
        if self.optimizer.defaults.get("fused"):
            self.optimizer.grad_scale = None  # gradients are unscaled already (scaler.unscale_)
            self.optimizer.found_inf = (~finite).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif bool(finite):
            self.optimizer.step()

    def validate(self) -> dict:
        """Mean Dice per region over all validation cases (whole volumes, sliding window, all modalities).

        Cases are spread over the ranks; each rank sums its Dice and counts its cases, and the sums
        and counts are added over ranks, so the result is the mean over the cases, whatever their
        number per rank (a rank may have none). Prediction and scoring are those of ``e2pa evaluate``
        (:func:`e2pa.engine.evaluation.predict_regions`, overlap ``sw_overlap``)."""
        if not self.cohort.validation:
            return {}
        from .evaluation import predict_regions, prepare_case

        self.model.eval()
        loaded = LoadedModel(
            model=self.model,
            modalities=self.modalities,
            label_convention=self.cohort.label_convention,
            roi_size=self.cfg.roi_size,
            source=self.run_dir,
        )
        sums, count = np.zeros(len(REGIONS)), 0
        for case in self.cohort.validation[self.dist.rank :: self.dist.world_size]:
            image, truth, _ = prepare_case(self.val_transform, case)
            pred = predict_regions(
                loaded, image, device=self.device, sw_batch_size=self.cfg.sw_batch_size, overlap=self.cfg.sw_overlap
            )
            sums += [dice_score(pred[i], truth[i]) for i in range(len(REGIONS))]
            count += 1
        self.model.train()
        *totals, cases = self.dist.sum([*sums, count])
        out = {f"val_dice_{r}": totals[i] / cases for i, r in enumerate(REGIONS)}
        out["val_dice_mean"] = float(np.mean([out[f"val_dice_{r}"] for r in REGIONS]))
        return out


class _Running:
    """Sums of the loss terms over the epoch so far (kept in checkpoints for exact mid-epoch resume).

    The sums and the count of finite steps accumulate on the device, in float64 (the float32 terms are
    exact there: the sums equal the host float sums of earlier versions); ``means``, ``postfix`` and
    ``state`` read them (host reads, done lazily). ``skipped`` and ``overflows`` are host counts that
    :class:`_NonFiniteSteps` keeps up to date."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps: torch.Tensor | int = 0
        self.samples = 0
        self.seconds = 0.0
        self.skipped = 0
        self.overflows = 0

    def add(self, terms: dict[str, torch.Tensor], finite: torch.Tensor, samples: int, seconds: float) -> None:
        """Add a step's terms where ``finite`` (a skipped step's are left out); no host read."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + torch.where(finite, v.detach().double(), 0.0)
        self.steps = self.steps + finite.long()
        self.samples += samples
        self.seconds += seconds

    def _host(self) -> tuple[dict[str, float], int]:
        return {k: float(v) for k, v in self.sums.items()}, int(self.steps)

    def means(self, dist: Distributed) -> dict:
        sums, steps = self._host()
        out = {f"train_{k}": dist.mean(v / max(1, steps)) for k, v in sorted(sums.items())}
        out["samples_per_s"] = self.samples / self.seconds if self.seconds else 0.0
        out["skipped_steps"] = self.skipped
        out["overflow_steps"] = self.overflows
        return out

    def postfix(self) -> str:
        sums, steps = self._host()
        parts = [f"{k}={v / max(1, steps):.3f}" for k, v in sums.items()]
        if self.seconds:
            parts.append(f"{self.samples / self.seconds:.2f} samples/s")
        return " ".join(parts)

    def state(self) -> dict:
        sums, steps = self._host()
        return {
            "sums": sums,
            "steps": steps,
            "samples": self.samples,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "overflows": self.overflows,
        }

    @classmethod
    def from_state(cls, state: dict) -> _Running:
        r = cls()
        r.sums, r.steps, r.samples = dict(state["sums"]), int(state["steps"]), int(state["samples"])
        r.seconds, r.skipped = float(state["seconds"]), int(state["skipped"])
        r.overflows = int(state.get("overflows", 0))  # checkpoints written before it was counted
        return r


@dataclasses.dataclass
class _Step:
    """What one training step leaves on the device: the detached loss terms, total loss and gradient
    norm, whether the update was applied (``finite``) and whether it was an fp16 loss-scale overflow."""

    terms: dict[str, torch.Tensor]
    total: torch.Tensor
    grad_norm: torch.Tensor
    finite: torch.Tensor
    overflow: torch.Tensor


class _NonFiniteSteps:
    """Skipped steps tracked on the device and read by the host lazily.

    ``record`` (every step, no host read) counts non-finite steps (overflows apart), the longest run of
    consecutive ones and the last one's loss and gradient norm; ``check`` (the host read: every
    ``HOST_READ_EVERY`` steps, before a checkpoint, at the end of an epoch) adds the counts to the
    epoch's :class:`_Running`, logs them, and raises :class:`TrainingError` under ``--nonfinite stop``
    or after ``MAX_CONSECUTIVE_SKIPS`` in a row. A skipped step never updated the weights, whenever the
    host notices it; an fp16 loss-scale overflow never stops a run."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._run = torch.zeros((), dtype=torch.int64, device=device)  # current run of non-finite steps
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=self._device)
        self._count, self._overflows, self._longest = zero, zero, self._run.clone()
        self._last = torch.full((), -1, dtype=torch.int64, device=self._device)  # global step of the last one
        self._last_values = torch.zeros(2, dtype=torch.float64, device=self._device)  # its loss, gradient norm
        self._where: dict[int, tuple[int, int]] = {}  # global step -> (epoch, step in epoch), this window

    def record(self, step: _Step, global_step: int, where: tuple[int, int]) -> None:
        bad = ~step.finite & ~step.overflow
        self._count = self._count + bad.long()
        self._overflows = self._overflows + step.overflow.long()
        self._run = torch.where(step.finite, 0, self._run + bad.long())
        self._longest = torch.maximum(self._longest, self._run)
        self._last = torch.where(bad, global_step, self._last)
        self._last_values = torch.where(
            bad, torch.stack([step.total.double(), step.grad_norm.double()]), self._last_values
        )
        self._where[global_step] = where

    def check(self, running: _Running, policy: str, last_checkpoint, scale: float) -> None:
        count, overflows, longest = int(self._count), int(self._overflows), int(self._longest)
        last, (loss, norm) = int(self._last), self._last_values.tolist()
        where = self._where
        self._reset()
        running.skipped += count
        running.overflows += overflows
        if overflows:
            _log.info(
                "GradScaler skipped %d step(s) whose fp16 gradients overflowed; continuing at loss scale %g",
                overflows,
                scale,
            )
        if not count:
            return
        epoch, step = where[last]
        why = (
            f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        ) + f" at epoch {epoch + 1}, step {step + 1}"
        if policy == "stop" or longest >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"training stopped: {why}; the weights were not updated with it and "
                f"{last_checkpoint} holds the last good state ({longest} non-finite step(s) in a "
                f"row; policy --nonfinite {policy})"
            )
        _log.warning("skipped %d non-finite step(s) (weights not updated); the last: %s", count, why)


def _plain_tensor(value) -> torch.Tensor:
    """A batch entry as a plain tensor: MONAI's MetaTensor runs metadata bookkeeping (host reads of its
    batched metadata) on every op, which a training step does not need."""
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv (one row per epoch) and training_curve.png, both atomic."""
    columns = sorted({k for row in history for k in row}, key=lambda k: (k not in ("epoch", "step"), k))
    atomic_write_text(run_dir / "metrics.csv", csv_text(history, columns))
    plot_training_curve(history, run_dir / "training_curve.png")


def plot_training_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in sorted(k for k in history[-1] if k.startswith("train_")):
        ax_loss.plot(epochs, [row.get(key, np.nan) for row in history], label=key.removeprefix("train_"))
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="training loss terms")
    if ax_loss.lines:  # every step of the run may have been skipped
        ax_loss.legend(fontsize=7)
    for key in [f"val_dice_{r}" for r in REGIONS] + ["val_dice_mean"]:
        ax_dice.plot(epochs, [row.get(key, np.nan) for row in history], marker=".", label=key.removeprefix("val_dice_"))
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    ax_dice.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def train(cfg: TrainConfig, *, resume: bool = False, resume_from: str = "last") -> dict:
    """Train (or resume) a run; returns the last metrics row."""
    trainer = Trainer(cfg, resume=resume, resume_from=resume_from)
    try:
        return trainer.run()
    finally:
        trainer.lock.release()
