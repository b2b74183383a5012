"""The model zoo: a tiny Llama base and task experts trained here, for tests, demos and benchmarks."""

from workers.zoo.build import PROFILES, ZOO_VERSION, ZooError, ZooProfile, build_zoo, model_config
from workers.zoo.data import TASKS, ZooTask
from workers.zoo.tokenizer import char_tokenizer

__all__ = [
    "PROFILES",
    "TASKS",
    "ZOO_VERSION",
    "ZooError",
    "ZooProfile",
    "ZooTask",
    "build_zoo",
    "char_tokenizer",
    "model_config",
]
