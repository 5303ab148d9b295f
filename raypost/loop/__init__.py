"""The closed loop: a controller that re-queries the teacher where the current student is weakest,
under a fixed teacher budget, with engines that stay up across rounds. See controller.py."""

from raypost.loop.config import LoopConfig, LoopRecipe

__all__ = ["LoopConfig", "LoopRecipe"]
