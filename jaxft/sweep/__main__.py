"""`python -m jaxft.sweep`: the jaxft-sweep command."""

from jaxft.sweep import run

run()
