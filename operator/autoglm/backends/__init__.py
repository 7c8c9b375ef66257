"""Triton Python-backend models; model_repo/*/model.py re-export them.

Only importable inside Triton's Python backend stub (``triton_python_backend_utils``).
"""
