from emu.oracle.cli import main
import sys

sys.exit(main())
