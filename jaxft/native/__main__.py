"""`python -m jaxft.native`: builds jaxft's C++ libraries for this machine (jaxft.native)."""

from jaxft.native import main

main()
