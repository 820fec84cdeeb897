"""Backpropagation: the reference every other rule is measured against."""
from bpfree.registry import RULES
from bpfree.rules.base import LearningRule


@RULES.register("bp")
class Backprop(LearningRule):
    """The default step unchanged: exact gradients of the task loss by autograd."""
