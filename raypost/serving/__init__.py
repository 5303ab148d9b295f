"""Serving on Ray Serve: an OpenAI-compatible HTTP API for base, trained and merged models.

    from raypost.serving.config import ServeConfig, build_serve_config, write_serve_config
    from raypost.serving.app import build_app      # the import_path of the Serve config file
"""
