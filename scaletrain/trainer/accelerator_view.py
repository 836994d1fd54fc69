"""What overrides written against HF's Trainer use of `self.accelerator`, answered by the strategy."""
from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel


class AcceleratorView:
    """A narrow stand-in for accelerate.Accelerator: backward, unwrap_model and the process facts.
    Anything else is refused by name rather than guessed."""

    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False, **kwargs) -> None:
        if kwargs or scale_wrt_gas:
            extra = sorted(kwargs) + (["scale_wrt_gas=True"] if scale_wrt_gas else [])
            raise TypeError(f"accelerator.backward({', '.join(extra)}) is not supported: scaletrain scales the "
                            "loss for accumulation itself (num_items_in_batch); call backward(loss)")
        self._strategy.backward(loss)

    def unwrap_model(self, model: torch.nn.Module, keep_fp32_wrapper: bool = True) -> torch.nn.Module:
        """The strategy's unwrapping, then accelerate's (DataParallel, DDP, compiled wrappers) as HF's does."""
        return extract_model_from_parallel(self._strategy.unwrap(model), keep_fp32_wrapper=keep_fp32_wrapper)

    @property
    def num_processes(self) -> int:
        return self._strategy.world_size

    @property
    def process_index(self) -> int:
        return self._strategy.rank

    @property
    def is_main_process(self) -> bool:
        return self._strategy.is_main

    @property
    def is_local_main_process(self) -> bool:
        return self._strategy.is_local_main

    @property
    def device(self) -> torch.device:
        return self._strategy.device

    def __getattr__(self, name: str):
        raise AttributeError(f"Trainer.accelerator.{name} is not available in scaletrain: the strategy "
                             f"({self._strategy.name}) owns the backend; see Trainer.strategy")
