"""adaptune: parameter-efficient fine-tuning of frozen BERT- and GPT-style models.

One training flow (`run`) behind recipes, this Python API and the benchmark runner.
"""

from adaptune.api import Predictor, build_base, finetune, finetune_config, load
from adaptune.config import (DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig,
                             compose, load_config)
from adaptune.domain import adapt, adapt_and_finetune
from adaptune.errors import AdaptuneError, ConfigError, DataError, ModelError
from adaptune.merging import MultiAdapterPredictor, merge_adapters
from adaptune.spec import ModelSpec, ResolvedRun, resolve
from adaptune.train import RunResult, run

__version__ = "0.1.0"

__all__ = ["run", "finetune", "finetune_config", "load", "build_base", "Predictor",
           "MultiAdapterPredictor", "adapt", "adapt_and_finetune",
           "merge_adapters", "RunResult", "RunConfig",
           "ModelConfig", "MethodConfig", "DataConfig", "TrainConfig", "load_config",
           "compose", "resolve", "ResolvedRun", "ModelSpec",
           "AdaptuneError", "ConfigError", "DataError", "ModelError", "__version__"]
