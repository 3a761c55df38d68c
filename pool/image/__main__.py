"""``python -m pool.image build [--profile NAME] ...`` and ``python -m pool.image export``.

The same command, parser and error handling as ``sandpool image build``: this only
puts ``image`` in front of the arguments, so the two cannot drift apart.
"""

import sys

from api.cli import main

if __name__ == "__main__":
    sys.exit(main(["image", *sys.argv[1:]]))
