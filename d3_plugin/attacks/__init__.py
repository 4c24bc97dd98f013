"""Backdoor attacks: trigger functions, dataset poisoning and backdoored-model training."""
from .badnets import BadNets
from .base import Trigger, choose_poison_index, poison_test_set, poison_training_set
from .training import MODEL_LR, TrainConfig, default_lr, train_model
from .blended import Blended
from .input_aware import InputAwareConfig, InputAwareTrigger
from .lf import LowFrequency
from .sig import SIG
from .wanet import WaNet
from .registry import Attack, attacks, get_attack

__all__ = ["BadNets", "Trigger", "choose_poison_index", "poison_test_set", "poison_training_set",
           "MODEL_LR", "TrainConfig", "default_lr", "train_model", "Blended", "InputAwareConfig", "InputAwareTrigger",
           "LowFrequency", "SIG", "WaNet", "Attack", "attacks", "get_attack"]
