import sys

from kvrouter.sim.cli import main

sys.exit(main(sys.argv[1:]))
