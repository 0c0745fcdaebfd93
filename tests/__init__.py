"""Test package marker (lets tests import shared helpers from conftest)."""
