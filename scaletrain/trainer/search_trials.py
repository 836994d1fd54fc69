"""HF's hyperparameter-search surface of the Trainer, and the public methods a search backend (search/)
drives a trial through: the trainer is rebuilt from each trial's arguments and handed back as it was
built when the search ends. One trainer is rebound per trial rather than a new one built, as HF does:
the user's callback instances (and their W&B runs) follow the trials, and model_init runs once per
trial, inside train(), with the trial it expects."""
from __future__ import annotations

import gc
from typing import Any, Callable, Optional, Union

from ..strategies import build_strategy
from accelerate.utils.memory import clear_device_cache
from transformers.trainer_callback import TrainerControl



class SearchTrialMethods:
    """Mixed into Trainer: hyperparameter_search and the trial life cycle."""

    def hyperparameter_search(self, hp_space: Optional[Callable] = None, compute_objective: Optional[Callable] = None,
                              n_trials: int = 20, direction: Union[str, list[str]] = "minimize",
                              backend: Optional[str] = None, hp_name: Optional[Callable] = None, **kwargs):
        """HF's hyperparameter search on optuna, safe on several ranks: rank 0 owns the study and every
        rank trains the same trial (see scaletrain/search). kwargs reach optuna.create_study and
        Study.optimize; `sampler`/`pruner` may also be names ("tpe", "grid", "hyperband", ...)."""
        from ..search import hyperparameter_search

        return hyperparameter_search(self, hp_space, compute_objective, n_trials, direction, backend, hp_name,
                                     **kwargs)

    def begin_search_trial(self, args, trial: Any, reporter: Any, model_init: Callable) -> None:
        """Rebuild the trainer from one trial's arguments (a strategy on this process's environment, the
        middleware, checkpoints, a fresh state, no optimizer yet). `trial` is what model_init and callbacks
        see (HF's `trial`), `reporter.report(trainer, step, metrics)` receives each evaluation during
        training, and `model_init(trial)` builds the trial's model in train(). The state is reset first, so
        a trial whose arguments are refused reports no steps."""
        self.state = self._new_state()
        self.objective = None  # the trial's last objective, set by the reporter
        strategy = build_strategy(args, self.strategy.env)
        self._trial, self._search, self.model_init = trial, reporter, model_init
        self._rebind(strategy, args)

    def end_search_trial(self) -> None:
        """After a trial: its background checkpoint committed, its model, optimizer and data freed (as HF
        frees them), so the next trial starts with the memory the first one had."""
        self.checkpoints.finish_pending()
        self.model = self.model_wrapped = self.optimizer = self.lr_scheduler = None
        self.train_loader = None
        gc.collect()
        clear_device_cache()

    def end_search(self, args, strategy, model_init: Optional[Callable]) -> None:
        """The trainer as it was built: HF leaves the last trial's values in trainer.args; scaletrain gives
        back the arguments (and strategy) the trainer was constructed with."""
        self.model_init, self._trial, self._search = model_init, None, None
        self._rebind(strategy, args)

    def _rebind(self, strategy, args) -> None:
        """Everything rebuilt from `args` and `strategy`: a fresh state, and no optimizer yet (train() builds
        it for the model)."""
        main_input_name = self.input_tokens.main_input_name
        self._bind_args(args, strategy)
        self._bind_step_helpers(main_input_name)
        self.state, self.control = self._new_state(), TrainerControl()
        self.optimizer, self.lr_scheduler = None, None

    def _report_to_hp_search(self, trial, step: int, metrics: dict[str, float]) -> None:
        """During a search trial (HF's hook): the evaluation's objective goes to the study, and a
        trial the pruner stops ends here, on every rank at once (raises optuna.TrialPruned)."""
        if self._search is not None and trial is not None:
            self._search.report(self, step, metrics)
