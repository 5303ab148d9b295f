"""raypost: post-train small language models on a Ray cluster.

Every stage is a plain Python function (dataset in, dataset, checkpoint or metrics out);
the recipe runner and the CLI are thin wrappers around them.
"""

__version__ = "0.1.0"
