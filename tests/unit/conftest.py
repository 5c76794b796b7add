"""Fixtures of the unit tests only."""
import pytest

from tests.unit.gloo_ranks import Ranks


@pytest.fixture(scope="package")
def gloo_pair():
    """Two gloo ranks (gloo_ranks.py) for the tests of tensor-parallel pieces, started once for this package and
    ended after its last test, before the end-to-end servers start."""
    ranks = Ranks(2)
    try:
        yield ranks
    finally:
        ranks.close()
