"""Conventions of Linux accounts that the model, the stages and the stamp share."""

from __future__ import annotations


def home_dir(name: str) -> str:
    """A regular user's home: the admin user, the cluster user, accounts a stage creates."""
    return f"/home/{name}"
