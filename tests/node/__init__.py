"""Tests on the real node (marker ``node``)."""
