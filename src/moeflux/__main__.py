import sys

from moeflux.cli import main

sys.exit(main())
