"""TrainingArguments.parallelism_config: how the ranks divide the work, as HF types the field (accelerate's
ParallelismConfig), or a dict with its keys.

scaletrain.ParallelismConfig subclasses accelerate's class: every field and property accelerate defines
means the same here (sp_size: Ulysses sequence parallelism, which accelerate calls the "deepspeed"
sp_backend and which scaletrain runs under FSDP2 and DDP with its own attention function). It adds pp_size
(pipeline stages), and it accepts every layout scaletrain's
strategies run, including dp_replicate x tp (DDP x tensor parallelism), which accelerate's refuses, and
-1 for one of the data-parallel sizes ("the rest of the ranks", as torchtitan writes it).
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
    "pp_size": "pipeline parallelism is not supported yet",
}


@dataclass
class ParallelismConfig(AccelerateParallelismConfig):
    pp_size: Optional[int] = None  # pipeline stages

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
        self._sizes = {"dp_replicate": self.dp_replicate_size, "dp_shard": self.dp_shard_size, "tp": self.tp_size,
                       "cp": self.cp_size, "sp": self.sp_size}

    def check_supported(self) -> None:
        """Refuse the dimensions scaletrain does not build yet, naming each."""
        for name, why in _NOT_YET.items():
            if getattr(self, name) > 1:
                raise NotSupportedError(f"parallelism_config {name}={getattr(self, name)}: {why}; use "
                                        "dp_replicate_size, dp_shard_size, tp_size and sp_size")

    def sizes(self) -> dict[str, int]:
        """Every dimension's size, by field name (how TrainingArguments.to_dict writes the config)."""
        return {name: getattr(self, name) for name in _SIZE_ENV}


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
