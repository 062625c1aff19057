"""Datasets for composer_se's runs and tests."""

from composer_se.recipes.data.synthetic import SyntheticImages

__all__ = ['SyntheticImages']
