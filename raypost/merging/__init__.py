"""Weight fusion: linear, SLERP, task arithmetic, TIES and DARE merges of HF checkpoints."""

__all__ = ["MergeError", "MergeSummary", "merge_checkpoints"]


def __getattr__(name: str):
    # Lazy, so that loading a recipe (which imports merging.config) does not import torch.
    if name == "MergeError":
        from raypost.merging.checkpoint import MergeError

        return MergeError
    if name in ("MergeSummary", "merge_checkpoints"):
        from raypost.merging import merge

        return getattr(merge, name)
    raise AttributeError(name)
