"""TrainingArguments.parallelism_config: how the ranks divide the work, as HF types the field (accelerate's
ParallelismConfig), or a dict with its keys.

scaletrain.ParallelismConfig subclasses accelerate's class: every field and property accelerate defines
means the same here (sp_size: Ulysses sequence parallelism, which accelerate calls the "deepspeed"
sp_backend and which scaletrain runs under FSDP2 and DDP with its own attention function). It adds pp_size
(pipeline ranks, with pp_schedule, pp_microbatches, pp_stages_per_rank and pp_split_points), and it accepts
every layout scaletrain's strategies run, including dp_replicate x tp (DDP x tensor parallelism), which
accelerate's refuses, and -1 for one of the data-parallel sizes ("the rest of the ranks", as torchtitan writes it).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from accelerate.parallelism_config import ParallelismConfig as AccelerateParallelismConfig

from ..errors import NotSupportedError, did_you_mean

# size field -> accelerate launch's environment variable for it (`accelerate launch --parallelism_config_*`)
_SIZE_ENV = {"dp_replicate_size": "PARALLELISM_CONFIG_DP_REPLICATE_SIZE",
             "dp_shard_size": "PARALLELISM_CONFIG_DP_SHARD_SIZE", "tp_size": "PARALLELISM_CONFIG_TP_SIZE",
             "cp_size": "PARALLELISM_CONFIG_CP_SIZE", "sp_size": "PARALLELISM_CONFIG_SP_SIZE",
             "pp_size": "PARALLELISM_CONFIG_PP_SIZE"}
# what is not built yet, and what to use meanwhile
_NOT_YET = {
    "cp_size": "context parallelism (ring attention) is not built: use sp_size (Ulysses sequence parallelism), "
               "which splits long rows over ranks too",
}
_PIPELINE_FIELDS = ("pp_schedule", "pp_microbatches", "pp_stages_per_rank", "pp_split_points")
_SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")  # one stage per rank
_MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS")  # several stages per rank, loop order


@dataclass
class ParallelismConfig(AccelerateParallelismConfig):
    pp_size: Optional[int] = None  # pipeline ranks (each holds one part of the model)
    pp_schedule: str = "1F1B"  # torch.distributed.pipelining's schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS
    pp_microbatches: Optional[int] = None  # the step's accumulation micro-batches (None: gradient_accumulation_steps)
    pp_stages_per_rank: Optional[int] = None  # stages each pp rank holds (None: 2 for interleaved schedules, else 1)
    pp_split_points: Optional[list[int]] = None  # the first decoder layer of stages 2, 3, ... (None: balanced)

    def __post_init__(self) -> None:
        for name, variable in _SIZE_ENV.items():
            if getattr(self, name) is None:  # as accelerate: unset sizes come from `accelerate launch`, else 1
                setattr(self, name, int(os.environ.get(variable, "1")))
        self.cp_backend = self.cp_backend or "torch"
        # accelerate names its only backend after the library that runs Ulysses there; under FSDP and DDP
        # scaletrain's own Ulysses attention (sequence_parallel.py) runs the same algorithm
        self.sp_backend = self.sp_backend or os.environ.get("PARALLELISM_CONFIG_SP_BACKEND", "deepspeed")
        if self.sp_backend != "deepspeed":
            raise ValueError(f"parallelism_config sp_backend={self.sp_backend!r}: the one sequence-parallel "
                             "backend is 'deepspeed' (Ulysses), as in accelerate")
        free = [name for name in ("dp_replicate_size", "dp_shard_size") if getattr(self, name) == -1]
        if len(free) > 1:
            raise ValueError("parallelism_config: only one of dp_replicate_size and dp_shard_size may be -1 "
                             "(the ranks left over by the others)")
        for name in _SIZE_ENV:
            value = getattr(self, name)
            if not isinstance(value, int) or (value < 1 and name not in free):
                raise ValueError(f"parallelism_config {name}={value!r} must be an integer >= 1"
                                 + (" (or -1: the rest of the ranks)" if name.startswith("dp_") else ""))
        self._check_pipeline_fields()
        self._sizes = {"dp_replicate": self.dp_replicate_size, "dp_shard": self.dp_shard_size, "tp": self.tp_size,
                       "cp": self.cp_size, "sp": self.sp_size}

    def _check_pipeline_fields(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in _PIPELINE_FIELDS}
        if self.pp_size == 1:
            changed = [name for name, value in defaults.items() if getattr(self, name) != value]
            if changed:
                raise ValueError(f"parallelism_config {changed[0]}={getattr(self, changed[0])!r} without pipeline "
                                 "stages: set pp_size above 1, or drop it")
        names = {name.lower(): name for name in (*_SINGLE_STAGE_SCHEDULES, *_MULTI_STAGE_SCHEDULES)}
        if not isinstance(self.pp_schedule, str) or self.pp_schedule.lower() not in names:
            hint = did_you_mean(str(self.pp_schedule), list(names.values()))
            raise ValueError(f"parallelism_config pp_schedule={self.pp_schedule!r}{hint}: one of "
                             f"{', '.join(names.values())}")
        self.pp_schedule = names[self.pp_schedule.lower()]
        multi = self.pp_schedule in _MULTI_STAGE_SCHEDULES
        if self.pp_stages_per_rank is None:
            self.pp_stages_per_rank = 2 if multi else 1
        if not isinstance(self.pp_stages_per_rank, int) or self.pp_stages_per_rank < 1 \
                or (self.pp_stages_per_rank > 1) != multi:
            raise ValueError(f"parallelism_config pp_stages_per_rank={self.pp_stages_per_rank!r} with pp_schedule "
                             f"{self.pp_schedule!r}: {' and '.join(_SINGLE_STAGE_SCHEDULES)} run 1 stage per rank, "
                             f"{' and '.join(_MULTI_STAGE_SCHEDULES)} 2 or more")
        count = self.pp_microbatches
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"parallelism_config pp_microbatches={self.pp_microbatches!r} must be an integer >= 1 "
                             "(it is the step's gradient_accumulation_steps)")
        points = self.pp_split_points
        if points is not None and not (isinstance(points, (list, tuple)) and all(isinstance(p, int) for p in points)):
            raise ValueError(f"parallelism_config pp_split_points={points!r} must be a list of layer indices")

    @property
    def pp_stages(self) -> int:
        """Stages in the whole pipeline: pp ranks x stages per rank."""
        return self.pp_size * self.pp_stages_per_rank

    def schedule_fits(self, count: int) -> bool:
        """Whether torch's pp_schedule runs `count` micro-batches a step: 1F1B needs at least one per stage,
        Interleaved1F1B rounds of about pp_size that divide them evenly; the others run any count."""
        if self.pp_schedule == "1F1B":
            return count >= self.pp_stages
        if self.pp_schedule == "Interleaved1F1B":
            return count % max(1, count // self.pp_size) == 0
        return True

    def check_supported(self) -> None:
        """Refuse the dimensions scaletrain does not build yet, naming each."""
        for name, why in _NOT_YET.items():
            if getattr(self, name) > 1:
                raise NotSupportedError(f"parallelism_config {name}={getattr(self, name)}: {why}; use "
                                        "dp_replicate_size, dp_shard_size, tp_size, sp_size and pp_size")

    def sizes(self) -> dict[str, Any]:
        """Every dimension's size by field name, and the pipeline's settings when pp_size > 1 (how
        TrainingArguments.to_dict writes the config: it loads back as the same config)."""
        sizes = {name: getattr(self, name) for name in _SIZE_ENV}
        if self.pp_size > 1:
            sizes.update({name: getattr(self, name) for name in _PIPELINE_FIELDS})
        return sizes


_FIELDS = [f.name for f in dataclasses.fields(ParallelismConfig) if not f.name.endswith("_handler")]


def parallelism_settings(value: Any) -> Optional[ParallelismConfig]:
    """TrainingArguments.parallelism_config as scaletrain's class: None, a dict with the class's keys,
    accelerate's ParallelismConfig or scaletrain's."""
    if value is None or isinstance(value, ParallelismConfig):
        return value
    if isinstance(value, AccelerateParallelismConfig):
        value = {name: getattr(value, name) for name in _FIELDS if hasattr(value, name)}
    if not isinstance(value, dict):
        raise ValueError(f"parallelism_config={value!r} must be accelerate's or scaletrain's ParallelismConfig, or "
                         f"a mapping with keys {_FIELDS}")
    unknown = [key for key in value if key not in _FIELDS]
    if unknown:
        raise ValueError(f"parallelism_config has unknown key {unknown[0]!r}{did_you_mean(unknown[0], _FIELDS)} "
                         f"(keys: {', '.join(_FIELDS)})")
    return ParallelismConfig(**value)
