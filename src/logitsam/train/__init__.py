"""Training: the config (`config`), the Trainer subclass (`trainer`) and the recipe (`run`).

Import `logitsam.train.run.run_training` or `logitsam.train.trainer.PreferenceTrainer` directly; this
package import stays light (no transformers) so the CLI starts fast.
"""

from .config import TrainConfig, build_config

__all__ = ["TrainConfig", "build_config"]
